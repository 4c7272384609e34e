"""CAST head-level conflict diagnosis (cast.md section 3) of one checkpoint, into a workdir.

  python -m launch.diagnose --workdir=/tmp/cast_diag --model=/path/to/hf_dir \
      --safe_data=d_safe.jsonl --util_data=d_util.jsonl [--util_kind=mcq --target=q \
      --n_safe=500 --n_util=500 --seed=0 --gen_len=64 --buckets=4 --refusal_target="..." \
      --refusal_prefixes=prefixes.txt] [--config.batch_size=16 --config.max_len=512 ...] [-v 0]

Each short flag sets the config field of the same name (configs/diagnose.py) and wins over
`--config.<field>`; the other settings are config fields only.

Model: an HF dir or hub id, loaded with `cast_jax.models.load_pretrained` and its tokenizer with
`transformers.AutoTokenizer`. D_safe: WildJailbreak schema (harmful rows kept); D_util: MMLU
schema with `util_kind=mcq`, GSM8K schema with `util_kind=reasoning` (the paper's F.4:
L_util = CE of the reference solution, H_gen from greedy generations of `reasoning_gen_len`
tokens scored by their final answer, `diagnosis.reasoning`); n_safe / n_util items are drawn
with `seed`. `target` (q | k | v | o, `diagnosis.targets`) picks the projection whose units are
diagnosed: query heads for q / o, KV heads for k / v (ablating a KV head zeroes every query head
that reads it). The refusal rule of the safety sweep is the keyword rule, or with
`refusal_prefixes=FILE` "the response contains one of these strings" (`eval.refusal.PrefixJudge`).

Stages: (1) per-unit gradients of L_safe / L_util -> cos, O and per-example conflict fractions;
(2) the MCQ ablation sweep -> H_gen (for reasoning: the generation sweep `reasoning_sweep`);
(3) the safety ablation sweep (greedy generations, the refusal rule) -> H_safe; or, with
`safety_proxy=teacher_forced`, (3') the teacher-forced proxy (log-probs of refusal openings,
`diagnosis.safety_proxy`) -> H_safe; `report_proxy_spearman` runs both and writes their
Spearman rank correlation; then scores, ranks and buckets. Each stage's arrays are cached in
`<workdir>/stages/` under the run's fingerprint (model params, calibration data, the proxy's
token sequences, target, refusal rule, settings), so a killed run resumes from the stages (and
sweep blocks) already done and a different run in the same workdir is refused, naming the
differing field; switching `safety_proxy` / `report_proxy_spearman` keeps the fingerprint. Outputs
(`cast_jax.diagnosis.report`): config.json, conflict_map.json, buckets.json,
heatmap_{c,o,s}.png, summary.md, times.json. Compiled programs persist across runs in
`--config.compile_cache` (default ~/.cache/cast_jax/xla, '' = off): a later run on a model of
the same shape skips most of the compile time (`diagnosis.compile_cache`).
"""

import os
import sys
import time

from absl import app, flags

from launch import common

_CONFIG, _WORKDIR = common.define_flags("diagnose.py")
# The flags: each one, when given, sets the config field of the same name.
_STR_FLAGS = ("model", "safe_data", "util_data", "util_kind", "refusal_target", "target",
              "refusal_prefixes")
_INT_FLAGS = ("n_safe", "n_util", "seed", "gen_len", "buckets")
for _name in _STR_FLAGS:
  flags.DEFINE_string(_name, None, f"Sets --config.{_name} (see configs/diagnose.py).")
for _name in _INT_FLAGS:
  flags.DEFINE_integer(_name, None, f"Sets --config.{_name} (see configs/diagnose.py).")
_POSITIVE = ("n_safe", "n_util", "gen_len", "buckets", "max_len", "batch_size",
             "fraction_batch_size", "mask_block", "reasoning_gen_len")
_TARGETS = ("q", "k", "v", "o")  # diagnosis.targets.TARGETS (not imported: validation stays light)
_ANSWER_RULES = ("boxed", "last_number")  # diagnosis.reasoning.ANSWER_RULES


