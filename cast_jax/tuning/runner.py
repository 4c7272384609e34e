"""One CAST alignment run (cast.md 3.5, 4.2): head set -> LoRA on D_align -> exports -> evaluation.

The run dir (`run_alignment`), every file atomic, `done.json` written last:
  train/                     run_lora's metrics.jsonl, orbax checkpoints, fingerprint (resumable)
  adapter/                   PEFT adapter (adapter_config.json, adapter_model.safetensors)
  merged/                    merged HF checkpoint (when export_merged)
  run.json                   the settings and the head set ([L, H] mask, flat head list, counts)
  eval.json                  `evaluation.evaluate_alignment` of the merged model
  done.json                  the settings again: a later call with the same settings returns
                             eval.json without running; other settings are refused, naming them

Head-set specs (`head_set_mask`, the launch flag --head_set), over a conflict map's C [L, H]:
  "bucket:b"    bucket b of the map's M buckets (B1 = highest C, Risky; BM = Safe)
  "top:p"       the round(p% of N) heads of highest C; "bottom:p" the lowest (Table 9)
  "random:p"    round(p% of N) heads uniformly at random, drawn from the run's seed
  "random:n=k"  k random heads (budget-matched to a bucket of k heads)
  "all"         every head (the paper's "Full SFT": LoRA on every head's W_q)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from cast_jax import data, workdir as wd
from cast_jax.tuning import head_sets

RANKINGS = ("c", "o", "s")  # C = O * S (the paper's), and the O-only / S-only ablations (F.1)
DONE, EVAL, RUN = "done.json", "eval.json", "run.json"


@dataclasses.dataclass(frozen=True)
class ConflictTables:
  """Per-head scores of a diagnosis, float64 [L, H]; o / s are None when only buckets.json was
  given. num_buckets: the map's M."""
  c: np.ndarray
  o: np.ndarray | None
  s: np.ndarray | None
  num_buckets: int
  source: str

  def table(self, ranking: str) -> np.ndarray:
    """The score a ranking sorts by: "c", "o" or "s"."""
    if ranking not in RANKINGS:
      raise ValueError(f"ranking={ranking!r}; use one of {RANKINGS}.")
    t = getattr(self, ranking)
    if t is None:
      raise ValueError(f"{self.source} has no per-head {ranking.upper()} table (buckets.json "
                       "holds C only); pass the diagnosis's conflict_map.json.")
    return t


