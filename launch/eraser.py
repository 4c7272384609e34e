"""SFT-Eraser (issue 12): a soft trigger that reverts a carrier model to its base under fixed
weights.

  python -m launch.eraser --base=<HF dir> --model=<HF dir to erase> --carrier=<LCDD workdir>
      --data=<prompt file> --heldout=<prompt file> --workdir=/tmp/eraser
      [--sft=<HF dir>] [--config.behaviour=safety --config.num_steps=500] [-v 0]

--model is the model to erase (an LCDD run's lcdd_model/, or the plain SFT checkpoint for the
structural-dependence ablation). --carrier gives C_write: an LCDD workdir (its
active_channels.json) or its carrier/ dir; the SFT ablation passes the same LCDD carrier, as
the paper uses the same write channels; without --carrier every channel is matched. --data and
--heldout are prompt files in --config.behaviour's schema (`carrier_jax.evaluation.
load_prompts`; safety: harmful and benign together). The first --config.selection_prompts of
--heldout pick the best trigger; with --sft the next --config.eval_limit are scored for Base /
SFT / <model_name> / <model_name>+Trigger (behaviour rate and the KLs SFT||model,
SFT||Trig, Base||model, Base||Trig) into eval.json / eval.md; --mmlu adds the MMLU-analogue
column (the first --config.mcq_limit items, letter-restricted zero-shot), triggered model too.

Writes into --workdir: trigger.npy (float32 [L, D], the held-out-best trigger), trigger.json
(its meta), curves.png, curves.jsonl, metrics.json, config.json. --config.hard.enabled adds a
GCG-style hard-token trigger (ordinary text, the same loss; `carrier_jax.hard_trigger`):
hard_trigger.json (ids, text, the text-vs-rows logit check), hard_curves.{jsonl,png}, and a
<model_name>+HardTrigger row in the evaluation. The tokenizer is the first found in --model,
--sft, --base.
"""

import io
import json
import os
import time

from absl import app, flags

from launch import common

_CONFIG, _WORKDIR = common.define_flags("eraser.py")
_BASE = flags.DEFINE_string("base", None, "Base model: HF checkpoint dir.")
_MODEL = flags.DEFINE_string("model", None, "Model to erase: HF checkpoint dir (LCDD lcdd_model/ "
                             "or the SFT model).")
_CARRIER = flags.DEFINE_string("carrier", None, "C_write: an LCDD workdir or its carrier/ dir "
                               "(omit: every channel).")
_DATA = flags.DEFINE_string("data", None, "Training prompts: file or hub id.")
_HELDOUT = flags.DEFINE_string("heldout", None, "Held-out prompts: file or hub id.")
_SFT = flags.DEFINE_string("sft", None, "SFT model (HF dir): adds the Base / SFT / model / "
                           "model+Trigger evaluation; optional.")
_MMLU = flags.DEFINE_string("mmlu", None, "MMLU-schema file or hub id: the utility column of "
                            "the evaluation (needs --sft); optional.")


def _validate(cfg) -> None:
  """Flags and config checked before anything is loaded or written (app.UsageError)."""
  from carrier_jax.eraser import ALIGNS
  from carrier_jax.evaluation import BEHAVIOURS
  from carrier_jax.trigger import PLACES
  for flag in (_BASE, _MODEL) + ((_SFT,) if _SFT.value else ()):
    if not flag.value or not os.path.isfile(os.path.join(flag.value, "config.json")):
      raise app.UsageError(f"--{flag.name}={flag.value!r}: pass an HF checkpoint dir (with "
                           "config.json).")
  for flag in (_DATA, _HELDOUT):
    if not flag.value:
      raise app.UsageError(f"--{flag.name}: pass a prompt file (or hub id).")
  if _MMLU.value and not _SFT.value:
    raise app.UsageError("--mmlu scores the evaluation, which needs --sft; pass both or neither.")
  if _CARRIER.value and not os.path.isdir(_CARRIER.value):
    raise app.UsageError(f"--carrier={_CARRIER.value!r}: pass an LCDD workdir or its carrier/.")
  if cfg.behaviour not in BEHAVIOURS:
    raise app.UsageError(f"--config.behaviour={cfg.behaviour!r}: use one of {BEHAVIOURS}.")
  if cfg.align not in ALIGNS or cfg.place not in PLACES:
    raise app.UsageError(f"--config.align / place: use one of {ALIGNS} / {PLACES}.")
  for name in ("length", "batch_size", "num_prompts", "tail_k", "eval_every", "log_every",
               "max_prompt_len", "selection_prompts", "max_new_tokens", "safety_max_new_tokens",
               "eval_batch_size", "max_len", "eval_limit", "mcq_limit"):
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise app.UsageError(f"--config.{name}={value!r}: use an integer >= 1.")
  if cfg.lexicon and not os.path.isfile(cfg.lexicon):
    raise app.UsageError(f"--config.lexicon={cfg.lexicon!r}: no such file; pass a word list or "
                         "'' for the shipped lexicon.")
  if cfg.num_steps < 0 or cfg.lr <= 0 or cfg.radius <= 0:
    raise app.UsageError("--config: need num_steps >= 0, lr > 0 and radius > 0.")