def _looks_local(source: str) -> bool:
  """A path the user meant as a local one (hub ids are `name` or `owner/name`, and may hold dots,
  as in Qwen/Qwen2.5-0.5B-Instruct)."""
  suffix = os.path.splitext(source)[1].lower()
  return (source.startswith((".", "/", "~")) or source.count("/") > 1
          or suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet"))


def _validate(cfg) -> None:
  """Applies the short flags to `cfg`, then checks every config value before any side effect
  (app.UsageError naming the field)."""
  for name in _STR_FLAGS + _INT_FLAGS:
    if flags.FLAGS[name].present:
      cfg[name] = flags.FLAGS[name].value
  for name in _POSITIVE:
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise app.UsageError(f"--config.{name}={v!r}: use an integer >= 1.")
  if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
    raise app.UsageError(f"--config.seed={cfg.seed!r}: use an integer.")
  if cfg.util_kind not in ("mcq", "reasoning"):
    raise app.UsageError(f"--config.util_kind={cfg.util_kind!r}: use 'mcq' (MMLU-schema D_util) "
                         "or 'reasoning' (GSM8K-schema D_util, cast.md F.4).")
  if cfg.target not in _TARGETS:
    raise app.UsageError(f"--config.target={cfg.target!r}: use one of {', '.join(_TARGETS)}.")
  if not isinstance(cfg.include_bias, bool):
    raise app.UsageError(f"--config.include_bias={cfg.include_bias!r}: use True or False.")
  if cfg.include_bias and cfg.target == "o":
    raise app.UsageError("--config.include_bias=True with --config.target=o: o_proj has no bias; "
                         "include_bias applies to q, k and v.")
  if cfg.reasoning_answer not in _ANSWER_RULES:
    raise app.UsageError(f"--config.reasoning_answer={cfg.reasoning_answer!r}: use one of "
                         f"{', '.join(_ANSWER_RULES)}.")
  if not isinstance(cfg.refusal_prefixes, str):
    raise app.UsageError(f"--config.refusal_prefixes={cfg.refusal_prefixes!r}: use '' or a file.")
  if cfg.refusal_prefixes:
    from cast_jax.eval.refusal import load_refusal_prefixes
    try:
      load_refusal_prefixes(os.path.expanduser(cfg.refusal_prefixes))
    except (OSError, ValueError) as e:
      raise app.UsageError(f"--config.refusal_prefixes: {e}") from None
  if cfg.safety_proxy not in ("generation", "teacher_forced"):
    raise app.UsageError(f"--config.safety_proxy={cfg.safety_proxy!r}: use 'generation' or "
                         "'teacher_forced'.")
  if not isinstance(cfg.report_proxy_spearman, bool):
    raise app.UsageError(f"--config.report_proxy_spearman={cfg.report_proxy_spearman!r}: use "
                         "True or False.")
  if not isinstance(cfg.proxy_openings, str) or (
      cfg.proxy_openings.strip() and not all(o.strip() for o in cfg.proxy_openings.split("|"))):
    raise app.UsageError(f"--config.proxy_openings={cfg.proxy_openings!r}: use '' or non-empty "
                         "openings separated by '|'.")
  if not isinstance(cfg.compile_cache, str) or (
      cfg.compile_cache and os.path.isfile(os.path.expanduser(cfg.compile_cache))):
    raise app.UsageError(f"--config.compile_cache={cfg.compile_cache!r}: use a folder, or '' for "
                         "no persistent compilation cache.")
  if not isinstance(cfg.refusal_target, str) or not cfg.refusal_target.strip():
    raise app.UsageError("--config.refusal_target is empty; pass the refusal text L_safe trains.")
  for name in ("model", "safe_data", "util_data"):
    v = cfg[name]
    if not isinstance(v, str) or not v.strip():
      raise app.UsageError(f"--config.{name} is empty; pass a local path or a hub id.")
    if _looks_local(v) and not os.path.exists(os.path.expanduser(v)):
      raise app.UsageError(f"--config.{name}={v!r} does not exist.")
  if os.path.isfile(cfg.model):
    raise app.UsageError(f"--config.model={cfg.model!r} is a file; pass the checkpoint dir.")
  for name in ("safe_data", "util_data"):
    if os.path.isdir(cfg[name]):
      raise app.UsageError(f"--config.{name}={cfg[name]!r} is a dir; pass the data file.")


def _draw(records, n, seed):
  """Up to n records chosen by a seeded permutation, in file order."""
  import numpy as np
  if len(records) <= n:
    return list(records)
  keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:n])
  return [records[i] for i in keep]


