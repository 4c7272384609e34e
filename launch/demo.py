"""The end-to-end demo, the README's main command: testbed -> CAST diagnosis -> a reduced
bucket experiment -> SFT + LCDD on the fixed-response behaviour -> SFT-Eraser -> the carrier
evaluation -> one report.

  python -m launch.demo --workdir=/tmp/cast_demo [--config.eraser.num_steps=2000 ...] [-v 0]
  python -m launch.demo --workdir=/tmp/smoke --config=configs/demo.py:smoke    (30-s smoke run)

Stages (`launch.demo_stages`; sizes in configs/demo.py): the testbed is built (or reused from
the cache) in this process, as is the bucket experiment (`cast_jax.tuning.runner`); diagnosis,
SFT, LCDD and the eraser run their launch scripts as child processes, whose stage lines show
indented and whose logs go to <stage dir>/console.log. A finished stage is recorded in
stages/<name>.json and skipped on restart; a killed one resumes from its own checkpoints.

Writes into --workdir: report.md (conflict map, Pareto plot, tables, trigger curves, links to
every stage's dir), report.html (the same, images inlined: one self-contained file),
config.json, metrics.json (every stage's numbers and seconds), and the stage dirs
diagnosis/, cast/, sft/, lcdd/, eraser/, stages/.
"""

import os
import tempfile
import time

from absl import app, logging

from launch import common

_CONFIG, _WORKDIR = common.define_flags("demo.py")
# Prompt ids of the smoke run are drawn from [FIRST_ID, vocab_size): ids 0-2 are pad / bos / eos.
FIRST_ID = 3
# Positive integer fields of the full demo, per section.
_POSITIVE = {"diagnosis": ("n_safe", "n_util", "gen_len", "batch_size"),
             "buckets": ("num_steps", "eval_limit", "eval_batch_size", "max_new_tokens"),
             "sft": ("num_steps", "batch_size", "max_len"),
             "lcdd": ("num_steps", "max_len"),
             "eraser": ("num_steps", "eval_every", "num_prompts", "selection_prompts",
                        "eval_limit", "max_new_tokens")}


def _validate(cfg) -> None:
  """Every config value the run depends on, before anything is written (app.UsageError)."""
  if cfg.get("mode") == "smoke":
    return _validate_smoke(cfg)
  for section, names in _POSITIVE.items():
    for name in names:
      v = cfg[section][name]
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise app.UsageError(f"--config.{section}.{name}={v!r}: use an integer >= 1.")
  for name in ("buckets.seed", "diagnosis.seed", "lcdd.warmup_steps"):
    section, field = name.split(".")
    v = cfg[section][field]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise app.UsageError(f"--config.{name}={v!r}: use an integer >= 0.")
  m = cfg.diagnosis.num_buckets
  if isinstance(m, bool) or not isinstance(m, int) or m < 2:
    raise app.UsageError(f"--config.diagnosis.num_buckets={m!r}: use an integer >= 2.")
  for name in ("buckets.learning_rate", "sft.learning_rate"):
    section, field = name.split(".")
    v = cfg[section][field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
      raise app.UsageError(f"--config.{name}={v!r}: use a number > 0.")
  if cfg.eraser.eval_every > cfg.eraser.num_steps:
    raise app.UsageError(f"--config.eraser.eval_every={cfg.eraser.eval_every} exceeds "
                         f"num_steps={cfg.eraser.num_steps}: no held-out check would pick the "
                         "trigger.")
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "_lcdd_config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "configs", "lcdd.py"))
  lcdd = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lcdd)
  if cfg.lcdd.preset not in lcdd.PRESETS:
    raise app.UsageError(f"--config.lcdd.preset={cfg.lcdd.preset!r}: use one of "
                         f"{', '.join(sorted(lcdd.PRESETS))}.")
  if cfg.cache_dir and os.path.isfile(cfg.cache_dir):
    raise app.UsageError(f"--config.cache_dir={cfg.cache_dir!r} is a file; pass a dir (or '').")


