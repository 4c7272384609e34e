"""Optimizer builder and the jit-compiled train step over any trainable pytree."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cast_jax.train.state import TrainState, cast_floating

PyTree = Any
LossFn = Callable[[PyTree, PyTree, Any, jax.Array, PyTree], tuple[jax.Array, dict]]
GradFn = Callable[[PyTree, PyTree, Any, jax.Array, PyTree], tuple[PyTree, jax.Array, dict]]
UpdateExtraFn = Callable[[PyTree, dict, jax.Array], PyTree]
TxExtraArgsFn = Callable[[dict], dict]
OptStateViewFn = Callable[[PyTree], dict]
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW + schedule + clipping + accumulation, from a few numbers.

  Step counts (`warmup_steps`, `total_steps`) are in optimizer updates, i.e. train-step calls
  divided by `accum_steps`. Decay runs from the end of warmup to `total_steps`, ending at
  `learning_rate * end_lr_ratio`.
  """

  learning_rate: float = 1e-4
  schedule: str = "cosine"
  warmup_steps: int = 0
  total_steps: int = 0
  end_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float | None = 1.0
  accum_steps: int = 1

  def __post_init__(self):
    def bad(field, value, fix):
      raise ValueError(f"OptimizerConfig.{field}={value!r} is invalid: {fix}.")

    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      bad("learning_rate", self.learning_rate, "use a finite value > 0")
    if self.schedule not in SCHEDULES:
      bad("schedule", self.schedule, f"use one of {SCHEDULES}")
    if self.warmup_steps < 0:
      bad("warmup_steps", self.warmup_steps, "use >= 0")
    if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
      bad("total_steps", self.total_steps,
          f"a {self.schedule} decay needs total_steps > warmup_steps={self.warmup_steps}; set it "
          "to the number of optimizer updates (train steps // accum_steps)")
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      bad("end_lr_ratio", self.end_lr_ratio, "use a value in [0, 1]")
    if self.weight_decay < 0:
      bad("weight_decay", self.weight_decay, "use >= 0")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
      bad("b1/b2/eps", (self.b1, self.b2, self.eps), "use 0 <= b1, b2 < 1 and eps > 0")
    if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
      bad("grad_clip_norm", self.grad_clip_norm, "use a value > 0, or None to disable clipping")
    if int(self.accum_steps) != self.accum_steps or self.accum_steps < 1:
      bad("accum_steps", self.accum_steps, "use an integer >= 1")


def build_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Learning rate as a function of the optimizer-update count (not the micro-step)."""
  lr, warm = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, cfg.total_steps - warm, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, lr * cfg.end_lr_ratio, cfg.total_steps - warm)
  else:
    decay = optax.constant_schedule(lr)
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def build_optimizer(cfg: OptimizerConfig, *, weight_decay_mask: PyTree | Callable | None = None
                    ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """AdamW with clipping (global norm, applied to the accumulated gradient) and accumulation.

  Args:
    cfg: the optimizer numbers.
    weight_decay_mask: optax `mask` for AdamW's decay (pytree of bools over `trainable`, or a
      callable building one); None decays every leaf.

  Returns:
    tx: the optax transformation, wrapped in `optax.MultiSteps` when `accum_steps > 1` (each
      train-step call is then one micro-batch; the update lands on every accum_steps-th call).
    lr_fn: `lr_fn(step) -> float`, the learning rate the update at micro-step `step` uses
      (for metrics; host-side).
  """
  schedule = build_schedule(cfg)
  parts = [] if cfg.grad_clip_norm is None else [optax.clip_by_global_norm(cfg.grad_clip_norm)]
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=weight_decay_mask))
  tx = optax.chain(*parts)
  k = int(cfg.accum_steps)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)

  # One compiled program instead of a dozen eager ops (each compiled on first use) per call.
  host_schedule = jax.jit(schedule)

  def lr_fn(step: int) -> float:
    return float(host_schedule(int(step) // k))

  return tx, lr_fn


def _scalar_leaves(extra: PyTree) -> dict[str, jax.Array]:
  """Scalar leaves of `extra` as metrics named "extra/<path>" (e.g. the LCDD lambda)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(extra):
    if jnp.ndim(leaf) == 0:
      out["extra/" + jax.tree_util.keystr(path, simple=True, separator="/")] = leaf
  return out


