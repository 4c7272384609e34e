"""LCDD: from a base and an SFT checkpoint to a sparse behavioural carrier (issue 11).

  python -m launch.lcdd --base=<HF dir> --sft=<HF dir> --data=<file or hub id>
      --workdir=/tmp/lcdd [--config=configs/lcdd.py:safety_qwen --config.num_steps=2000] [-v 0]

--config.data.behaviour (fixed_response | safety | style; the preset's by default) picks the
schema of --data and the pairs come from `carrier_jax.behaviours.load_behaviour_pairs` with the
same sample settings as launch/sft.py, so LCDD sees the SFT stage's pairs.
The tokenizer is the SFT checkpoint's. The run trains in <workdir>/train (metrics.jsonl, orbax
checkpoints; a re-run resumes it) and writes `carrier_jax.outputs`' artifacts into <workdir>:
carrier/, lcdd_model/ (merged HF checkpoint), active_channels.json, sparsity.json and the
plots, plus config.json and summary.json (its stop_reason names the early-stop rule that
fired). --config.task_loss=kl distils to the SFT model instead of its cross-entropy
(--config.teacher=online | cached); --config.shard=True runs the step on all devices.
"""

import json
import os

from absl import app, flags

from launch import common

_CONFIG, _WORKDIR = common.define_flags("lcdd.py")
_BASE = flags.DEFINE_string("base", None, "Base model: HF checkpoint dir (W_base).")
_SFT = flags.DEFINE_string("sft", None, "SFT model: HF checkpoint dir (W_ft) with the tokenizer.")
_DATA = flags.DEFINE_string("data", None, "Behaviour dataset: local file or hub id, in the "
                            "schema of --config.data.behaviour.")


def _settings(cfg):
  """The library dataclasses of `cfg` (app.UsageError naming the section on a bad value)."""
  from carrier_jax import GateInit, GateOptimizerConfig, MultiplierConfig
  from carrier_jax.early_stop import stop_config
  from cast_jax.train import OptimizerConfig
  out = {}
  for name, build, section in (("multiplier", MultiplierConfig, cfg.multiplier),
                               ("gates", GateOptimizerConfig, cfg.gates),
                               ("gate_init", GateInit, cfg.gate_init),
                               ("delta", OptimizerConfig, cfg.delta)):
    try:
      out[name] = build(**section.to_dict())
    except (TypeError, ValueError) as e:
      raise app.UsageError(f"--config.{name}: {e}") from None
  try:
    out["stop"] = stop_config(**cfg.stop.to_dict())
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--config.stop: {e}") from None
  out["delta"] = None if cfg.mask_only else out["delta"]
  return out


def _validate(cfg) -> None:
  """Flags and config checked before anything is loaded (app.UsageError)."""
  for flag in (_BASE, _SFT):
    if not flag.value or not os.path.isfile(os.path.join(flag.value, "config.json")):
      raise app.UsageError(f"--{flag.name}={flag.value!r}: pass an HF checkpoint dir (with "
                           "config.json).")
  if not _DATA.value:
    raise app.UsageError("--data: pass the behaviour dataset (a local file or a hub id).")
  from carrier_jax.behaviours import BEHAVIOURS
  if cfg.data.behaviour not in BEHAVIOURS:
    raise app.UsageError(f"--config.data.behaviour={cfg.data.behaviour!r}: use one of "
                         f"{BEHAVIOURS}.")
  if cfg.data.behaviour == "fixed_response" and not cfg.data.fixed_response:
    raise app.UsageError("--config.data.fixed_response is empty: the fixed_response behaviour "
                         "needs its target string.")
  for name in ("num_samples", "sample_seed"):
    value = cfg.data[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise app.UsageError(f"--config.data.{name}={value!r}: use an integer >= 0.")
  positive = {"batch_size": cfg.batch_size, "accum_steps": cfg.accum_steps,
              "log_every": cfg.log_every, "epochs": cfg.epochs, "data.max_len": cfg.data.max_len,
              "teacher_top_k": cfg.teacher_top_k, "mesh_model": cfg.mesh_model}
  for name, value in positive.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise app.UsageError(f"--config.{name}={value!r}: use an integer >= 1.")
  from carrier_jax.distill import TASK_LOSSES, TEACHERS
  if cfg.task_loss not in TASK_LOSSES:
    raise app.UsageError(f"--config.task_loss={cfg.task_loss!r}: use one of {TASK_LOSSES}.")
  if cfg.teacher not in TEACHERS:
    raise app.UsageError(f"--config.teacher={cfg.teacher!r}: use one of {TEACHERS}.")
  from carrier_jax.lcdd import REMAT_MODES
  if cfg.remat not in REMAT_MODES:
    raise app.UsageError(f"--config.remat={cfg.remat!r}: use one of {tuple(REMAT_MODES)}.")
  if not (isinstance(cfg.kl_budget_floor, (int, float)) and cfg.kl_budget_floor >= 0):
    raise app.UsageError(f"--config.kl_budget_floor={cfg.kl_budget_floor!r}: use a value >= 0.")
  for name in ("num_steps", "checkpoint_every"):
    if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] < 0:
      raise app.UsageError(f"--config.{name}={cfg[name]!r}: use an integer >= 0 (0: default).")
  _settings(cfg)


