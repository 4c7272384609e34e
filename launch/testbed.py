"""Builds the embedded testbed end to end and reports its quality bar.

  python -m launch.testbed --workdir=/tmp/cast_testbed [--config=configs/testbed.py
      --config.spec.seed=1 --config.eval_limit=100] [-v 0]

World -> tokenizer -> tiny Llama pretrained from scratch -> held-out evaluation -> alignment SFT on
D_align -> evaluation again. The model artifacts are cached (see cast_jax.testbed.build); the
workdir gets config.json, metrics.json, training curves and a base-vs-aligned plot.
"""

import dataclasses
import json
import os
import time

from absl import app, logging

from launch import common

_CONFIG, _WORKDIR = common.define_flags("testbed.py")


def _spec(cfg):
  """The TestbedSpec of `cfg`, checked; app.UsageError naming the field otherwise."""
  from cast_jax.testbed.build import TestbedSpec
  from cast_jax.testbed.world import WorldSizes
  sizes = cfg.sizes.to_dict()
  for name, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise app.UsageError(f"--config.sizes.{name}={value!r}: use an integer >= 0.")
  try:
    spec = TestbedSpec(**cfg.spec.to_dict(), sizes=WorldSizes(**sizes))
    spec.validate()
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--config.spec: {e}") from None
  return spec


def _validate(cfg) -> None:
  """Everything checkable before the world is written into the cache (app.UsageError)."""
  _spec(cfg)
  if isinstance(cfg.eval_limit, bool) or not isinstance(cfg.eval_limit, int) or cfg.eval_limit < 1:
    raise app.UsageError(f"--config.eval_limit={cfg.eval_limit!r}: use an integer >= 1.")
  if cfg.cache_dir and os.path.exists(cfg.cache_dir) and not os.path.isdir(cfg.cache_dir):
    raise app.UsageError(f"--config.cache_dir={cfg.cache_dir!r} is a file; pass a dir (or leave "
                         "it empty for $CAST_JAX_CACHE / ~/.cache/cast_jax).")


def _read_losses(path):
  if not os.path.exists(path):
    return [], []
  rows = [json.loads(line) for line in open(path) if line.strip()]
  return [r["step"] for r in rows], [r["loss"] for r in rows]


def _plots(out, tb_root, base, aligned):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from cast_jax import workdir as wd

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for ax, stage in zip(axes, ("pretrain", "align")):
    steps, losses = _read_losses(os.path.join(tb_root, stage, "metrics.jsonl"))
    ax.plot(steps, losses)
    ax.set(title=f"{stage} loss", xlabel="step", ylabel="loss")
  wd.save_figure(fig, os.path.join(out, "training_curves.png"))
  keys = list(base)
  x = np.arange(len(keys))
  fig, ax = plt.subplots(figsize=(10, 3.5))
  ax.bar(x - 0.2, [base[k] for k in keys], 0.4, label="base")
  ax.bar(x + 0.2, [aligned[k] for k in keys], 0.4, label="aligned (full SFT on D_align)")
  ax.set_xticks(x, keys, rotation=30, ha="right")
  ax.set(ylabel="rate / accuracy", ylim=(0, 1))
  ax.legend()
  wd.save_figure(fig, os.path.join(out, "base_vs_aligned.png"))


def main(argv):
  del argv
  from cast_jax import workdir as wd
  from cast_jax.eval import EvalModel
  from cast_jax.testbed.build import aligned_testbed, build_testbed
  from cast_jax.testbed.evaluate import evaluate_testbed

  from cast_jax.models.sharding import maybe_initialize_distributed
  maybe_initialize_distributed()  # no-op on one host
  cfg = _CONFIG.value
  out = _WORKDIR.value
  spec = _spec(cfg)
  common.write_config(out, cfg, spec_key=spec.key(), resolved_spec=dataclasses.asdict(spec))
  times = {}
  t = time.time()
  common.stage(f"testbed {spec.key()}: world, tokenizer, base model (cached after the first run)")
  tb = build_testbed(spec, cfg.cache_dir or None)
  times["build_base_s"] = time.time() - t
  logging.info("testbed at %s", tb.root)
  t = time.time()
  common.stage("evaluating the base model")
  base = evaluate_testbed(EvalModel(tb.base_params, tb.config), tb.tokenizer, tb.world,
                          limit=cfg.eval_limit)
  times["eval_base_s"] = time.time() - t
  t = time.time()
  common.stage("alignment SFT on D_align (cached after the first run)")
  aligned_dir, aligned_params = aligned_testbed(tb)
  times["align_s"] = time.time() - t
  t = time.time()
  common.stage("evaluating the aligned model")
  aligned = evaluate_testbed(EvalModel(aligned_params, tb.config), tb.tokenizer, tb.world,
                             limit=cfg.eval_limit)
  times["eval_aligned_s"] = time.time() - t
  chance = {"mmlu": 0.25, "csqa": 0.2}
  print(f"\n{'metric':<20}{'base':>10}{'aligned':>10}{'chance':>10}")
  for k in base:
    ch = f"{chance[k]:.2f}" if k in chance else "-"
    print(f"{k:<20}{base[k]:>10.3f}{aligned[k]:>10.3f}{ch:>10}")
  print(f"\nbase checkpoint: {tb.base_dir}\naligned checkpoint: {aligned_dir}\nworld: {tb.world_dir}")
  wd.write_json(os.path.join(out, "metrics.json"),
                {"base": base, "aligned": aligned, "times_s": times, "testbed_root": tb.root})
  _plots(out, tb.root, base, aligned)
  common.stage(f"wrote {out}")


if __name__ == "__main__":
  common.run(main, validate=_validate)
