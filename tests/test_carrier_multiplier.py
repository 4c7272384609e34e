"""The LCDD multiplier (Algorithm 1, Table 7, F.2) against hand-computed sequences.

Numbers are chosen so each update is exact in binary: beta = 1/2, r = 1 (budget = 2 * EMA at
T_w = 3) and eta = ln 4, so one update multiplies lambda by 4^(-v).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from carrier_jax.multiplier import (MultiplierConfig, find_multiplier_state, init_multiplier,
                                    multiplier_controller, multiplier_view, penalty_weight)
from cast_jax.train import OptimizerConfig, TrainState, build_optimizer, make_train_step

LOSSES = [4.0, 2.0, 2.0, 2.5, 17.5, 30.0]
# EMA (Lhat_1 = L_1): 4; .5*4+.5*2 = 3; .5*3+.5*2 = 2.5 -> budget 5 at t = 3; 2.5; 10; 20.
EMA = [4.0, 3.0, 2.5, 2.5, 10.0, 20.0]
# v_t = (EMA - 5) / 5 from t = 3 on; 0 during warmup.
V = [0.0, 0.0, -0.5, -0.5, 1.0, 3.0]
RHO = [2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]  # rho for the *next* update, min(1, (t + 1) / 3)
BASE = dict(budget_ratio=1.0, lambda_init=1.0, eta=math.log(4.0), warmup_steps=3, beta=0.5)


def _run(cfg, losses, accum_steps=1):
  """The controller's state (as a dict) after each `tx.update(value=loss)`."""
  tx = multiplier_controller(cfg, accum_steps)
  grads = {"w": jnp.ones(3)}
  update = jax.jit(lambda s, l: tx.update(grads, s, value=l))
  state, out = tx.init(grads), []
  for loss in losses:
    passed, state = update(state, jnp.float32(loss))
    np.testing.assert_array_equal(passed["w"], grads["w"])  # identity on the updates
    out.append(jax.tree.map(np.asarray, state._asdict()))
  return out


