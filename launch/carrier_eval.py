"""Carrier evaluation (issue 11): Base / SFT / LCDD on held-out prompts of one behaviour.

  python -m launch.carrier_eval --base=<HF dir> --sft=<HF dir> --lcdd=<HF dir>
      --behaviour=fixed_response --data=<held-out file or hub id> --workdir=/tmp/eval
      [--mmlu=<MMLU-schema file>] [--train_data=<the SFT / LCDD training file>]
      [--config.limit=100] [-v 0]

--data holds the behaviour's held-out prompts in its schema (`carrier_jax.evaluation.
load_prompts`); --train_data, when given, is read with the same schema and any overlap with
--data is an error. --mmlu adds the utility column. The models share the SFT checkpoint's
tokenizer. Writes eval.json (metrics, KL(SFT||LCDD), sample responses and, when --lcdd is the
lcdd_model/ of a launch/lcdd.py workdir, that run's sparsity and stop reason) and eval.md (the
table) into --workdir, plus config.json.
"""

import json
import os
import time

from absl import app, flags

from launch import common

_CONFIG, _WORKDIR = common.define_flags("carrier_eval.py")
_BASE = flags.DEFINE_string("base", None, "Base model: HF checkpoint dir.")
_SFT = flags.DEFINE_string("sft", None, "SFT model: HF checkpoint dir (its tokenizer is used).")
_LCDD = flags.DEFINE_string("lcdd", None, "LCDD model: merged HF checkpoint dir "
                            "(<launch/lcdd.py workdir>/lcdd_model).")
_BEHAVIOUR = flags.DEFINE_string("behaviour", None, "fixed_response | safety | style.")
_DATA = flags.DEFINE_string("data", None, "Held-out prompts of the behaviour: file or hub id.")
_MMLU = flags.DEFINE_string("mmlu", None, "MMLU-schema file or hub id (utility); optional.")
_JUDGE = flags.DEFINE_string("style_judge", None, "style: an HF checkpoint dir of an LLM judge "
                             "scoring App. F.4's 0-5 Shakespeare rubric (the paper: Qwen3-14B).")
_TRAIN = flags.DEFINE_string("train_data", None, "The behaviour's training data, to check that "
                             "no held-out prompt was trained on; optional.")


def _validate(cfg) -> None:
  """Flags and config checked before anything is loaded or written (app.UsageError)."""
  from carrier_jax.evaluation import BEHAVIOURS
  for flag in (_BASE, _SFT, _LCDD):
    if not flag.value or not os.path.isfile(os.path.join(flag.value, "config.json")):
      raise app.UsageError(f"--{flag.name}={flag.value!r}: pass an HF checkpoint dir (with "
                           "config.json).")
  if _BEHAVIOUR.value not in BEHAVIOURS:
    raise app.UsageError(f"--behaviour={_BEHAVIOUR.value!r}: use one of {BEHAVIOURS}.")
  if not _DATA.value:
    raise app.UsageError("--data: pass the behaviour's held-out prompts (a file or a hub id).")
  for name in ("max_new_tokens", "safety_max_new_tokens", "batch_size", "max_len"):
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise app.UsageError(f"--config.{name}={value!r}: use an integer >= 1.")
  for name in ("limit", "mcq_limit", "num_samples"):
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise app.UsageError(f"--config.{name}={value!r}: use an integer >= 0 (limits: 0 = all).")
  if cfg.lexicon and not os.path.isfile(cfg.lexicon):
    raise app.UsageError(f"--config.lexicon={cfg.lexicon!r}: no such file; pass a word list or "
                         "'' for the shipped lexicon.")
  if _JUDGE.value and not os.path.isfile(os.path.join(_JUDGE.value, "config.json")):
    raise app.UsageError(f"--style_judge={_JUDGE.value!r}: pass an HF checkpoint dir (with "
                         "config.json and its tokenizer).")


def _adapter_kwargs(cfg) -> dict:
  return {k: v for k, v in (("subset", cfg.data.subset), ("split", cfg.data.split)) if v}


def _carrier_run(lcdd_dir: str) -> dict | None:
  """Sparsity and stop reason of the launch/lcdd.py run that exported `lcdd_dir`, if any."""
  run = os.path.dirname(os.path.abspath(lcdd_dir))
  paths = {k: os.path.join(run, f"{k}.json") for k in ("sparsity", "summary")}
  if not all(os.path.isfile(p) for p in paths.values()):
    return None
  with open(paths["sparsity"]) as f:
    sparsity = json.load(f)
  with open(paths["summary"]) as f:
    summary = json.load(f)
  return {"workdir": run, "gate_sparsity": sparsity["gate_sparsity"]["overall"],
          "delta_sparsity": sparsity["delta_sparsity"]["overall"],
          "stop_reason": summary.get("stop_reason"), "final_step": summary.get("final_step"),
          "time_s": summary.get("time_s")}


