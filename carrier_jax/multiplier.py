"""The adaptive multiplier for "task loss <= budget" (lcdd-sft-eraser.md 3.2, Algorithm 1, F.2).

LCDD solves Eq. 4, min sum_i sigmoid(theta_i) s.t. L_task <= eps, with the penalty form of
Algorithm 1 line 9, `L = L_task + lambda_t * rho_t * L_sparsity`, and an online multiplier.
Per optimizer update t = 1, 2, ... (Algorithm 1):

  rho_t   = min(1, t / T_w)                                          (line 4, sparsity warmup)
  Lhat_t  = beta * Lhat_{t-1} + (1 - beta) * L_task,t                (line 13)
  eps     = Lhat_{T_w} * (1 + r)            fixed once, at t = T_w   (lines 14-15)
  v_t     = (Lhat_t - eps) / eps                                     (line 18)
  lambda_{t+1} = clip(lambda_t * exp(-eta * v_t), lambda_min, lambda_max)   (line 19)

Choices where Algorithm 1 is silent or the paper adds variants:
  * eps does not exist before t = T_w, so v_t is undefined there: lambda stays at lambda_0
    during warmup, and the first multiplicative update is the one at t = T_w itself (line 18
    follows line 15 in the same iteration, giving v = -r / (1 + r) < 0: lambda grows).
  * Lhat_0 = L_task (line 1): the loss of the first update is measured at the initial carrier,
    so `ema_init="first"` sets Lhat_1 = L_task,1. `ema_init="bias_corrected"` is the Adam-style
    alternative, Lhat_t = m_t / (1 - beta^t) with m_0 = 0 (the same at t = 1, then weighting
    the first losses less).
  * Table 7's asymmetric controller: a separate, smaller growth rate eta_up is used when
    v_t < 0 (lambda grows), eta when v_t >= 0. F.2 pairs it with lambda_max in {0.02, 0.05};
    the paper gives no lambda_min, so the defaults here are (0, inf), i.e. no bounds.
  * `violation_clip`: optional |v_t| <= c, bounding one update's factor to exp(eta * c).
  * beta: 0.95 default, 0.90 for F.2's Qwen / Vicuna safety and Shakespeare runs.
  * `budget_floor` (an argument of `multiplier_controller`, default 0): eps = max(Lhat_{T_w} *
    (1 + r), floor). A relative budget needs a task loss that is not ~0 at T_w; the KL to the
    SFT model (`task_loss="kl"`) starts at ~0 when LCDD starts from the SFT model, and a
    budget of ~0 would make v_t explode. The floor is then the absolute KL tolerance.

The controller is an `optax.GradientTransformationExtraArgs` (`multiplier_controller`): it
passes the gradient updates through untouched and advances its state from the keyword argument
`value`, the micro-batch's task loss, which `make_train_step(tx_extra_args=...)` hands to
`tx.update`. Its state therefore lives in (and is checkpointed with) the optimizer state, and a
non-finite step, which keeps the old optimizer state, leaves it untouched too. The loss reads
lambda * rho from it through `make_train_step(opt_state_view=multiplier_view)`.

With gradient accumulation (k micro-batches per optimizer update) the controller counts
optimizer updates: it sums the task loss over the k micro-steps and updates once, on the k-th,
with their mean; lambda and rho stay fixed inside the window. It must sit outside
`optax.MultiSteps` (as `build_lcdd_optimizer` places it): MultiSteps keeps its inner state only
from the emitting micro-step and forwards only that micro-step's extra arguments, so an inner
controller would see the last micro-batch's loss instead of the window's mean.

State (`MultiplierState`, float32 scalars unless noted; the view logs them as
"extra/multiplier/<name>"):
  lam       lambda in effect for the next update (lambda_t)
  rho       rho in effect for the next update
  ema       Lhat_t (bias-corrected when ema_init="bias_corrected")
  ema_raw   the EMA accumulator (equal to ema for ema_init="first")
  budget    eps (0 until fixed at t = T_w)
  violation v_t of the last update (0 during warmup)
  updates   t, optimizer updates so far (int32)
  micro     micro-steps into the current accumulation window (int32, 0 when k = 1)
  loss_sum  task loss summed over the current accumulation window
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

EMA_INITS = ("first", "bias_corrected")


@dataclasses.dataclass(frozen=True)
class MultiplierConfig:
  """Controller settings; the Table 7 columns are budget_ratio (r), lambda_init (lambda_0),
  eta (eta_lambda), eta_up (eta_lambda_up, None = symmetric) and warmup_steps (T_w)."""

  budget_ratio: float = 0.30
  lambda_init: float = 1.0
  eta: float = 0.1
  eta_up: float | None = None
  warmup_steps: int = 300
  beta: float = 0.95
  lambda_min: float = 0.0
  lambda_max: float = math.inf
  violation_clip: float | None = None
  ema_init: str = "first"

  def __post_init__(self):
    def bad(field, fix):
      raise ValueError(f"MultiplierConfig.{field}={getattr(self, field)!r} is invalid: {fix}.")

    if not self.budget_ratio > -1:
      bad("budget_ratio", "use r > -1 so the budget (1 + r) * EMA is positive")
    if not (self.eta >= 0 and (self.eta_up is None or self.eta_up >= 0)):
      bad("eta", "use eta >= 0 and eta_up >= 0 (or None)")
    if int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 1:
      bad("warmup_steps", "use an integer >= 1 (the budget is fixed at update T_w)")
    if not 0 <= self.beta < 1:
      bad("beta", "use 0 <= beta < 1")
    if not 0 <= self.lambda_min <= self.lambda_init <= self.lambda_max:
      bad("lambda_init", "use 0 <= lambda_min <= lambda_init <= lambda_max")
    if self.violation_clip is not None and not self.violation_clip > 0:
      bad("violation_clip", "use a value > 0, or None")
    if self.ema_init not in EMA_INITS:
      bad("ema_init", f"choose from {EMA_INITS}")


class MultiplierState(NamedTuple):
  """The controller state (see the module docstring for the fields)."""

  lam: jax.Array
  rho: jax.Array
  ema: jax.Array
  ema_raw: jax.Array
  budget: jax.Array
  violation: jax.Array
  updates: jax.Array
  micro: jax.Array
  loss_sum: jax.Array


def init_multiplier(cfg: MultiplierConfig) -> MultiplierState:
  """The controller state before the first update (all float32 scalars, the counts int32)."""
  f = lambda x: jnp.asarray(x, jnp.float32)
  i = lambda x: jnp.asarray(x, jnp.int32)
  return MultiplierState(lam=f(cfg.lambda_init), rho=f(min(1.0, 1.0 / cfg.warmup_steps)),
                         ema=f(0.0), ema_raw=f(0.0), budget=f(0.0), violation=f(0.0),
                         updates=i(0), micro=i(0), loss_sum=f(0.0))


def penalty_weight(state: MultiplierState | Mapping[str, jax.Array]) -> jax.Array:
  """lambda_t * rho_t, the weight of L_sparsity in this update's loss (Algorithm 1, line 9).

  `state` is a MultiplierState or its `_asdict()` (what `multiplier_view` hands the loss)."""
  if isinstance(state, MultiplierState):
    state = state._asdict()
  return state["lam"] * state["rho"]


def _controller_update(cfg: MultiplierConfig, state: MultiplierState, task_loss: jax.Array,
                       budget_floor: float = 0.0) -> MultiplierState:
  """One optimizer update t = state.updates + 1 with its mean task loss."""
  t = state.updates + 1
  tf = t.astype(jnp.float32)
  beta = jnp.float32(cfg.beta)
  if cfg.ema_init == "first":
    raw = jnp.where(t == 1, task_loss, beta * state.ema_raw + (1 - beta) * task_loss)
    ema = raw
  else:
    raw = beta * state.ema_raw + (1 - beta) * task_loss
    ema = raw / (1 - beta ** tf)
  budget = jnp.where(t == cfg.warmup_steps,
                     jnp.maximum(ema * (1 + cfg.budget_ratio), budget_floor), state.budget)
  engaged = t >= cfg.warmup_steps
  v = jnp.where(engaged, (ema - budget) / jnp.where(engaged, budget, 1.0), 0.0)
  if cfg.violation_clip is not None:
    v = jnp.clip(v, -cfg.violation_clip, cfg.violation_clip)
  eta = cfg.eta if cfg.eta_up is None else jnp.where(v < 0, cfg.eta_up, cfg.eta)
  lam = jnp.clip(state.lam * jnp.exp(-eta * v), cfg.lambda_min, cfg.lambda_max)
  lam = jnp.where(engaged, lam, state.lam)
  rho = jnp.minimum(1.0, (tf + 1) / cfg.warmup_steps)
  f = lambda x: jnp.asarray(x, jnp.float32)
  return MultiplierState(lam=f(lam), rho=f(rho), ema=f(ema), ema_raw=f(raw), budget=f(budget),
                         violation=f(v), updates=t.astype(jnp.int32),
                         micro=jnp.zeros((), jnp.int32), loss_sum=f(0.0))


def multiplier_controller(cfg: MultiplierConfig, accum_steps: int = 1, *,
                          budget_floor: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """The adaptive multiplier as an optax transformation (identity on the updates).

  Args:
    cfg: the controller settings.
    accum_steps: k, micro-batches per optimizer update (the MultiSteps k of the optimizer it is
      chained with); the controller updates on every k-th call with the window's mean loss.
    budget_floor: the budget's lower bound (module docstring; >= 0, in task-loss units).

  Returns:
    a GradientTransformationExtraArgs: `init(params) -> MultiplierState` (params unused) and
    `update(updates, state, params=None, *, value) -> (updates, new_state)`, `value` the float
    scalar task loss of this micro-batch (before the sparsity term). Jit-traceable.
  """
  if int(accum_steps) != accum_steps or accum_steps < 1:
    raise ValueError(f"multiplier_controller: accum_steps={accum_steps!r}; use an integer >= 1.")
  k = int(accum_steps)
  if not budget_floor >= 0:
    raise ValueError(f"multiplier_controller: budget_floor={budget_floor!r}; use a value >= 0.")
  update = lambda s, loss: _controller_update(cfg, s, loss, budget_floor)

  def init_fn(params):
    del params
    return init_multiplier(cfg)

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    if value is None:
      raise TypeError("multiplier_controller: tx.update needs value=<task loss>; build the step "
                      "with make_train_step(tx_extra_args=lambda m: {'value': m['task_loss']}).")
    loss_sum = state.loss_sum + jnp.asarray(value, jnp.float32)
    if k == 1:
      return updates, update(state, loss_sum)
    acc = state._replace(loss_sum=loss_sum, micro=state.micro + 1)
    new = jax.lax.cond(state.micro == k - 1,
                       lambda s: update(s, s.loss_sum / k), lambda s: s, acc)
    return updates, new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_multiplier_state(opt_state: Any) -> MultiplierState:
  """The (single) MultiplierState inside an optimizer state, e.g. a chain's."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MultiplierState))
           if isinstance(x, MultiplierState)]
  if len(found) != 1:
    raise ValueError(f"find_multiplier_state: the optimizer state holds {len(found)} "
                     "multiplier states; build it with exactly one multiplier_controller.")
  return found[0]


def multiplier_view(opt_state: Any, key: str = "multiplier") -> dict[str, dict[str, jax.Array]]:
  """`opt_state_view` for `cast_jax.train.make_train_step`: {key: the controller state as a
  dict of scalars}, which the LCDD loss reads (`extra[key]`) and the step logs."""
  return {key: find_multiplier_state(opt_state)._asdict()}