def _channels(config):
  """C_write from --carrier (active_channels.json, else the orbax carrier), else all."""
  from carrier_jax import write_channels as W
  from carrier_jax.outputs import load_carrier
  path = _CARRIER.value
  if not path:
    return W.all_channels(config), "all"
  for cand in (path, os.path.dirname(os.path.abspath(path))):
    js = os.path.join(cand, "active_channels.json")
    if os.path.isfile(js):
      return W.channels_from_json(js, config), js
  carrier_dir = path if os.path.basename(os.path.normpath(path)) == "carrier" else \
      os.path.join(path, "carrier")
  carrier, _ = load_carrier(carrier_dir)
  return W.carrier_channels(carrier), carrier_dir


def _split_counts(held, n: int) -> tuple[int, int]:
  """How many of the n mixed prompts are harmful / benign: half each (F.3's 50/50 safety mix),
  the rest from the other kind when one runs out; all from `prompts` for other behaviours."""
  h, b = len(held.prompts), len(held.benign_prompts)
  take_b = min(b, n // 2) if b else 0
  take_h = min(h, n - take_b)
  return take_h, min(b, n - take_h)


def _mix(held, n: int) -> list:
  """The first n prompts of a HeldOut: harmful and benign interleaved 1:1 (safety)."""
  nh, nb = _split_counts(held, n)
  hs, bs = list(held.prompts[:nh]), list(held.benign_prompts[:nb])
  out = [x for pair in zip(hs, bs) for x in pair]
  return out + hs[len(bs):] + bs[len(hs):]


def _tokenizer_dir() -> str:
  """The first of --model, --sft, --base holding tokenizer files (an LCDD run's lcdd_model/
  has none)."""
  for path in (_MODEL.value, _SFT.value, _BASE.value):
    if path and any(os.path.isfile(os.path.join(path, f))
                    for f in ("tokenizer.json", "tokenizer_config.json")):
      return path
  raise ValueError("no tokenizer files in --model, --sft or --base; save the tokenizer with "
                   "one of the checkpoints")


def _encode(tokenizer, prompts, max_len):
  from cast_jax import data
  from cast_jax.eval import batching
  ids = batching.encode(tokenizer, [data.render_prompt(tokenizer, p) for p in prompts])
  return [x for x in ids if len(x) <= max_len]


def _save_npy(path, array):
  import numpy as np

  from cast_jax.io_atomic import atomic_write_bytes
  buf = io.BytesIO()
  np.save(buf, np.asarray(array, np.float32))
  return atomic_write_bytes(path, buf.getvalue())


def main(argv):
  del argv
  import jax
  import tqdm
  import transformers

  from carrier_jax import eraser, eraser_train, evaluation
  from carrier_jax import write_channels as W
  from cast_jax import models
  from cast_jax import workdir as wd
  from cast_jax.eval import EvalModel
  from cast_jax.io_atomic import atomic_write_bytes

  cfg = _CONFIG.value
  out = _WORKDIR.value
  common.write_config(out, cfg, base=os.path.abspath(_BASE.value),
                      model=os.path.abspath(_MODEL.value), carrier=_CARRIER.value,
                      data=_DATA.value, heldout=_HELDOUT.value, sft=_SFT.value,
                      mmlu=_MMLU.value)
  t0 = time.time()
  common.stage("loading the checkpoints")
  config, base = models.load_pretrained(_BASE.value)
  m_config, params = models.load_pretrained(_MODEL.value)
  if m_config != config:
    raise ValueError(f"--base and --model are different architectures:\n{config}\n{m_config}")
  tok_dir = _tokenizer_dir()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
  channels, source = _channels(config)
  common.stage(f"C_write from {source}: {sum(W.channel_counts(channels)['attn_write'])} attention"
               f" and {sum(W.channel_counts(channels)['mlp_write'])} MLP channels")
  kw = {k: v for k, v in (("subset", cfg.data.subset), ("split", cfg.data.split)) if v}
  train = evaluation.load_prompts(cfg.behaviour, _DATA.value, limit=None, **kw)
  held = evaluation.load_prompts(cfg.behaviour, _HELDOUT.value, limit=None, **kw)
  evaluation.check_disjoint(held, train.all_prompts)
  select = _mix(held, cfg.selection_prompts)
  pad_id = next(p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if p is not None)
  bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
  sets = {}
  for name, prompts in (("train", _mix(train, cfg.num_prompts)), ("heldout", select)):
    ids = _encode(tokenizer, prompts, cfg.max_prompt_len)
    if not ids:
      raise ValueError(f"no {name} prompt fits --config.max_prompt_len={cfg.max_prompt_len}")
    sets[name] = eraser.prompt_set(ids, pad_id=pad_id, place=cfg.place, bos_token_id=bos)
  fields = {f: cfg[f] for f in eraser.EraserConfig.__dataclass_fields__}
  ecfg = eraser.EraserConfig(**fields)
  special = tuple(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
  model = EvalModel(params, config)
  common.stage(f"optimising a {ecfg.length}-token trigger: {len(sets['train']['input_ids'])} "
               f"prompts, {ecfg.num_steps} steps, selection on {len(select)} held-out prompts")
  bar = tqdm.tqdm(total=ecfg.num_steps, desc="trigger", unit="step", dynamic_ncols=True)

  def progress(step, terms):
    bar.update(1)
    if step % ecfg.log_every == 0:
      bar.set_postfix(loss=f"{terms['loss']:.4f}", kl=f"{terms['kl']:.4f}")

  res = eraser_train.optimize_trigger(model, EvalModel(base, config), channels, sets["train"],
                                      sets["heldout"], cfg=ecfg,
                                      key=jax.random.PRNGKey(ecfg.seed), exclude_ids=special,
                                      progress=progress)
  bar.close()
  _save_npy(os.path.join(out, "trigger.npy"), res.trigger)
  meta = {"shape": list(res.trigger.shape), "place": ecfg.place, "bos_token_id": bos,
          "best_step": res.best_step, "best_heldout": res.best_heldout,
          "norms": [float(x) for x in (res.trigger ** 2).sum(-1) ** 0.5],
          "channels": source, "channel_counts": W.channel_counts(channels)}
  wd.write_json(os.path.join(out, "trigger.json"), meta)
  lines = "".join(json.dumps(r) + "\n" for r in res.rows)
  atomic_write_bytes(os.path.join(out, "curves.jsonl"), lines.encode())
  eraser_train.plot_curves(res.rows, os.path.join(out, "curves.png"))
  metrics = {"best_step": res.best_step, "best_heldout": res.best_heldout,
             "final_train": next((r for r in reversed(res.rows) if r["split"] == "train"), None),
             "optimise_s": time.time() - t0}
  triggers = {"Trigger": res.trigger}
  if cfg.hard.enabled:
    hres = _hard_trigger(cfg, ecfg, model, EvalModel(base, config), channels, sets, tokenizer,
                         special, select, bos, pad_id, out)
    triggers["HardTrigger"] = hres.embeddings
    metrics["hard"] = {"best_step": hres.best_step, "best_heldout": hres.best_heldout,
                       "text": hres.text}
  if _SFT.value:
    metrics["eval"] = _evaluate(cfg, config, base, params, tokenizer, held, triggers, bos, out)
  metrics["wall_s"] = time.time() - t0
  wd.write_json(os.path.join(out, "metrics.json"), metrics)
  print(f"\nbest trigger at step {res.best_step}: held-out loss {res.best_heldout['loss']:.4f} "
        f"(mse {res.best_heldout['mse']:.4f}, KL(Base||Trig) {res.best_heldout['kl']:.4f})")
  if "eval" in metrics:
    print("\n" + evaluation.markdown_table(metrics["eval"]))
  print(f"outputs in {out}")


def _hard_trigger(cfg, ecfg, model, base, channels, sets, tokenizer, special, select, bos,
                  pad_id, out):
  """The GCG-style hard-token trigger (same loss, `carrier_jax.hard_trigger`): searched, checked
  to be ordinary text (its ids survive re-tokenisation inside the prompts, and scoring the text
  equals scoring the embedding rows), written to hard_trigger.json / hard_curves.{jsonl,png}."""
  import jax
  import tqdm

  from carrier_jax import eraser_train
  from carrier_jax import hard_trigger as HT
  from cast_jax import data
  from cast_jax import workdir as wd
  from cast_jax.io_atomic import atomic_write_bytes
  search = HT.HardTriggerConfig(**{k: v for k, v in cfg.hard.items() if k != "enabled"})
  common.stage(f"searching a {ecfg.length}-token hard trigger: {search.num_steps} steps x "
               f"{search.num_candidates} candidates (top-{search.top_k} per position)")
  bar = tqdm.tqdm(total=search.num_steps, desc="hard trigger", unit="step", dynamic_ncols=True)
  hres = HT.optimize_hard_trigger(model, base, channels, sets["train"], sets["heldout"],
                                  cfg=ecfg, search=search, key=jax.random.PRNGKey(ecfg.seed + 1),
                                  tokenizer=tokenizer, exclude_ids=special,
                                  progress=lambda step, terms: bar.update(1))
  bar.close()
  rendered = [data.render_prompt(tokenizer, p) for p in select]
  HT.text_prompt_ids(tokenizer, rendered, hres.token_ids, place=ecfg.place)  # raises if merged
  gap = HT.text_equivalence(model, _encode(tokenizer, select, cfg.max_prompt_len),
                            hres.token_ids, bos_token_id=bos, place=ecfg.place, pad_id=pad_id)
  wd.write_json(os.path.join(out, "hard_trigger.json"), {
      "token_ids": [int(i) for i in hres.token_ids], "text": hres.text,
      "best_step": hres.best_step, "best_heldout": hres.best_heldout,
      "text_vs_rows_max_logit_diff": float(gap), "search": dict(cfg.hard)})
  lines = "".join(json.dumps(r) + "\n" for r in hres.rows)
  atomic_write_bytes(os.path.join(out, "hard_curves.jsonl"), lines.encode())
  eraser_train.plot_curves(hres.rows, os.path.join(out, "hard_curves.png"))
  return hres


def _evaluate(cfg, config, base, params, tokenizer, held, triggers, bos, out):
  """Base / SFT / model / model+<trigger> on the held-out prompts after the selection ones.

  triggers: {row suffix ("Trigger", "HardTrigger"): float [L, D] embeddings}."""
  from carrier_jax import evaluation
  from carrier_jax.trigger import triggered
  from cast_jax import data, models
  from cast_jax import workdir as wd
  from cast_jax.eval import EvalModel
  from cast_jax.io_atomic import atomic_write_bytes
  s_config, sft = models.load_pretrained(_SFT.value)
  if s_config != config:
    raise ValueError(f"--sft is a different architecture:\n{config}\n{s_config}")
  n = cfg.selection_prompts
  harmful = list(held.prompts)
  benign = list(held.benign_prompts)
  skip_h, skip_b = _split_counts(held, n)  # the selection prompts, left out of both kinds
  eval_set = evaluation.HeldOut(held.behaviour, tuple(harmful[skip_h:skip_h + cfg.eval_limit]),
                                tuple(benign[skip_b:skip_b + cfg.eval_limit]))
  if not eval_set.prompts or (held.behaviour == "safety" and not eval_set.benign_prompts):
    raise ValueError(f"--heldout has no prompts left after the {n} selection ones; pass more "
                     "or lower --config.selection_prompts")
  name = cfg.model_name
  eval_models = {"Base": EvalModel(base, config), "SFT": EvalModel(sft, config),
                 name: EvalModel(params, config)}
  pairs = [("SFT", name), ("Base", name)]
  for suffix, trigger in triggers.items():
    trig = f"{name}+{suffix}"
    eval_models[trig] = triggered(eval_models[name], trigger, cfg.place, bos)
    pairs += [("SFT", trig), ("Base", trig)]
  max_new = cfg.safety_max_new_tokens if held.behaviour == "safety" else cfg.max_new_tokens
  lexicon = None
  if cfg.lexicon:
    from cast_jax.eval.style import parse_lexicon
    with open(cfg.lexicon) as f:
      lexicon = parse_lexicon(f.read().splitlines())
  mcq = data.load_mmlu(_MMLU.value, limit=cfg.mcq_limit) if _MMLU.value else []
  result = evaluation.evaluate_models(eval_models, tokenizer, eval_set, kl_pairs=pairs, mcq=mcq,
                                      max_new_tokens=max_new, batch_size=cfg.eval_batch_size,
                                      max_len=cfg.max_len, lexicon=lexicon,
                                      progress=common.stage)
  wd.write_json(os.path.join(out, "eval.json"), result)
  text = f"# SFT-Eraser evaluation: {held.behaviour}\n\n" + evaluation.markdown_table(result)
  atomic_write_bytes(os.path.join(out, "eval.md"), text.encode())
  return result


if __name__ == "__main__":
  common.run(main, validate=_validate)