def _examples(cfg, tokenizer):
  from carrier_jax.behaviours import load_behaviour_pairs
  from cast_jax import data
  pairs = load_behaviour_pairs(cfg.data.behaviour, _DATA.value, n=cfg.data.num_samples or None,
                               seed=cfg.data.sample_seed, fixed_response=cfg.data.fixed_response,
                               subset=cfg.data.subset or None, split=cfg.data.split or None)
  return data.encode_dataset(tokenizer, pairs, max_len=cfg.data.max_len, name=_DATA.value)


def main(argv):
  del argv
  import jax.numpy as jnp
  import transformers

  from carrier_jax.outputs import write_outputs
  from carrier_jax.run import run_lcdd
  from cast_jax import models
  from cast_jax import workdir as wd
  from cast_jax.data import steps_per_epoch

  cfg = _CONFIG.value
  out = _WORKDIR.value
  s = _settings(cfg)
  common.write_config(out, cfg, base=os.path.abspath(_BASE.value),
                      sft=os.path.abspath(_SFT.value), data=_DATA.value)
  common.stage("loading the base and SFT checkpoints")
  config, base = models.load_pretrained(_BASE.value)
  sft_config, ft = models.load_pretrained(_SFT.value)
  if sft_config != config:
    raise ValueError(f"--base and --sft are different architectures:\n{config}\n{sft_config}")
  tokenizer = transformers.AutoTokenizer.from_pretrained(_SFT.value)
  common.stage(f"encoding {_DATA.value}")
  examples = _examples(cfg, tokenizer)
  num_steps = cfg.num_steps or cfg.epochs * steps_per_epoch(len(examples), cfg.batch_size)
  pad_id = tokenizer.pad_token_id
  pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
  mesh = None
  if cfg.shard:
    from cast_jax.models import sharding
    mesh = sharding.make_mesh(model=cfg.mesh_model)
  common.stage(f"LCDD: {len(examples)} examples, {num_steps} steps, task loss {cfg.task_loss}")
  carrier, controller, summary = run_lcdd(
      base, ft, config, examples, pad_id=pad_id, num_steps=num_steps,
      batch_size=cfg.batch_size, seed=cfg.seed, delta_optimizer=s["delta"],
      gate_optimizer=s["gates"], multiplier=s["multiplier"], gate_init=s["gate_init"],
      train_norms=cfg.train_norms, accum_steps=cfg.accum_steps, stop=s["stop"],
      workdir=os.path.join(out, "train"), checkpoint_every=cfg.checkpoint_every or None,
      log_every=cfg.log_every, remat=cfg.remat, task_loss=cfg.task_loss, teacher=cfg.teacher,
      teacher_top_k=cfg.teacher_top_k, mesh=mesh,
      budget_floor=cfg.kl_budget_floor if cfg.task_loss == "kl" else 0.0)
  common.stage("writing the carrier, the merged model, sparsity and plots")
  # The artifacts are a function of the finished run: a re-run rewrites them.
  paths = write_outputs(out, config=config, base_params=base, carrier=carrier,
                        controller=controller,
                        metrics_path=os.path.join(out, "train", "metrics.jsonl"),
                        dtype=jnp.dtype(cfg.export_dtype) if cfg.export_dtype else None,
                        overwrite=True)
  wd.write_json(os.path.join(out, "summary.json"), {**summary, "num_examples": len(examples)})
  with open(paths["sparsity"]) as f:
    report = json.load(f)
  print(f"\nstop: {summary['stop_reason']} at step {summary['final_step']}")
  print(f"gate sparsity {report['gate_sparsity']['overall']:.4f}, dW entries masked "
        f"{report['delta_sparsity']['overall']:.4f}, lambda {report['controller']['lam']:.4g}")
  print(f"outputs in {out}")


if __name__ == "__main__":
  common.run(main, validate=_validate)