def _inputs(cfg):
  """Model, tokenizer and the encoded calibration sets; nothing written."""
  import numpy as np
  import transformers

  from cast_jax import data
  from cast_jax.diagnosis import calibration, reasoning, safety_proxy, targets
  from cast_jax.eval.refusal import KeywordJudge, PrefixJudge, load_refusal_prefixes
  from cast_jax.models import load_pretrained

  model = os.path.expanduser(cfg.model)
  config, params = load_pretrained(model)
  tok = transformers.AutoTokenizer.from_pretrained(model)
  src = lambda s: os.path.expanduser(s) if os.path.exists(os.path.expanduser(s)) else s
  harmful = [r for r in data.load_wildjailbreak(src(cfg.safe_data)) if r.harmful]
  if not harmful:
    raise ValueError(f"{cfg.safe_data}: no harmful record (D_safe needs harmful prompts)")
  safe = _draw(harmful, cfg.n_safe, cfg.seed)
  safe_pairs, safe_ex = calibration.safe_calibration(tok, safe, max_len=cfg.max_len,
                                                     refusal_target=cfg.refusal_target)
  util_x = {}
  if cfg.util_kind == "reasoning":
    util = _draw(data.load_gsm8k(src(cfg.util_data)), cfg.n_util, cfg.seed + 1)
    util_x["reasoning_set"], util_ex = reasoning.reasoning_calibration(tok, util,
                                                                       max_len=cfg.max_len)
  else:
    util = _draw(data.load_mmlu(src(cfg.util_data)), cfg.n_util, cfg.seed + 1)
    mcq_set, util_ex = calibration.util_calibration(tok, util, max_len=cfg.max_len)
    util_x.update(mcq_set=mcq_set, choice_ids=np.asarray(mcq_set.choice_ids))
  safe_prompts = calibration.safety_prompt_ids(tok, safe)
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  # Always encoded (cheap), so the fingerprint does not depend on which H_safe a run reports
  # and switching safety_proxy / report_proxy_spearman reuses the stages already cached.
  openings = cfg.proxy_openings.strip()
  prompts = [p for p, _ in safe_pairs]
  proxy_seqs, proxy_ks = safety_proxy.proxy_examples(
      tok, prompts, [o.strip() for o in openings.split("|")] if openings
      else [r for _, r in safe_pairs], per_prompt=not openings)
  if cfg.refusal_prefixes:
    prefixes = load_refusal_prefixes(os.path.expanduser(cfg.refusal_prefixes))
    judge, rule = PrefixJudge(prefixes), f"prefixes ({len(prefixes)} strings from " \
                                         f"{cfg.refusal_prefixes}, eval.refusal.PrefixJudge)"
  else:
    prefixes, judge, rule = None, KeywordJudge(), "keyword (cast_jax.eval.refusal)"
  # group: query heads one ablation unit zeroes (1 for q / o, H // KV for k / v); the sweeps
  # read it and `judge` from here.
  return dict(config=config, params=params, tok=tok, safe_ex=safe_ex, util_ex=util_ex,
              safe_prompts=safe_prompts, pad=int(pad), proxy_seqs=proxy_seqs,
              proxy_ks=proxy_ks, group=targets.unit_group(config, cfg.target),
              unit=targets.unit_name(cfg.target), judge=judge, judge_rule=rule,
              refusal_prefixes=prefixes, **util_x)