def make_train_step(loss_fn: LossFn | None, tx: optax.GradientTransformation, *,
                    grad_fn: GradFn | None = None, update_extra: UpdateExtraFn | None = None,
                    tx_extra_args: TxExtraArgsFn | None = None,
                    opt_state_view: OptStateViewFn | None = None, compute_dtype: Any = None,
                    donate: bool = True, jit: bool = True
                    ) -> Callable[[TrainState, PyTree, Any], tuple[TrainState, dict]]:
  """Builds `train_step(state, frozen, batch) -> (new_state, metrics)`.

  Args:
    loss_fn: `loss_fn(trainable, frozen, batch, rng, extra) -> (loss scalar, metrics dict of
      scalars)`. `rng` is `fold_in(state.rng, state.step)`.
    tx: the optax transformation `state.opt_state` was built with.
    grad_fn: optional override `grad_fn(trainable, frozen, batch, rng, extra) -> (grads, loss,
      metrics)` (e.g. PCGrad: two gradients, projected). It receives the fp32 trainable tree and
      does its own casting; default: `jax.value_and_grad` of `loss_fn`.
    update_extra: optional `update_extra(extra, metrics, step) -> extra`, run after the
      optimizer update with the loss_fn metrics plus "loss" and "grad_norm", `step` the int32
      index of this step. Must be jit-traceable.
    tx_extra_args: optional `tx_extra_args(metrics) -> dict` of keyword arguments for
      `tx.update` (an `optax.GradientTransformationExtraArgs`), built from the same metrics
      `update_extra` sees, e.g. `lambda m: {"value": m["task_loss"]}` for a transformation that
      reads this step's loss (the LCDD multiplier). None: `tx.update` gets no extra arguments.
    opt_state_view: optional `opt_state_view(opt_state) -> {name: pytree}`: named read-only
      views of optimizer state (e.g. the multiplier's lambda), merged into the `extra` that
      loss_fn / grad_fn receive (so `extra` must then be a dict without those names) and logged
      like `extra`'s scalar leaves, from the state after the update. The state they view is
      checkpointed with `opt_state`.
    compute_dtype: e.g. jnp.bfloat16: the default grad_fn casts the floating trainable leaves to
      it inside the differentiated function, so gradients and the master weights stay fp32.
      Cast `frozen` once yourself (`cast_floating`) to save memory.
    donate: donate the incoming state's buffers (the caller must not reuse `state`).
    jit: compile with jax.jit (False for debugging).

  Returns:
    train_step. Its metrics hold the loss_fn metrics plus "loss" (f32), "grad_norm" (global norm
    of this micro-batch's raw gradient), "finite" (bool: loss and grad_norm finite) and the
    scalar leaves of the new `extra` (and of `opt_state_view`) as "extra/<path>". On a
    non-finite step the returned state is the incoming state unchanged (step not advanced), so
    the caller can stop without a poisoned state or optimizer moments.
  """
  if grad_fn is None:
    if loss_fn is None:
      raise ValueError("make_train_step: give loss_fn, or grad_fn to compute gradients yourself.")

    def scalar_loss(trainable, frozen, batch, rng, extra):
      if compute_dtype is not None:
        trainable = cast_floating(trainable, compute_dtype)
      loss, metrics = loss_fn(trainable, frozen, batch, rng, extra)
      return jnp.asarray(loss, jnp.float32), metrics

    value_and_grad = jax.value_and_grad(scalar_loss, has_aux=True)

    def grad_fn(trainable, frozen, batch, rng, extra):
      (loss, metrics), grads = value_and_grad(trainable, frozen, batch, rng, extra)
      return grads, loss, metrics

  def extra_with_view(state: TrainState) -> PyTree:
    if opt_state_view is None:
      return state.extra
    view = opt_state_view(state.opt_state)
    clash = sorted(set(view) & set(state.extra))
    if clash:
      raise ValueError(f"make_train_step: opt_state_view names {clash} are also keys of "
                       "state.extra; rename one of them.")
    return {**state.extra, **view}

  def train_step(state: TrainState, frozen: PyTree, batch: Any) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    grads, loss, metrics = grad_fn(state.trainable, frozen, batch, rng, extra_with_view(state))
    loss = jnp.asarray(loss, jnp.float32)
    # A custom grad_fn may hand back compute-dtype grads; optax must see the master dtype.
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm}

    def update(state):
      kwargs = {} if tx_extra_args is None else tx_extra_args(metrics)
      updates, opt_state = tx.update(grads, state.opt_state, state.trainable, **kwargs)
      trainable = optax.apply_updates(state.trainable, updates)
      extra = state.extra if update_extra is None else update_extra(state.extra, metrics,
                                                                    state.step)
      new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                          extra=extra)
      # Casting back to the old dtypes keeps the state's signature fixed (no retrace per step).
      return jax.tree.map(lambda n, o: n.astype(jnp.result_type(o)), new, state)

    # A NaN step must not poison the moments / accumulator: it keeps the old state bit for bit.
    # The cond runs the update only on a finite step, instead of computing it and then
    # selecting element-wise between two whole copies of the state.
    new_state = jax.lax.cond(finite, update, lambda s: s, state)
    return new_state, {**metrics, **_scalar_leaves(extra_with_view(new_state)),
                       "finite": finite}

  if not jit:
    return train_step
  return jax.jit(train_step, donate_argnums=(0,) if donate else ())
