"""`run_lcdd`: a base and a fine-tuned model plus behaviour examples -> a trained carrier, the
one LCDD entry point (Algorithm 1 through the substrate trainer; `launch/lcdd.py` calls it)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from carrier_jax import distill
from carrier_jax import sharding as carrier_sharding
from carrier_jax.delta import init_carrier
from carrier_jax.early_stop import StopConfig, make_stop_fn
from carrier_jax.gates import GateInit
from carrier_jax.lcdd import (GateOptimizerConfig, build_lcdd_optimizer, check_task_loss,
                              make_lcdd_train_step)
from carrier_jax.multiplier import MultiplierConfig, MultiplierState, find_multiplier_state
from cast_jax.data.batching import Example, iterate_train_batches
from cast_jax.models import ModelConfig
from cast_jax.models import sharding as model_sharding
from cast_jax.train import OptimizerConfig, TrainState, build_optimizer, train
from cast_jax.train.fingerprint import make_fingerprint
from cast_jax.train.losses import check_sft_batch, check_sft_examples

Params = dict[str, Any]


def _resumable_stop_fn(cfg: StopConfig, budget_ratio: float, metrics_path: str | None):
  """`make_stop_fn` whose history is the rows of metrics.jsonl logged before its first call.

  The loop truncates metrics.jsonl to the resumed step before training and writes each log row
  before calling stop_fn, so at the first call the file holds exactly the rows an uninterrupted
  run would have seen, plus the current one (dropped here: stop_fn appends it itself).
  """
  inner = None

  def stop_fn(step, metrics):
    nonlocal inner
    if inner is None:
      history = []
      if metrics_path is not None and os.path.exists(metrics_path):
        with open(metrics_path) as f:
          history = [r for r in map(json.loads, f) if r["step"] < step]
      inner = make_stop_fn(cfg, budget_ratio, history)
    return inner(step, metrics)

  return stop_fn


def run_lcdd(base_params: Params, ft_params: Params, config: ModelConfig,
             examples: Sequence[Example], *, pad_id: int, num_steps: int, batch_size: int,
             seed: int, delta_optimizer: OptimizerConfig | None,
             gate_optimizer: GateOptimizerConfig = GateOptimizerConfig(),
             multiplier: MultiplierConfig = MultiplierConfig(), gate_init: GateInit = GateInit(),
             train_norms: bool = False, accum_steps: int = 1, stop: StopConfig | None = None,
             workdir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
             log_every: int = 10, pad_multiple: int = 16, buckets: Sequence[int] | None = None,
             remat: bool | str = "full", per_sequence: bool = False, progress: bool = True,
             extend: bool = False, overwrite: bool = False, task_loss: str = "ce",
             teacher: str = "online", teacher_top_k: int = 64, budget_floor: float = 0.0,
             mesh: Mesh | None = None
             ) -> tuple[Params, MultiplierState, dict]:
  """Trains an LCDD carrier between `base_params` and `ft_params` on `examples`.

  Args:
    base_params, ft_params: full param pytrees of one architecture (docs/design.md); the base
      model is the frozen tree (embeddings, norms, head and W_base), never modified.
    config: their ModelConfig.
    examples: (input_ids int32 [T_i], loss_mask int32 [T_i]) pairs (`data.encode_dataset`).
    pad_id, batch_size, seed, pad_multiple, buckets: batching as in `cast_jax.train.run_sft`
      (the data order is a pure function of (seed, step), so a resumed run is exact); `seed`
      also draws the gate logits (fold 0) and seeds the step keys (fold 1).
    num_steps: train-step calls (micro-steps; optimizer updates are num_steps // accum_steps).
    delta_optimizer: AdamW settings of dW (accum_steps 1), or None for mask-only LCDD.
    gate_optimizer, multiplier, gate_init, train_norms, accum_steps: see
      `build_lcdd_optimizer`, `MultiplierConfig`, `GateInit` and `init_carrier`.
    stop: early-stop rules (None: run all num_steps), checked every `log_every` steps.
    workdir, checkpoint_every, log_every, progress, extend, overwrite: as for
      `cast_jax.train.train` (metrics.jsonl, orbax checkpoints, resume, run fingerprint).
    remat, per_sequence: see `make_lcdd_loss_fn`.
    task_loss, teacher: "ce" (default), or "kl" to `ft_params` with the teacher "online"
      (recomputed each step) or "cached" (top-`teacher_top_k` logits built once before
      training, `distill.build_teacher_cache`; a resume rebuilds the same cache).
    budget_floor: lower bound of the controller's budget (`multiplier_controller`); set it
      (e.g. 0.01) for task_loss="kl", whose loss starts at ~0.
    mesh: run the step sharded on this ('data', 'model') mesh (`carrier_jax.sharding`); None
      runs it where jax puts it (one device). Not part of the run's fingerprint: it changes
      where the step runs, not what it computes.

  Returns:
    (carrier {"gates", "delta"}, the final MultiplierState, the trainer's summary dict).
  """
  check_sft_examples(examples, config.vocab_size, pad_id)
  check_task_loss(task_loss, teacher)
  key = jax.random.PRNGKey(seed)
  carrier = init_carrier(config, base_params, ft_params, jax.random.fold_in(key, 0),
                         gate_init=gate_init, train_norms=train_norms)
  tx = build_lcdd_optimizer(delta_optimizer, gate_optimizer, multiplier=multiplier,
                            accum_steps=accum_steps, budget_floor=budget_floor)
  lr_fn = None
  if delta_optimizer is not None:
    lr_fn = build_optimizer(dataclasses.replace(delta_optimizer, accum_steps=accum_steps))[1]
  state = TrainState.create(carrier, tx, jax.random.fold_in(key, 1))
  step = make_lcdd_train_step(config, tx, remat=remat, per_sequence=per_sequence,
                              task_loss=task_loss, teacher=teacher)
  online = task_loss == "kl" and teacher == "online"
  cache = None
  if task_loss == "kl" and teacher == "cached":
    cache = distill.build_teacher_cache(ft_params, config, examples, top_k=teacher_top_k,
                                        pad_id=pad_id, batch_size=batch_size,
                                        pad_multiple=pad_multiple)
  frozen = {"base": base_params, "teacher": ft_params} if online else base_params
  if mesh is not None:
    param_sh = model_sharding.param_shardings(config, mesh)
    frozen = jax.device_put(frozen, {"base": param_sh, "teacher": param_sh} if online
                            else param_sh)
    state = carrier_sharding.shard_state(state, config, mesh)

  def batches_fn(start):
    items = iterate_train_batches(examples, batch_size=batch_size, seed=seed, pad_id=pad_id,
                                  start_step=start, multiple=pad_multiple, buckets=buckets)
    if cache is not None:
      batches = distill.cached_batches(examples, cache, items, batch_size=batch_size, seed=seed)
    else:
      batches = (b for _, _, b in items)
    if mesh is not None:
      batches = (carrier_sharding.shard_batch(b, mesh) for b in batches)
    return batches

  metrics_path = None if workdir is None else os.path.join(os.fspath(workdir), "metrics.jsonl")
  stop_fn = None if stop is None else _resumable_stop_fn(stop, multiplier.budget_ratio,
                                                         metrics_path)
  fingerprint = None if workdir is None else make_fingerprint(
      data=examples, seed=seed, batch_size=batch_size, pad_id=pad_id, model=config,
      delta_optimizer=delta_optimizer, gate_optimizer=gate_optimizer, multiplier=multiplier,
      gate_init=gate_init, train_norms=train_norms, accum_steps=accum_steps,
      pad_multiple=pad_multiple, buckets=buckets, per_sequence=per_sequence, stop=stop,
      # Only when set, so the runs made before the option existed keep their fingerprints.
      **({} if task_loss == "ce" else {"task_loss": task_loss, "teacher": teacher,
                                       "teacher_top_k": teacher_top_k if teacher == "cached"
                                       else None}),
      **({} if budget_floor == 0 else {"budget_floor": budget_floor}))
  state, summary = train(step, state, frozen, batches_fn, num_steps=num_steps,
                         workdir=workdir, checkpoint_every=checkpoint_every, lr_fn=lr_fn,
                         check_batch=check_sft_batch, stop_fn=stop_fn, progress=progress,
                         log_every=log_every, fingerprint=fingerprint, extend=extend,
                         overwrite=overwrite)
  return state.trainable, find_multiplier_state(state.opt_state), summary