def _fingerprint(cfg, x):
  from cast_jax.train.fingerprint import digest, make_fingerprint
  if cfg.util_kind == "reasoning":
    rs = x["reasoning_set"]
    util = dict(util_prompts=rs.prompt_ids, util_references=list(rs.references),
                reasoning_gen_len=cfg.reasoning_gen_len, reasoning_answer=cfg.reasoning_answer)
  else:
    util = dict(util_choices=x["choice_ids"], util_answers=x["mcq_set"].answers)
  judge = "keyword" if x["refusal_prefixes"] is None else ["prefixes", *x["refusal_prefixes"]]
  return make_fingerprint(
      model_params=digest(x["params"]), model_config=x["config"], safe_examples=x["safe_ex"],
      util_examples=x["util_ex"], safe_prompts=x["safe_prompts"], seed=cfg.seed,
      n_safe=cfg.n_safe, n_util=cfg.n_util, util_kind=cfg.util_kind,
      refusal_target=cfg.refusal_target, gen_len=cfg.gen_len, max_len=cfg.max_len,
      batch_size=cfg.batch_size, fraction_batch_size=cfg.fraction_batch_size,
      include_bias=cfg.include_bias, target=cfg.target, judge=judge,
      proxy_sequences=x["proxy_seqs"], proxy_targets=x["proxy_ks"], **util)


def _gradient_stage(cfg, x):
  from cast_jax.diagnosis import calibration, conflict

  def batches(examples, size):
    return calibration.calibration_batches(examples, batch_size=size, pad_id=x["pad"])

  p, c = x["params"], x["config"]
  kw = dict(include_bias=cfg.include_bias, target=cfg.target)
  g_safe, n_safe = conflict.head_gradients(p, c, batches(x["safe_ex"], cfg.batch_size), **kw)
  g_util, n_util = conflict.head_gradients(p, c, batches(x["util_ex"], cfg.batch_size), **kw)
  cos, o = conflict.optimization_conflict(g_safe, g_util)
  fb = cfg.fraction_batch_size
  frac_safe = conflict.conflict_fraction(p, c, batches(x["safe_ex"], fb), g_util, **kw)
  frac_util = conflict.conflict_fraction(p, c, batches(x["util_ex"], fb), g_safe, **kw)
  return dict(cos=cos, o=o, fraction_safe=frac_safe, fraction_util=frac_util,
              safe_tokens=n_safe, util_tokens=n_util)


def _mcq_stage(cfg, x):
  """H_gen's sweep, one resumable block per layer (stages/mcq_sweep/), with a progress bar."""
  import functools
  from cast_jax.diagnosis import head_ablation, sensitivity, stage_cache
  c, group = x["config"], x.get("group", 1)
  sweep = functools.partial(sensitivity.mcq_sweep, x["params"], c, x["mcq_set"], pad_id=x["pad"],
                            batch_size=cfg.batch_size, group=group, layer_block=1)
  s = stage_cache.resumable_sweep(
      _WORKDIR.value, "mcq_sweep", sweep, desc="MCQ sweep", unit=x.get("unit", "head"),
      total_units=c.num_layers * head_ablation.num_units(c, group))
  return dict(base_predictions=s.base_predictions, predictions=s.predictions, answers=s.answers)