def _validate_smoke(cfg) -> None:
  """The smoke config's values, before anything is written (app.UsageError)."""
  for name, low in (("seed", 0), ("batch_size", 1), ("prompt_len", 1), ("max_new_tokens", 0)):
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise app.UsageError(f"--config.{name}={value!r}: use an integer >= {low}.")
  m = dict(cfg.model)
  std = m.pop("init_std")
  if not std > 0:
    raise app.UsageError(f"--config.model.init_std={std!r}: use a value > 0.")
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim"):
    if not isinstance(m.get(name), int) or m[name] < 1:
      raise app.UsageError(f"--config.model.{name}={m.get(name)!r}: use an integer >= 1.")
  if m["vocab_size"] <= FIRST_ID:
    raise app.UsageError(f"--config.model.vocab_size={m['vocab_size']}: use > {FIRST_ID} (ids "
                         f"0-{FIRST_ID - 1} are special).")
  from cast_jax.models import ModelConfig
  try:
    ModelConfig(**m)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--config.model: {e}") from None


def _smoke_main():
  """The smoke run: random checkpoint round trip, greedy generation, per-head KL table."""
  import jax
  import jax.numpy as jnp
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from cast_jax import workdir as wd
  from cast_jax.diagnosis import ablate_each_head
  from cast_jax.generate import generate
  from cast_jax.models import ModelConfig, forward, init_params, load_pretrained, save_pretrained

  cfg = _CONFIG.value
  out = _WORKDIR.value
  common.write_config(out, cfg)
  m = dict(cfg.model)
  std = m.pop("init_std")
  config = ModelConfig(**m, eos_token_ids=(2,), pad_token_id=0, bos_token_id=1)
  key = jax.random.PRNGKey(cfg.seed)
  common.stage(f"round trip: random {config.model_type} checkpoint -> save_pretrained -> load")
  with tempfile.TemporaryDirectory() as tmp:
    path = save_pretrained(init_params(config, key, std=std), config, os.path.join(tmp, "ckpt"))
    config, params = load_pretrained(path)
    logging.info("round-tripped a random %s checkpoint through %s", config.model_type, path)

  common.stage(f"greedy generation: {cfg.batch_size} prompts x {cfg.max_new_tokens} tokens")
  rng = np.random.default_rng(cfg.seed)
  ids = rng.integers(FIRST_ID, config.vocab_size, size=(cfg.batch_size, cfg.prompt_len))
  gen = generate(params, config, ids, max_new_tokens=cfg.max_new_tokens)
  for i, row in enumerate(gen.trimmed()):
    print(f"prompt {i}: {ids[i].tolist()}\n  greedy -> {row}")

  # Per-head sanity: KL(full || head ablated) of next-token distributions, all heads in one jit.
  common.stage(f"head ablation: {config.num_layers} layers x {config.num_heads} heads")
  x = jnp.asarray(ids)
  base = jax.nn.log_softmax(forward(params, config, x))

  def kl_without(head_mask):
    lp = jax.nn.log_softmax(forward(params, config, x, head_mask=head_mask))
    return jnp.mean(jnp.sum(jnp.exp(base) * (base - lp), -1))

  table = np.asarray(jax.jit(lambda: ablate_each_head(kl_without, config))())
  print("\nKL(full || one head ablated), rows = layers, cols = heads")
  print("      " + " ".join(f"h{h:<6d}" for h in range(config.num_heads)))
  for l, row in enumerate(table):
    print(f"L{l:<4d} " + " ".join(f"{v:.5f}" for v in row))
  if not (np.all(table >= 0) and np.all(np.isfinite(table))):
    raise FloatingPointError(f"head-ablation KL must be finite and >= 0; got min {table.min()}.")

  fig, ax = plt.subplots(figsize=(6, 3))
  im = ax.imshow(table, cmap="viridis", aspect="auto")
  ax.set(xlabel="head", ylabel="layer", title="KL(full || head ablated)")
  fig.colorbar(im, ax=ax)
  wd.save_figure(fig, os.path.join(out, "head_ablation.png"))
  wd.write_json(os.path.join(out, "metrics.json"), {
      "generated_lengths": gen.lengths, "head_ablation_kl": table,
      "most_important_head": np.unravel_index(table.argmax(), table.shape)})
  common.stage(f"wrote {out}")


