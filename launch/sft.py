"""The SFT stage of LCDD (issue 11): full fine-tuning of a base checkpoint on a behaviour -> W_ft.

  python -m launch.sft --base=<HF dir> --data=<file or hub id> --behaviour=fixed_response
      --workdir=/tmp/sft [--config.num_steps=300 --config.optimizer.learning_rate=3e-4] [-v 0]

--behaviour picks the schema of --data (`carrier_jax.behaviours`): fixed_response (Alpaca),
safety (WildJailbreak, harmful / benign 1:1) or style (modern / Shakespeare pairs). Training
runs through `cast_jax.train.sft.run_sft` in <workdir>/train (metrics.jsonl, orbax checkpoints,
the run's fingerprint; a re-run resumes it). The fine-tuned model is exported with --base's
tokenizer to <workdir>/sft_model, the `--sft` of launch/lcdd.py; config.json, metrics.json and
loss.png go into <workdir>.
"""

import json
import os
import time

from absl import app, flags

from launch import common

_CONFIG, _WORKDIR = common.define_flags("sft.py")
_BASE = flags.DEFINE_string("base", None, "Base model: HF checkpoint dir with its tokenizer.")
_DATA = flags.DEFINE_string("data", None, "Behaviour dataset: local file or hub id.")
_BEHAVIOUR = flags.DEFINE_string("behaviour", None,
                                 "fixed_response | safety | style (the schema of --data).")


def _optimizer(cfg, num_updates: int):
  """OptimizerConfig of cfg.optimizer; a decaying schedule spans the run's `num_updates`."""
  from cast_jax.train import OptimizerConfig
  o = cfg.optimizer.to_dict()
  return OptimizerConfig(**o, total_steps=max(num_updates, o.get("warmup_steps", 0) + 1))


def _validate(cfg) -> None:
  """Flags and config checked before anything is loaded or written (app.UsageError)."""
  from carrier_jax.behaviours import BEHAVIOURS
  if not _BASE.value or not os.path.isfile(os.path.join(_BASE.value, "config.json")):
    raise app.UsageError(f"--base={_BASE.value!r}: pass an HF checkpoint dir (with config.json "
                         "and the tokenizer).")
  if not _DATA.value:
    raise app.UsageError("--data: pass the behaviour dataset (a local file or a hub id).")
  if _BEHAVIOUR.value not in BEHAVIOURS:
    raise app.UsageError(f"--behaviour={_BEHAVIOUR.value!r}: use one of {BEHAVIOURS}.")
  if _BEHAVIOUR.value == "fixed_response" and not cfg.data.fixed_response:
    raise app.UsageError("--config.data.fixed_response is empty: the fixed_response behaviour "
                         "needs its target string.")
  positive = {"batch_size": cfg.batch_size, "epochs": cfg.epochs, "log_every": cfg.log_every,
              "data.max_len": cfg.data.max_len}
  for name, value in positive.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise app.UsageError(f"--config.{name}={value!r}: use an integer >= 1.")
  for name, value in {"num_steps": cfg.num_steps, "checkpoint_every": cfg.checkpoint_every,
                      "data.num_samples": cfg.data.num_samples,
                      "data.sample_seed": cfg.data.sample_seed, "seed": cfg.seed}.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise app.UsageError(f"--config.{name}={value!r}: use an integer >= 0.")
  if cfg.export_dtype not in ("", "float32", "bfloat16", "float16"):
    raise app.UsageError(f"--config.export_dtype={cfg.export_dtype!r}: use '', float32, "
                         "bfloat16 or float16.")
  try:
    _optimizer(cfg, 1)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--config.optimizer: {e}") from None


def _pairs(cfg):
  from carrier_jax.behaviours import load_behaviour_pairs
  return load_behaviour_pairs(_BEHAVIOUR.value, _DATA.value, n=cfg.data.num_samples or None,
                              seed=cfg.data.sample_seed, fixed_response=cfg.data.fixed_response,
                              subset=cfg.data.subset or None, split=cfg.data.split or None)


def _loss_plot(metrics_path: str, png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from cast_jax import workdir as wd
  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
  ax.set(title=f"SFT loss ({_BEHAVIOUR.value})", xlabel="step", ylabel="cross-entropy")
  wd.save_figure(fig, png)


def main(argv):
  del argv
  import jax.numpy as jnp
  import transformers

  from cast_jax import data, models
  from cast_jax import workdir as wd
  from cast_jax.train.sft import run_sft

  cfg = _CONFIG.value
  out = _WORKDIR.value
  common.write_config(out, cfg, base=os.path.abspath(_BASE.value), data=_DATA.value,
                      behaviour=_BEHAVIOUR.value)
  common.stage(f"loading {_BASE.value}")
  config, params = models.load_pretrained(_BASE.value)
  tokenizer = transformers.AutoTokenizer.from_pretrained(_BASE.value)
  common.stage(f"building {_BEHAVIOUR.value} pairs from {_DATA.value}")
  pairs = _pairs(cfg)
  examples = data.encode_dataset(tokenizer, pairs, max_len=cfg.data.max_len, name=_DATA.value)
  num_steps = cfg.num_steps or cfg.epochs * data.steps_per_epoch(len(examples), cfg.batch_size)
  if num_steps < 1:
    raise ValueError(f"{len(examples)} examples make no batch of {cfg.batch_size}; lower "
                     "--config.batch_size or set --config.num_steps.")
  pad_id = tokenizer.pad_token_id
  pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
  optimizer = _optimizer(cfg, num_steps // cfg.optimizer.accum_steps)
  common.stage(f"SFT: {len(examples)} examples, {num_steps} steps at lr "
               f"{optimizer.learning_rate:g}")
  t0 = time.time()
  ft, summary = run_sft(params, config, examples, pad_id=pad_id, num_steps=num_steps,
                        batch_size=cfg.batch_size, seed=cfg.seed, optimizer=optimizer,
                        workdir=os.path.join(out, "train"),
                        checkpoint_every=cfg.checkpoint_every or None, remat=cfg.remat,
                        log_every=cfg.log_every)
  train_s = time.time() - t0
  common.stage("exporting the SFT model")
  # The export is a function of the finished run (resumed or not): a re-run rewrites it.
  models.save_pretrained(ft, config, os.path.join(out, "sft_model"), tokenizer=tokenizer,
                         dtype=jnp.dtype(cfg.export_dtype) if cfg.export_dtype else None,
                         overwrite=True)
  metrics_path = os.path.join(out, "train", "metrics.jsonl")
  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  metrics = {"num_examples": len(examples), "num_steps": num_steps,
             "first_loss": rows[0]["loss"] if rows else None,
             "final_loss": rows[-1]["loss"] if rows else None,
             "wall_s_this_run": train_s,
             "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str,
                                                                            bool, type(None)))}}
  wd.write_json(os.path.join(out, "metrics.json"), metrics)
  if rows:
    _loss_plot(metrics_path, os.path.join(out, "loss.png"))
  print(f"\nSFT loss {metrics['first_loss']} -> {metrics['final_loss']} over {num_steps} steps")
  print(f"W_ft in {os.path.join(out, 'sft_model')}")


if __name__ == "__main__":
  common.run(main, validate=_validate)