def _reasoning_stage(cfg, x):
  """H_gen's generation sweep for reasoning D_util, one resumable block per `mask_block` masks
  (stages/reasoning_sweep/), with a progress bar."""
  import functools
  from cast_jax.diagnosis import reasoning, stage_cache
  c = x["config"]
  sweep = functools.partial(reasoning.reasoning_sweep, x["params"], c, x["tok"],
                            x["reasoning_set"], group=x["group"], answer=cfg.reasoning_answer,
                            max_new_tokens=cfg.reasoning_gen_len, pad_id=x["pad"],
                            batch_size=cfg.batch_size, mask_block=cfg.mask_block)
  s = stage_cache.resumable_sweep(
      _WORKDIR.value, "reasoning_sweep", sweep, desc="reasoning sweep (base + units)",
      total_units=1 + c.num_layers * (c.num_heads // x["group"]))
  return dict(base_correct=s.base_correct, correct=s.correct)


def _safety_stage(cfg, x):
  """H_safe's sweep, one resumable block per `mask_block` masks (stages/safety_sweep/)."""
  import functools
  from cast_jax.diagnosis import head_ablation, sensitivity, stage_cache
  c, group = x["config"], x.get("group", 1)
  sweep = functools.partial(sensitivity.safety_sweep, x["params"], c, x["tok"], x["safe_prompts"],
                            max_new_tokens=cfg.gen_len, pad_id=x["pad"], group=group,
                            batch_size=cfg.batch_size, mask_block=cfg.mask_block,
                            judge=x.get("judge"))
  s = stage_cache.resumable_sweep(
      _WORKDIR.value, "safety_sweep", sweep, desc="safety sweep (base + units)",
      unit=x.get("unit", "head"), total_units=1 + c.num_layers * head_ablation.num_units(c, group))
  return dict(base_refused=s.base_refused, refused=s.refused)


def _proxy_stage(cfg, x):
  """The teacher-forced H_safe proxy's sweep, one resumable block per layer."""
  import functools
  from cast_jax.diagnosis import head_ablation, safety_proxy, stage_cache
  c, group = x["config"], x.get("group", 1)
  sweep = functools.partial(safety_proxy.proxy_safety_sweep, x["params"], c, x["proxy_seqs"],
                            x["proxy_ks"], pad_id=x["pad"], batch_size=cfg.batch_size,
                            group=group, layer_block=1)
  s = stage_cache.resumable_sweep(
      _WORKDIR.value, "safety_proxy", sweep, desc="teacher-forced sweep",
      unit=x.get("unit", "head"), total_units=c.num_layers * head_ablation.num_units(c, group))
  return dict(base_logprob=s.base_logprob, logprob=s.logprob, n_targets=s.n_targets)


def main(argv):
  del argv
  from cast_jax import workdir as wd
  from cast_jax.diagnosis import reasoning, report, scores, sensitivity, stage_cache
  from cast_jax.diagnosis.compile_cache import enable_compile_cache
  from cast_jax.train.fingerprint import FingerprintMismatchError

  cfg = _CONFIG.value
  enable_compile_cache(cfg.compile_cache)  # before anything compiles (JAX checks once)
  out = _WORKDIR.value
  times = {}
  t = time.time()
  common.stage(f"loading {cfg.model} and the calibration sets")
  x = _inputs(cfg)
  L, U = x["config"].num_layers, x["config"].num_heads // x["group"]
  unit = x["unit"]
  if cfg.buckets > L * U:
    raise ValueError(f"--config.buckets={cfg.buckets} exceeds the model's {L * U} units "
                     f"({unit}s of target {cfg.target}).")
  times["load"] = time.time() - t
  try:  # before config.json, so a refused run leaves the recorded run's files as they were
    resumed = stage_cache.claim(wd.prepare_workdir(out, what="--workdir"), _fingerprint(cfg, x))
  except FingerprintMismatchError as e:
    sys.exit(f"diagnose.py: error: {e}")
  common.write_config(out, cfg)
  common.stage(f"target {cfg.target}: {L} layers x {U} {unit}s; D_safe {len(x['safe_ex'])} "
               f"prompts, D_util {len(x['util_ex'])} items; "
               f"{'resuming' if resumed else 'new'} workdir {out}")
  stages = [("gradients", f"per-{unit} gradients of W_{cfg.target}, O and conflict fractions",
              _gradient_stage)]
  if cfg.util_kind == "reasoning":
    stages.append(("reasoning_sweep", "reasoning ablation sweep (H_gen, greedy generations)",
                   _reasoning_stage))
  else:
    stages.append(("mcq_sweep", "MCQ ablation sweep (H_gen)", _mcq_stage))
  both = cfg.report_proxy_spearman
  if cfg.safety_proxy == "generation" or both:
    stages.append(("safety_sweep", "safety ablation sweep (H_safe, greedy generations)",
                   _safety_stage))
  if cfg.safety_proxy == "teacher_forced" or both:
    stages.append(("safety_proxy", "teacher-forced safety sweep (H_safe proxy, refusal "
                   "log-probs)", _proxy_stage))
  got, reused = {}, []
  for i, (name, what, fn) in enumerate(stages, 1):
    common.stage(f"stage {i}/{len(stages)} {name}: {what}")
    got[name], cached, secs = stage_cache.cached_stage(out, name, lambda fn=fn: fn(cfg, x))
    times[name] = secs
    reused += [name] if cached else []
    common.stage(f"stage {i}/{len(stages)} {name}: "
                 + (f"cached (computed in {secs:.1f}s by an earlier run)" if cached
                    else f"done in {secs:.1f}s"))
  g = got["gradients"]
  if "reasoning_sweep" in got:
    r = got["reasoning_sweep"]
    util_sweep = reasoning.ReasoningSweep(r["base_correct"], r["correct"])
  else:
    m = got["mcq_sweep"]
    util_sweep = sensitivity.MCQSweep(m["base_predictions"], m["predictions"], m["answers"])
  safety = proxy = None
  if "safety_sweep" in got:
    s = got["safety_sweep"]
    safety = sensitivity.SafetySweep(s["base_refused"], s["refused"])
  if "safety_proxy" in got:
    from cast_jax.diagnosis.safety_proxy import ProxySweep
    s = got["safety_proxy"]
    proxy = ProxySweep(s["base_logprob"], s["logprob"], s["n_targets"])
  h_safe = safety.h_safe if cfg.safety_proxy == "generation" else proxy.h_safe
  sc = scores.score_heads(g["o"], util_sweep.h_gen, h_safe, m=cfg.buckets)
  calib = {"n_safe": len(x["safe_ex"]), "n_util": len(x["util_ex"]),
           "n_safe_requested": cfg.n_safe, "n_util_requested": cfg.n_util, "seed": cfg.seed,
           "util_kind": cfg.util_kind, "refusal_target": cfg.refusal_target,
           "gen_len": cfg.gen_len, "max_len": cfg.max_len, "include_bias": cfg.include_bias,
           "target": cfg.target, "refusal_rule": x["judge_rule"], "safe_data": cfg.safe_data,
           "util_data": cfg.util_data, "safe_target_tokens": float(g["safe_tokens"]),
           "util_target_tokens": float(g["util_tokens"]), "safety_proxy": cfg.safety_proxy,
           "proxy_openings": cfg.proxy_openings or "calibration refusals"}
  if x["refusal_prefixes"] is not None:
    calib["refusal_prefixes"] = list(x["refusal_prefixes"])
  if cfg.util_kind == "reasoning":
    calib.update(reasoning_gen_len=cfg.reasoning_gen_len, reasoning_answer=cfg.reasoning_answer)
  c = x["config"]
  model = {"name": cfg.model, "model_type": c.model_type, "num_layers": L,
           "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim}
  record = report.conflict_map(sc, g["cos"], g["fraction_safe"], g["fraction_util"],
                               base_accuracy=util_sweep.base_accuracy,
                               base_refusal_rate=safety.base_rate if safety else 0.0,
                               num_buckets=cfg.buckets, model=model, calibration=calib,
                               target=cfg.target, unit=unit, group=x["group"])
  if safety is None:  # no generations ran: there is no refusal rate to report
    record["base"]["refusal_rate"] = None
  if proxy is not None:
    record["base"]["refusal_logprob_per_token"] = proxy.base_mean
  if both:
    rho = scores.spearman(proxy.h_safe, safety.h_safe)
    record["proxy_spearman"] = {
        "spearman_teacher_forced_vs_generation_h_safe": None if rho != rho else rho,
        "h_safe_teacher_forced": proxy.h_safe.tolist(), "used_in_s_and_c": cfg.safety_proxy,
        "seconds": {k: times[k] for k in ("safety_sweep", "safety_proxy")}}
  report.write_report(out, record, report.bucket_record(sc.c, cfg.buckets, unit), times)
  wd.write_json(os.path.join(out, "times.json"), {"seconds": times, "cached_stages": reused,
                                                 "total_this_run": time.time() - t})
  base_safe = (f"base refusal rate {safety.base_rate:.3f}" if safety else
               f"base refusal log-prob/token {proxy.base_mean:.3f}")
  print(f"\nbase accuracy {util_sweep.base_accuracy:.3f}, {base_safe}; "
        f"C in [{sc.c.min():.4f}, {sc.c.max():.4f}], std {sc.c.std():.4f}")
  if both:
    print(f"Spearman(H_safe teacher-forced, H_safe generation) = {rho:.3f}")
  common.stage(f"wrote {out}")


if __name__ == "__main__":
  common.run(main, validate=_validate)