def _demo_main():
  """The end-to-end demo (module doc)."""
  from cast_jax import report as report_lib
  from cast_jax import workdir as wd
  from cast_jax.testbed.build import TestbedSpec
  from launch import demo_report
  from launch import demo_stages as S

  cfg = _CONFIG.value
  out = _WORKDIR.value
  common.write_config(out, cfg)
  t0 = time.time()
  d = lambda name: os.path.join(out, name)
  recs = {}
  recs["testbed"] = S.run_stage(
      out, "testbed", "world, tokenizer, tiny Llama pretrained from scratch (~6 min cold; cached "
      "after the first run)", {"key": TestbedSpec().key(), "cache_dir": cfg.cache_dir,
                               "aligned": cfg.build_aligned},
      lambda: S.testbed(cfg),
      still_valid=lambda r: os.path.isfile(os.path.join(r["base_dir"], "config.json")))
  tb = recs["testbed"]["result"]
  recs["diagnosis"] = S.run_stage(
      out, "diagnosis", "CAST conflict map of the base model (launch.diagnose)",
      {"testbed": tb["key"], **cfg.diagnosis.to_dict()},
      lambda: S.diagnosis(cfg, tb, d("diagnosis")), stage_dir=d("diagnosis"))
  recs["buckets"] = S.run_stage(
      out, "buckets", "reduced bucket experiment: Full SFT, Random, B1, BM (one seed)",
      {"testbed": tb["key"], "diagnosis": cfg.diagnosis.to_dict(), **cfg.buckets.to_dict()},
      lambda: S.buckets(cfg, tb, d("diagnosis"), d("cast")), stage_dir=d("cast"))
  recs["sft"] = S.run_stage(
      out, "sft", "SFT on the fixed-response behaviour (launch.sft)",
      {"testbed": tb["key"], **cfg.sft.to_dict()}, lambda: S.sft(cfg, tb, d("sft")),
      stage_dir=d("sft"))
  sft_model = recs["sft"]["result"]["model"]
  recs["lcdd"] = S.run_stage(
      out, "lcdd", "LCDD carrier between the base and SFT models (launch.lcdd)",
      {"testbed": tb["key"], "sft": cfg.sft.to_dict(), **cfg.lcdd.to_dict()},
      lambda: S.lcdd(cfg, tb, sft_model, d("lcdd")), stage_dir=d("lcdd"))
  recs["eraser"] = S.run_stage(
      out, "eraser", "SFT-Eraser trigger on the LCDD model, then Base / SFT / LCDD / "
      "LCDD+Trigger on held-out prompts (launch.eraser)",
      {"testbed": tb["key"], "sft": cfg.sft.to_dict(), "lcdd": cfg.lcdd.to_dict(),
       **cfg.eraser.to_dict()},
      lambda: S.eraser(cfg, tb, sft_model, d("lcdd"), d("eraser")), stage_dir=d("eraser"))
  total = time.time() - t0
  common.stage("writing report.md / report.html")
  text = demo_report.report_markdown(recs, total)
  md_path, html_path = report_lib.write_report(out, text, title="cast-jax demo")
  wd.write_json(os.path.join(out, "metrics.json"), {
      "seconds": {k: v["seconds"] for k, v in recs.items()}, "total_this_run_s": total,
      **{k: v["result"] for k, v in recs.items()}})
  ev = recs["eraser"]["result"]["eval"]
  rate = lambda n: ev["models"][n][ev.get("headline", "fixed_response_rate")]
  kl = lambda k: ev["kl"][k]["mean"]
  print(f"\nfixed-response rate: Base {rate('Base'):.3f}, SFT {rate('SFT'):.3f}, LCDD "
        f"{rate('LCDD'):.3f}, LCDD+Trigger {rate('LCDD+Trigger'):.3f}; KL(SFT||LCDD) "
        f"{kl('SFT||LCDD'):.4f}, KL(SFT||Trig) {kl('SFT||LCDD+Trigger'):.4f}, KL(Base||Trig) "
        f"{kl('Base||LCDD+Trigger'):.4f}")
  print(f"report: {md_path}\n        {html_path}")
  common.stage(f"wrote {out}")


def main(argv):
  del argv
  from cast_jax.models.sharding import maybe_initialize_distributed
  maybe_initialize_distributed()  # no-op on one host
  if _CONFIG.value.get("mode") == "smoke":
    _smoke_main()
  else:
    _demo_main()


if __name__ == "__main__":
  common.run(main, validate=_validate)