def load_conflict_map(path: str) -> ConflictTables:
  """Reads conflict_map.json, buckets.json or a diagnosis dir holding conflict_map.json."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "conflict_map.json")
  if not os.path.isfile(path):
    raise ValueError(f"conflict map {path!r} does not exist; pass conflict_map.json or "
                     "buckets.json from launch/diagnose.py (or its workdir).")
  with open(path) as f:
    rec = json.load(f)
  if rec.get("unit", "head") != "head" or rec.get("target", "q") != "q":
    raise ValueError(f"{path}: a map over target {rec.get('target')!r} units {rec.get('unit')!r}; "
                     "head-restricted LoRA on W_q needs the query-head map (target q).")
  if "heads" in rec:  # conflict_map.json
    h = rec["heads"]
    get = lambda k: np.asarray(h[k], np.float64)
    return ConflictTables(get("c"), get("o"), get("s"), int(rec["num_buckets"]), path)
  if "buckets" in rec:  # buckets.json: C is only stored per bucket member
    n = int(rec["num_heads_total"])
    heads = [hd for b in rec["buckets"] for hd in b["heads"]]
    num_heads = 1 + max(hd[1] for hd in heads)
    c = np.full(n, np.nan)
    for b in rec["buckets"]:
      for (l, hh), v in zip(b["heads"], b["c"]):
        c[l * num_heads + hh] = v
    if not np.isfinite(c).all():
      raise ValueError(f"{path}: the buckets do not cover all {n} heads.")
    return ConflictTables(c.reshape(-1, num_heads), None, None, int(rec["num_buckets"]), path)
  raise ValueError(f"{path}: neither a conflict_map.json ('heads') nor a buckets.json "
                   "('buckets') record.")


def _percent(text: str, spec: str) -> float:
  try:
    p = float(text)
  except ValueError:
    p = -1.0
  if not 0 < p <= 100:
    raise ValueError(f"head set {spec!r}: the percentage must be a number in (0, 100].")
  return p / 100.0


def head_set_mask(spec: str, tables: ConflictTables, seed: int, ranking: str = "c"
                  ) -> np.ndarray:
  """float32 [L, H] mask of a head-set spec (module doc); `ranking` picks C, O or S."""
  shape = tables.c.shape
  kind, _, arg = str(spec).partition(":")
  if kind == "all" and not arg:
    return head_sets.all_heads_mask(shape)
  if kind == "bucket":
    if not arg.isdigit() or not 1 <= int(arg) <= tables.num_buckets:
      raise ValueError(f"head set {spec!r}: use bucket:1..{tables.num_buckets} (the map's M).")
    return head_sets.bucket_mask(tables.table(ranking), tables.num_buckets, int(arg))
  if kind in ("top", "bottom"):
    fn = head_sets.top_fraction_mask if kind == "top" else head_sets.bottom_fraction_mask
    return fn(tables.table(ranking), _percent(arg, spec))
  if kind == "random":
    n = int(np.prod(shape))
    if arg.startswith("n="):
      count = int(arg[2:]) if arg[2:].isdigit() else 0
    else:
      count = head_sets.fraction_count(_percent(arg, spec), n)
    if not 1 <= count <= n:
      raise ValueError(f"head set {spec!r}: random:n=k needs 1 <= k <= {n}.")
    return head_sets.random_mask(shape, count, seed)
  raise ValueError(f"head set {spec!r}: use bucket:<b>, top:<pct>, bottom:<pct>, random:<pct>, "
                   "random:n=<k> or all.")


def align_examples(tokenizer: Any, path: str, max_len: int) -> list:
  """D_align (WildJailbreak schema: harmful -> refusal, benign -> answer) as training examples."""
  records = data.load_wildjailbreak(path)
  pairs = [(r.prompt, r.completion) for r in records if r.completion]
  if not pairs:
    raise ValueError(f"--align_data {path!r}: no row has a completion to train on.")
  return data.encode_dataset(tokenizer, pairs, max_len=max_len, name=f"D_align ({path})")


def util_examples(tokenizer: Any, path: str, max_len: int) -> list:
  """D_util for PCGrad's reference gradient: MMLU-schema rows -> (MCQ prompt, letter) examples,
  the same L_util the diagnosis uses (`diagnosis.calibration.util_calibration`)."""
  from cast_jax.diagnosis import calibration
  return calibration.util_calibration(tokenizer, data.load_mmlu(path), max_len=max_len)[1]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The alignment recipe (cast.md Table 3 defaults). num_steps 0: `epochs` over D_align."""
  learning_rate: float = 1e-4
  epochs: int = 1
  num_steps: int = 0
  batch_size: int = 4
  accum_steps: int = 2
  max_len: int = 1024
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0

  def steps(self, num_examples: int) -> int:
    """Train-step calls (micro-batches) of the run."""
    n = self.num_steps or self.epochs * data.steps_per_epoch(num_examples, self.batch_size)
    if n < 1:
      raise ValueError(f"{num_examples} D_align examples make no batch of {self.batch_size}; "
                       "lower the batch size or set num_steps.")
    return n

  def optimizer(self, num_steps: int):
    from cast_jax.train import OptimizerConfig
    updates = max(1, num_steps // self.accum_steps)
    return OptimizerConfig(learning_rate=self.learning_rate, schedule=self.schedule,
                           warmup_steps=self.warmup_steps,
                           total_steps=max(updates, self.warmup_steps + 1),
                           weight_decay=self.weight_decay, grad_clip_norm=self.grad_clip_norm,
                           accum_steps=self.accum_steps)


def _settings_diff(recorded: Mapping, now: Mapping) -> list[str]:
  keys = sorted(set(recorded) | set(now))
  return [k for k in keys if recorded.get(k) != now.get(k)]


def finished(run_dir: str, settings: Mapping[str, Any]) -> dict | None:
  """eval.json of a finished run with these settings; None if not finished; ValueError naming
  the differing fields if the dir holds a finished run with other settings."""
  done = os.path.join(run_dir, DONE)
  if not os.path.isfile(done):
    return None
  with open(done) as f:
    recorded = json.load(f)["settings"]
  now = json.loads(json.dumps(settings, default=wd._json_default))
  diff = _settings_diff(recorded, now)
  if diff:
    raise ValueError(f"{run_dir} holds a finished run with other settings ({', '.join(diff)}); "
                     "use a new workdir, or delete that run dir to redo it.")
  with open(os.path.join(run_dir, EVAL)) as f:
    return json.load(f)


def pad_id(tokenizer: Any) -> int:
  """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out either way)."""
  for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if pid is not None:
      return int(pid)
  return 0


def model_digest(params) -> str:
  """Content digest of the base params: a finished run is reused only for the same model."""
  from cast_jax.train.fingerprint import digest
  return digest(params)


def _eval_settings(eval_sets, eval_batch_size: int, max_new_tokens: int) -> dict:
  from cast_jax.train.fingerprint import digest
  return {"batch_size": eval_batch_size, "max_new_tokens": max_new_tokens,
          "data": digest([[dataclasses.astuple(r) for r in getattr(eval_sets, f.name)]
                          for f in dataclasses.fields(eval_sets)])}


def run_alignment(run_dir: str, *, params, config, tokenizer, examples: Sequence, mask,
                  seed: int, recipe: Recipe, lora_config, eval_sets, eval_batch_size: int = 32,
                  max_new_tokens: int = 72, util: Sequence | None = None,
                  pcgrad: str | None = None, export_merged: bool = True,
                  info: Mapping[str, Any] | None = None, progress: bool = False,
                  checkpoint_every: int | None = None, base_digest: str | None = None
                  ) -> dict[str, float]:
  """Trains, exports and evaluates one head set into `run_dir` (module doc); returns eval.json.

  Args:
    params, config, tokenizer: the base model; examples: D_align (`align_examples`).
    mask: [L, H] head set (`head_set_mask`); seed: LoRA init, data order (`run_lora`).
    recipe, lora_config: `Recipe`, `tuning.LoraConfig`.
    eval_sets: `evaluation.load_eval_sets(...)`; eval_batch_size, max_new_tokens: its settings.
    util, pcgrad: D_util examples and "one_sided" / "symmetric" for PCGrad, or None / None.
    export_merged: also write the merged HF checkpoint.
    info: extra JSON fields for run.json / done.json (e.g. the head-set spec).
    base_digest: `model_digest(params)`, computed here when None (pass it to hash a large
      model once for many runs).
  """
  from cast_jax.eval import EvalModel
  from cast_jax.train.fingerprint import digest
  from cast_jax.tuning import evaluation, lora, peft_export, train as tuning_train

  mask = lora.check_head_mask(mask, config)
  settings = {"model": base_digest or model_digest(params), "seed": int(seed),
              "recipe": dataclasses.asdict(recipe), "lora": dataclasses.asdict(lora_config),
              "pcgrad": pcgrad, "head_mask": mask.astype(int).tolist(),
              "data": digest(examples), "util_data": None if util is None else digest(util),
              "eval": _eval_settings(eval_sets, eval_batch_size, max_new_tokens),
              **dict(info or {})}
  got = finished(run_dir, settings)
  if got is not None:
    return got
  os.makedirs(run_dir, exist_ok=True)
  t0 = time.time()
  num_steps = recipe.steps(len(examples))
  trained, summary = tuning_train.run_lora(
      params, config, examples, mask, pad_id=pad_id(tokenizer), num_steps=num_steps,
      batch_size=recipe.batch_size, seed=seed, optimizer=recipe.optimizer(num_steps),
      lora_config=lora_config, util_examples=util, pcgrad=pcgrad,
      workdir=os.path.join(run_dir, "train"), checkpoint_every=checkpoint_every,
      progress=progress)
  train_s = time.time() - t0
  # Exports and evaluation are functions of the finished training run: a re-run after a kill
  # in this part rewrites them.
  peft_export.save_peft_adapter(os.path.join(run_dir, "adapter"), trained, mask, config,
                                lora_config, overwrite=True)
  merged = lora.merge_lora(params, trained, mask, lora_config)
  if export_merged:
    from cast_jax.models import save_pretrained
    save_pretrained(merged, config, os.path.join(run_dir, "merged"), tokenizer=tokenizer,
                    overwrite=True)
  t1 = time.time()
  metrics = evaluation.evaluate_alignment(EvalModel(merged, config), tokenizer, eval_sets,
                                          batch_size=eval_batch_size,
                                          max_new_tokens=max_new_tokens)
  heads = head_sets.mask_to_heads(mask)
  wd.write_json(os.path.join(run_dir, RUN), {
      **settings, "num_steps": num_steps, "heads": heads.tolist(), "num_heads": int(heads.size),
      "trainable_params": tuning_train.count_trainable(trained, mask),
      "final_loss": summary.get("loss"), "train_s": train_s, "eval_s": time.time() - t1})
  wd.write_json(os.path.join(run_dir, EVAL), metrics)
  wd.write_json(os.path.join(run_dir, DONE), {"settings": settings,
                                              "wall_s": time.time() - t0})
  return metrics


def run_base(run_dir: str, *, params, config, tokenizer, eval_sets, eval_batch_size: int = 32,
             max_new_tokens: int = 72, info: Mapping[str, Any] | None = None,
             base_digest: str | None = None) -> dict[str, float]:
  """The untuned model's eval.json in `run_dir` (same done-marker rule as `run_alignment`)."""
  from cast_jax.eval import EvalModel
  from cast_jax.tuning import evaluation

  settings = {"base": True, "model": base_digest or model_digest(params),
              "eval": _eval_settings(eval_sets, eval_batch_size, max_new_tokens),
              **dict(info or {})}
  got = finished(run_dir, settings)
  if got is not None:
    return got
  t0 = time.time()
  metrics = evaluation.evaluate_alignment(EvalModel(params, config), tokenizer, eval_sets,
                                          batch_size=eval_batch_size,
                                          max_new_tokens=max_new_tokens)
  wd.write_json(os.path.join(run_dir, EVAL), metrics)
  wd.write_json(os.path.join(run_dir, DONE), {"settings": settings, "wall_s": time.time() - t0})
  return metrics