def _markdown(result: dict) -> str:
  from carrier_jax.evaluation import markdown_table
  lines = [f"# Carrier evaluation: {result['behaviour']}", "",
           f"{result['num_prompts']} held-out prompts"
           + (f" (+ {result['num_benign_prompts']} benign)" if result["num_benign_prompts"]
              else "")
           + f", {result['num_mcq']} MMLU-analogue items; KL on the "
           f"{result.get('reference', '')} model's greedy responses "
           f"({result.get('num_empty_references', 0)} empty ones left out).", "",
           markdown_table(result)]
  carrier = result.get("carrier")
  if carrier:
    lines += [f"Carrier: gate sparsity {carrier['gate_sparsity']:.4f}, dW entries masked "
              f"{carrier['delta_sparsity']:.4f}; stop {carrier['stop_reason']} at step "
              f"{carrier['final_step']}.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  import transformers

  from carrier_jax import evaluation
  from cast_jax import data, models
  from cast_jax import eval as ev
  from cast_jax import workdir as wd
  from cast_jax.io_atomic import atomic_write_bytes

  cfg = _CONFIG.value
  out = _WORKDIR.value
  common.write_config(out, cfg, base=os.path.abspath(_BASE.value),
                      sft=os.path.abspath(_SFT.value), lcdd=os.path.abspath(_LCDD.value),
                      behaviour=_BEHAVIOUR.value, data=_DATA.value, mmlu=_MMLU.value,
                      train_data=_TRAIN.value, style_judge=_JUDGE.value)
  t0 = time.time()
  common.stage(f"reading held-out {_BEHAVIOUR.value} prompts from {_DATA.value}")
  kw = _adapter_kwargs(cfg)
  heldout = evaluation.load_prompts(_BEHAVIOUR.value, _DATA.value, limit=cfg.limit, **kw)
  if _TRAIN.value:
    # Every training prompt, not just the SFT sample drawn from them.
    train = evaluation.load_prompts(_BEHAVIOUR.value, _TRAIN.value, limit=None)
    evaluation.check_disjoint(heldout, train.all_prompts)
  mcq = data.load_mmlu(_MMLU.value, limit=cfg.mcq_limit or None) if _MMLU.value else []
  lexicon = None
  if cfg.lexicon:
    from cast_jax.eval.style import parse_lexicon
    with open(cfg.lexicon) as f:
      lexicon = parse_lexicon(f.read().splitlines())
  common.stage("loading the Base, SFT and LCDD checkpoints")
  loaded = {name: models.load_pretrained(path)
            for name, path in (("Base", _BASE.value), ("SFT", _SFT.value), ("LCDD", _LCDD.value))}
  configs = {name: c for name, (c, _) in loaded.items()}
  if len(set(configs.values())) != 1:
    raise ValueError(f"--base, --sft and --lcdd are different architectures: {configs}")
  tokenizer = transformers.AutoTokenizer.from_pretrained(_SFT.value)
  eval_models = {name: ev.EvalModel(p, c) for name, (c, p) in loaded.items()}
  max_new = cfg.safety_max_new_tokens if _BEHAVIOUR.value == "safety" else cfg.max_new_tokens
  judge = None
  if _JUDGE.value:
    from cast_jax.eval.style_judge import StyleJudge
    common.stage(f"loading the style judge {_JUDGE.value}")
    judge = StyleJudge.from_pretrained(_JUDGE.value, batch_size=cfg.batch_size)
  result = evaluation.evaluate_models(
      eval_models, tokenizer, heldout, mcq=mcq, max_new_tokens=max_new,
      batch_size=cfg.batch_size, max_len=cfg.max_len, lexicon=lexicon,
      num_samples=cfg.num_samples, style_judge=judge, progress=common.stage)
  result["wall_s"] = time.time() - t0
  result["max_new_tokens"] = max_new
  carrier = _carrier_run(_LCDD.value)
  if carrier:
    result["carrier"] = carrier
  wd.write_json(os.path.join(out, "eval.json"), result)
  text = _markdown(result)
  atomic_write_bytes(os.path.join(out, "eval.md"), text.encode())
  print("\n" + evaluation.markdown_table(result))
  print(f"eval.json and eval.md in {out}")


if __name__ == "__main__":
  common.run(main, validate=_validate)