def _check(states, lam, ema=EMA, v=V):
  np.testing.assert_allclose([s["lam"] for s in states], lam, rtol=1e-6)
  np.testing.assert_allclose([s["ema"] for s in states], ema, rtol=1e-6)
  np.testing.assert_allclose([s["violation"] for s in states], v, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose([s["rho"] for s in states], RHO, rtol=1e-6)
  assert [int(s["updates"]) for s in states] == list(range(1, len(states) + 1))


def test_initial_state():
  s = init_multiplier(MultiplierConfig(**BASE))
  assert float(s.lam) == 1.0 and int(s.updates) == 0
  np.testing.assert_allclose(float(s.rho), 1 / 3, rtol=1e-7)
  np.testing.assert_allclose(float(penalty_weight(s)), 1 / 3, rtol=1e-7)


def test_warmup_budget_and_bounds():
  states = _run(MultiplierConfig(**BASE, lambda_min=0.5, lambda_max=3.0), LOSSES)
  # Held at lambda_0 while warming up; at t = 3: 4^0.5 = 2; t = 4: 4 -> clipped to lambda_max 3;
  # t = 5: 3 * 4^-1 = 0.75; t = 6: 0.75 * 4^-3 -> clipped to lambda_min 0.5.
  _check(states, [1.0, 1.0, 2.0, 3.0, 0.75, 0.5])
  assert [float(s["budget"]) for s in states] == [0.0, 0.0, 5.0, 5.0, 5.0, 5.0]


def test_grows_under_budget_shrinks_over_it_without_bounds():
  states = _run(MultiplierConfig(**BASE), LOSSES)
  _check(states, [1.0, 1.0, 2.0, 4.0, 1.0, 1.0 / 64])


def test_asymmetric_growth_rate():
  # Growth (v < 0) at eta_up = ln 2, i.e. factor 2^0.5 per v = -0.5; shrinking still at ln 4.
  states = _run(MultiplierConfig(**BASE, eta_up=math.log(2.0)), LOSSES)
  _check(states, [1.0, 1.0, 2 ** 0.5, 2.0, 0.5, 0.5 / 64])


def test_violation_clip():
  states = _run(MultiplierConfig(**BASE, violation_clip=1.0), LOSSES)
  # v = 3 at t = 6 is clipped to 1: factor 1/4 instead of 1/64.
  _check(states, [1.0, 1.0, 2.0, 4.0, 1.0, 0.25], v=[0.0, 0.0, -0.5, -0.5, 1.0, 1.0])


def test_bias_corrected_ema():
  # m_t = .5 m_{t-1} + .5 L_t, m_0 = 0: 2, 2, 2 -> Lhat = 2 / (1 - .5^t) = 4, 8/3, 16/7; the
  # budget is 32/7 and v_3 = -1/2 again.
  states = _run(MultiplierConfig(**BASE, ema_init="bias_corrected"), LOSSES[:3])
  np.testing.assert_allclose([s["ema"] for s in states], [4.0, 8 / 3, 16 / 7], rtol=1e-6)
  np.testing.assert_allclose([s["ema_raw"] for s in states], [2.0, 2.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(float(states[-1]["budget"]), 32 / 7, rtol=1e-6)
  np.testing.assert_allclose([s["lam"] for s in states], [1.0, 1.0, 2.0], rtol=1e-6)


def test_accumulation_counts_optimizer_updates():
  # Pairs of micro-batch losses whose means are LOSSES.
  micro = [3.0, 5.0, 1.0, 3.0, 2.0, 2.0, 2.0, 3.0, 17.0, 18.0, 29.0, 31.0]
  states = _run(MultiplierConfig(**BASE), micro, accum_steps=2)
  _check(states[1::2], [1.0, 1.0, 2.0, 4.0, 1.0, 1.0 / 64])
  # Mid-window: nothing but the running sum (and the micro-step count) moves.
  for i in range(0, 12, 2):
    assert int(states[i]["updates"]) == i // 2 and int(states[i]["micro"]) == 1
    assert float(states[i]["loss_sum"]) == micro[i]
    prev = init_multiplier(MultiplierConfig(**BASE))._asdict() if i == 0 else states[i - 1]
    assert float(states[i]["lam"]) == float(prev["lam"])


def test_inside_multisteps_it_would_see_only_the_last_micro_loss():
  """Why the controller sits outside optax.MultiSteps: MultiSteps forwards the extra args of
  the emitting micro-step only. Inside it (k = 2), update 1 sees L = 5, not the mean 4."""
  tx = optax.MultiSteps(multiplier_controller(MultiplierConfig(**BASE)), every_k_schedule=2)
  grads = {"w": jnp.ones(3)}
  state = tx.init(grads)
  for loss in (3.0, 5.0):
    _, state = tx.update(grads, state, grads, value=jnp.float32(loss))
  inner = find_multiplier_state(state)
  assert int(inner.updates) == 1 and float(inner.ema) == 5.0


def test_config_validation():
  for bad in (dict(warmup_steps=0), dict(beta=1.0), dict(ema_init="zero"),
              dict(lambda_init=2.0, lambda_max=1.0), dict(violation_clip=0.0),
              dict(budget_ratio=-1.0), dict(eta=-0.1)):
    with pytest.raises(ValueError, match="MultiplierConfig"):
      MultiplierConfig(**bad)
  with pytest.raises(ValueError, match="accum_steps"):
    multiplier_controller(MultiplierConfig(), accum_steps=0)
  tx = multiplier_controller(MultiplierConfig())
  with pytest.raises(TypeError, match="value="):
    tx.update({}, tx.init({}))


def test_runs_inside_make_train_step_with_accumulation():
  """The controller chained in front of the substrate's AdamW under optax.MultiSteps, driven by
  the jitted step: a scalar w with loss = task + lambda * rho * w^2, the task loss fed through
  the batch and handed to the controller as `value`; lambda read back through the view."""
  micro = [3.0, 5.0, 1.0, 3.0, 2.0, 2.0, 2.0, 3.0, 17.0, 18.0, 29.0, 31.0]

  def loss_fn(trainable, frozen, batch, rng, extra):
    del frozen, rng
    task = batch["task"] + 0.0 * trainable["w"]
    return task + penalty_weight(extra["multiplier"]) * trainable["w"] ** 2, {"task_loss": task}

  adamw, _ = build_optimizer(OptimizerConfig(learning_rate=0.1, schedule="constant",
                                             grad_clip_norm=None, accum_steps=2))
  tx = optax.chain(multiplier_controller(MultiplierConfig(**BASE), accum_steps=2), adamw)
  state = TrainState.create({"w": jnp.float32(1.0)}, tx, jax.random.PRNGKey(0))
  step = make_train_step(loss_fn, tx, tx_extra_args=lambda m: {"value": m["task_loss"]},
                         opt_state_view=multiplier_view)
  lams = []
  for task in micro:
    ctrl = find_multiplier_state(state.opt_state)
    lam_before, rho_before = float(ctrl.lam), float(ctrl.rho)
    w_before = float(state.trainable["w"])
    state, metrics = step(state, {}, {"task": jnp.float32(task)})
    lams.append(float(metrics["extra/multiplier/lam"]))
    np.testing.assert_allclose(float(metrics["loss"]),
                               task + lam_before * rho_before * w_before ** 2, rtol=1e-6)
  assert int(find_multiplier_state(state.opt_state).updates) == 6 and state.extra == {}
  np.testing.assert_allclose(lams[1::2], [1.0, 1.0, 2.0, 4.0, 1.0, 1.0 / 64], rtol=1e-6)
  np.testing.assert_allclose(lams[0::2], [1.0, 1.0, 1.0, 2.0, 4.0, 1.0], rtol=1e-6)


def test_budget_floor_bounds_a_near_zero_budget():
  """A task loss of ~0 at T_w (the KL at the SFT model): without a floor the budget is 0 and
  v_t is undefined; with floor 8 the budget is 8 and v_t = (EMA - 8) / 8 with EMA 0, 0, 8, 12
  at t = 3..6, so lambda is multiplied by 4, 4, 1, 4^(-1/2)."""
  cfg = MultiplierConfig(**BASE)
  tx = multiplier_controller(cfg, budget_floor=8.0)
  state = tx.init({})
  lams, budgets = [], []
  for loss in (0.0, 0.0, 0.0, 0.0, 16.0, 16.0):
    _, state = tx.update({}, state, value=jnp.float32(loss))
    lams.append(float(state.lam))
    budgets.append(float(state.budget))
  assert budgets == [0.0, 0.0, 8.0, 8.0, 8.0, 8.0]
  np.testing.assert_allclose(lams, [1.0, 1.0, 4.0, 16.0, 16.0, 8.0], rtol=1e-6)
  # Above the floor the relative budget is kept: EMA 2.5 -> budget 5 (the table above).
  above = multiplier_controller(cfg, budget_floor=1.0)
  state = above.init({})
  for loss in LOSSES[:3]:
    _, state = above.update({}, state, value=jnp.float32(loss))
  assert float(state.budget) == 5.0
  with pytest.raises(ValueError, match="budget_floor"):
    multiplier_controller(cfg, budget_floor=-1.0)
