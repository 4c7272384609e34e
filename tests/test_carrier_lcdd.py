"""The LCDD objective and optimizer on a tiny decoder: the loss against the SFT cross-entropy of
an explicitly merged model plus the numpy sigmoid sum, and the update rules (SGD on gates,
AdamW's first step on deltas, frozen deltas in mask-only mode, accumulation) in closed form."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carrier_jax.delta import gate_shapes, init_carrier
from carrier_jax.early_stop import StopConfig, make_stop_fn
from carrier_jax.lcdd import (GateOptimizerConfig, build_lcdd_optimizer, make_lcdd_loss_fn,
                              make_lcdd_train_step)
from carrier_jax.multiplier import MultiplierConfig, find_multiplier_state, init_multiplier
from cast_jax.models import ModelConfig, forward, init_params
from cast_jax.train import OptimizerConfig, TrainState, sft_loss, train

CONFIG = ModelConfig(model_type="llama", vocab_size=40, hidden_size=8, intermediate_size=12,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
MCFG = MultiplierConfig(warmup_steps=2, lambda_init=2.0)


def _setup(seed=0):
  base = init_params(CONFIG, jax.random.PRNGKey(seed), std=0.2)
  ft = init_params(CONFIG, jax.random.PRNGKey(seed + 1), std=0.2)
  rng = np.random.default_rng(seed)
  car = init_carrier(CONFIG, base, ft, jax.random.PRNGKey(seed + 2))
  # Every gate on (theta in [0.2, 2]), so the gated model is base outside the layers + ft inside.
  car["gates"] = {g: jnp.asarray(rng.uniform(0.2, 2.0, s), jnp.float32)
                  for g, s in gate_shapes(CONFIG).items()}
  ids = rng.integers(0, CONFIG.vocab_size, (2, 6)).astype(np.int32)
  mask = np.ones((2, 6), np.int32)
  loss_mask = np.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]], np.int32)
  batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
  return base, ft, car, batch


def test_loss_is_task_ce_plus_weighted_sigmoid_sum():
  base, ft, car, batch = _setup()
  extra = {"multiplier": init_multiplier(MCFG)._asdict()}  # lambda 2, rho 1/2: weight 1
  loss, metrics = jax.jit(make_lcdd_loss_fn(CONFIG))(car, base, batch, jax.random.PRNGKey(0),
                                                     extra)
  # init_params gives both models unit norms, so ft's layers under base's embed / head is the
  # gated model with every gate on.
  ref_model = {**base, "layers": ft["layers"]}
  task, _ = sft_loss(forward(ref_model, CONFIG, batch["input_ids"]), batch["input_ids"],
                     batch["loss_mask"])
  sig = sum(float(np.sum(1 / (1 + np.exp(-np.asarray(t, np.float64)))))
            for t in car["gates"].values())
  np.testing.assert_allclose(float(metrics["task_loss"]), float(task), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["sparsity_loss"]), sig, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["penalty_weight"]), 1.0, rtol=1e-7)
  np.testing.assert_allclose(float(loss), float(task) + sig, rtol=1e-5)
  assert float(metrics["active_gates"]) == sum(t.size for t in car["gates"].values())


def _grads(car, base, batch, extra):
  f = make_lcdd_loss_fn(CONFIG)
  return jax.grad(lambda c: f(c, base, batch, jax.random.PRNGKey(0), extra)[0])(car)


def test_one_step_sgd_on_gates_adamw_on_deltas():
  base, _, car, batch = _setup(1)
  tx = build_lcdd_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant",
                                            grad_clip_norm=None), GateOptimizerConfig(0.1),
                             multiplier=MCFG)
  extra = {"multiplier": init_multiplier(MCFG)._asdict()}
  state = TrainState.create(car, tx, jax.random.PRNGKey(0))
  step = make_lcdd_train_step(CONFIG, tx, donate=False)
  new, metrics = step(state, base, batch)
  g = _grads(car, base, batch, extra)
  for name, t in car["gates"].items():
    np.testing.assert_allclose(new.trainable["gates"][name], t - 0.1 * g["gates"][name],
                               rtol=1e-6, atol=1e-7, err_msg=name)
  # AdamW's first step (bias-corrected moments, no decay): -lr * g / (|g| + eps).
  for name, d in car["delta"].items():
    gd = np.asarray(g["delta"][name], np.float64)
    want = np.asarray(d, np.float64) - 1e-3 * gd / (np.abs(gd) + 1e-8)
    np.testing.assert_allclose(new.trainable["delta"][name], want, rtol=1e-5, atol=1e-8,
                               err_msg=name)
  assert int(find_multiplier_state(new.opt_state).updates) == 1
  np.testing.assert_allclose(float(metrics["extra/multiplier/ema"]), float(metrics["task_loss"]),
                             rtol=1e-7)


def test_mask_only_freezes_the_deltas():
  base, _, car, batch = _setup(2)
  tx = build_lcdd_optimizer(None, multiplier=MCFG)
  state = TrainState.create(car, tx, jax.random.PRNGKey(0))
  step = make_lcdd_train_step(CONFIG, tx, donate=False)
  new = state
  for _ in range(2):
    new, _ = step(new, base, batch)
  for name, d in car["delta"].items():
    np.testing.assert_array_equal(new.trainable["delta"][name], d, err_msg=name)
  assert any(not np.array_equal(new.trainable["gates"][n], t) for n, t in car["gates"].items())


def test_accumulation_updates_gates_and_deltas_together():
  base, _, car, batch = _setup(3)
  tx = build_lcdd_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant"),
                            multiplier=MultiplierConfig(warmup_steps=2), accum_steps=2)
  state = TrainState.create(car, tx, jax.random.PRNGKey(0))
  step = make_lcdd_train_step(CONFIG, tx, donate=False)
  mid, _ = step(state, base, batch)
  for a, b in zip(jax.tree.leaves(mid.trainable), jax.tree.leaves(car)):
    np.testing.assert_array_equal(a, b)
  assert int(find_multiplier_state(mid.opt_state).updates) == 0
  end, _ = step(mid, base, batch)
  assert int(find_multiplier_state(end.opt_state).updates) == 1
  for part in ("gates", "delta"):
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(end.trainable[part]), jax.tree.leaves(car[part]))), part


def test_optimizer_argument_checks():
  with pytest.raises(ValueError, match="accum_steps"):
    build_lcdd_optimizer(OptimizerConfig(schedule="constant", accum_steps=2))
  with pytest.raises(ValueError, match="accum_steps"):
    build_lcdd_optimizer(None, accum_steps=0)
  with pytest.raises(ValueError, match="GateOptimizerConfig"):
    GateOptimizerConfig(learning_rate=0.0)


def test_train_loop_logs_the_controller_and_stops_on_the_stall_rule():
  """The pieces through `cast_jax.train.train`: the loop's logged rows carry the keys the stop
  rule reads. With window 1, patience 1 and stall_ratio 1 any row after the first
  post-warmup one (T_w = 1) counts as stalled, so the run stops at step 2 of 5."""
  base, _, car, batch = _setup(4)
  mcfg = MultiplierConfig(warmup_steps=1, budget_ratio=0.3)
  tx = build_lcdd_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant"),
                            multiplier=mcfg)
  state = TrainState.create(car, tx, jax.random.PRNGKey(0))
  step = make_lcdd_train_step(CONFIG, tx)
  rows = []
  stop = make_stop_fn(StopConfig(window=1, stall_ratio=1.0, patience=1, breach_ratio=None,
                                 arm_ratio=0.0),
                      mcfg.budget_ratio)

  def stop_fn(s, metrics):
    rows.append(metrics)
    return stop(s, metrics)

  state, summary = train(step, state, base, lambda start: itertools.repeat(batch),
                         num_steps=5, log_every=1, progress=False, stop_fn=stop_fn)
  assert summary["final_step"] == 2 and summary["stop_reason"].startswith("sparsity_stall")
  assert int(find_multiplier_state(state.opt_state).updates) == 2
  np.testing.assert_allclose(rows[0]["extra/multiplier/budget"], 1.3 * rows[0]["task_loss"],
                             rtol=1e-6)
  assert {"extra/multiplier/lam", "extra/multiplier/rho", "extra/multiplier/ema",
          "active_gates", "sparsity_loss", "penalty_weight"} <= set(rows[0])


def test_remat_modes_give_the_same_loss_and_gradients():
  """Recomputing the masked weights ("weights") or whole layers ("full") in the backward changes
  memory only: loss and gradients equal the plain ("none") autodiff."""
  base, _, car, batch = _setup(3)
  extra = {"multiplier": init_multiplier(MCFG)._asdict()}
  got = {}
  for mode in ("none", "weights", "full"):
    f = make_lcdd_loss_fn(CONFIG, remat=mode)
    got[mode] = jax.jit(jax.value_and_grad(lambda c: f(c, base, batch, None, extra)[0]))(car)
  for mode in ("weights", "full"):
    for a, b in zip(jax.tree.leaves(got["none"]), jax.tree.leaves(got[mode])):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="remat='some'"):
    make_lcdd_loss_fn(CONFIG, remat="some")
