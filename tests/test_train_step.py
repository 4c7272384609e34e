"""Train step on a toy pytree: optimisation, frozen passthrough, NaN guard, hooks, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cast_jax.train import (OptimizerConfig, TrainState, build_optimizer, make_train_step,
                            mask_from_fn, merge, partition, tree_equal)

W_TRUE = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0


def toy_params():
  return {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,)), "frozen": {"scale": jnp.full((3,), 2.0)}}


TOY_MASK = {"w": True, "b": True, "frozen": False}


def toy_loss(trainable, frozen, batch, rng, extra, noise=1e-3):
  del extra
  p = merge(trainable, frozen)
  pred = (batch["x"] @ p["w"] + p["b"]) * p["frozen"]["scale"]
  mse = jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)
  # An rng-dependent term, so a wrong key stream (e.g. after resume) changes the result.
  jitter = noise * jnp.sum(jax.random.normal(rng, p["w"].shape) * p["w"])
  return mse + jitter, {"mse": mse}


def toy_batch(step, seed=0, nan_at=None):
  r = np.random.default_rng([seed, step])
  x = r.normal(size=(8, 4)).astype(np.float32)
  y = (x @ W_TRUE + 0.5) * 2.0
  if step == nan_at:
    x[0, 0] = np.nan
  # attention_mask only feeds the loop's token count (24 per step).
  return {"x": x, "y": y.astype(np.float32), "attention_mask": np.ones((8, 3), np.int32)}


def setup(cfg=None, seed=0, **step_kwargs):
  cfg = cfg or OptimizerConfig(learning_rate=0.05, schedule="constant", grad_clip_norm=None)
  tx, lr_fn = build_optimizer(cfg)
  trainable, frozen = partition(toy_params(), TOY_MASK)
  state = TrainState.create(trainable, tx, jax.random.PRNGKey(seed))
  step_kwargs.setdefault("loss_fn", toy_loss)
  step = make_train_step(tx=tx, **step_kwargs)
  return state, frozen, step, lr_fn


def test_partition_merge_roundtrip_and_errors():
  params = toy_params()
  t, f = partition(params, TOY_MASK)
  assert set(t) == {"w", "b"} and set(f) == {"frozen"}
  assert t["w"] is params["w"]
  assert tree_equal(merge(t, f), params)
  t2, f2 = partition(params, mask_from_fn(params, lambda path, x: path.startswith("frozen")))
  assert set(t2) == {"frozen"} and set(f2) == {"w", "b"}
  with pytest.raises(KeyError, match="keys missing from the mask \\['frozen'\\]"):
    partition(params, {"w": True, "b": True})
  with pytest.raises(ValueError, match="both"):
    merge({"w": 1}, {"w": 2})


def test_loss_decreases_and_frozen_untouched():
  state, frozen, step, _ = setup()
  frozen_copy = jax.tree.map(np.array, frozen)
  losses = []
  for i in range(60):
    state, m = step(state, frozen, toy_batch(i))
    assert bool(m["finite"])
    losses.append(float(m["mse"]))
  assert losses[-1] < 0.05 * losses[0]
  assert int(state.step) == 60
  assert tree_equal(frozen, frozen_copy)          # bitwise, and still readable (not donated)
  assert state.trainable["w"].dtype == jnp.float32


def test_nan_step_keeps_state_bitwise():
  state, frozen, step, _ = setup()
  for i in range(3):
    state, _ = step(state, frozen, toy_batch(i))
  before = jax.tree.map(np.array, state)
  state, m = step(state, frozen, toy_batch(3, nan_at=3))
  assert not bool(m["finite"]) and math.isnan(float(m["loss"]))
  assert tree_equal(state, before)                # step, moments, rng all unchanged


def test_update_extra_runs_in_step_with_metrics():
  def update_extra(extra, metrics, step):
    ema = jnp.where(step == 0, metrics["mse"], 0.9 * extra["ema"] + 0.1 * metrics["mse"])
    lam = jnp.clip(extra["lam"] * jnp.exp(-0.1 * (ema - 1.0)), 0.01, 10.0)
    return {"ema": ema, "lam": lam}

  state, frozen, step, _ = setup(update_extra=update_extra)
  state = state.replace(extra={"ema": jnp.float32(0), "lam": jnp.float32(1)})
  ema, lam = None, 1.0
  for i in range(5):
    state, m = step(state, frozen, toy_batch(i))
    mse = float(m["mse"])
    ema = mse if ema is None else 0.9 * ema + 0.1 * mse
    lam = min(max(lam * math.exp(-0.1 * (ema - 1.0)), 0.01), 10.0)
  np.testing.assert_allclose(float(state.extra["ema"]), ema, rtol=1e-5)
  np.testing.assert_allclose(float(state.extra["lam"]), lam, rtol=1e-5)


def test_tx_extra_args_and_opt_state_view():
  """A transformation that reads the step's loss as an extra arg and keeps a running sum in its
  state; the loss_fn sees that sum through opt_state_view, and it is logged as extra/<path>."""

  def loss_sum_tx():
    def update(updates, state, params=None, *, value, **extra):
      del params, extra
      return updates, {"sum": state["sum"] + value, "n": state["n"] + 1}

    return optax.GradientTransformationExtraArgs(
        lambda params: {"sum": jnp.float32(0), "n": jnp.int32(0)}, update)

  tx = optax.chain(loss_sum_tx(), optax.sgd(0.05))
  seen = []

  def loss_fn(trainable, frozen, batch, rng, extra):
    loss, metrics = toy_loss(trainable, frozen, batch, rng, extra)
    return loss, {**metrics, "sum_before": extra["acc"]["sum"]}

  trainable, frozen = partition(toy_params(), TOY_MASK)
  state = TrainState.create(trainable, tx, jax.random.PRNGKey(0))
  step = make_train_step(loss_fn, tx, tx_extra_args=lambda m: {"value": m["mse"]},
                         opt_state_view=lambda s: {"acc": s[0]})
  total = 0.0
  for i in range(3):
    state, m = step(state, frozen, toy_batch(i))
    np.testing.assert_allclose(float(m["sum_before"]), total, rtol=1e-6)
    total += float(m["mse"])
    seen.append(float(m["extra/acc/sum"]))
  np.testing.assert_allclose(seen[-1], total, rtol=1e-6)
  assert int(state.opt_state[0]["n"]) == 3 and state.extra == {}
  bad = make_train_step(loss_fn, tx, tx_extra_args=lambda m: {"value": m["mse"]},
                        opt_state_view=lambda s: {"acc": s[0]}, jit=False)
  with pytest.raises(ValueError, match="opt_state_view names \\['acc'\\]"):
    bad(state.replace(extra={"acc": 0.0}), frozen, toy_batch(0))


def test_bf16_compute_keeps_fp32_master_weights():
  seen = []

  def loss_fn(trainable, frozen, batch, rng, extra):
    seen.append(trainable["w"].dtype)
    return toy_loss(trainable, frozen, batch, rng, extra)

  state, frozen, step, _ = setup(loss_fn=loss_fn, compute_dtype=jnp.bfloat16)
  first = None
  for i in range(40):
    state, m = step(state, frozen, toy_batch(i))
    first = first if first is not None else float(m["mse"])
  assert seen and all(d == jnp.bfloat16 for d in seen)
  assert jax.tree.map(lambda x: x.dtype, state.trainable) == {"w": jnp.float32, "b": jnp.float32}
  assert float(m["mse"]) < 0.2 * first


def test_custom_grad_fn_is_used():
  def ascent(trainable, frozen, batch, rng, extra):
    (loss, metrics), g = jax.value_and_grad(toy_loss, has_aux=True)(trainable, frozen, batch,
                                                                    rng, extra)
    return jax.tree.map(lambda x: -x, g), loss, metrics

  state, frozen, step, _ = setup(loss_fn=None, grad_fn=ascent)
  state, m0 = step(state, frozen, toy_batch(0))
  for i in range(1, 10):
    state, m = step(state, frozen, toy_batch(0))
  assert float(m["mse"]) > float(m0["mse"])


def test_accumulation_equals_large_batch():
  def loss_fn(t, f, b, r, e):
    return toy_loss(t, f, b, r, e, noise=0.0)

  cfg = dict(learning_rate=0.05, schedule="cosine", warmup_steps=1, total_steps=4,
             grad_clip_norm=1.0, weight_decay=0.01)
  s_acc, frozen, step_acc, lr_acc = setup(OptimizerConfig(accum_steps=2, **cfg), loss_fn=loss_fn)
  s_big, _, step_big, lr_big = setup(OptimizerConfig(**cfg), loss_fn=loss_fn)
  for u in range(4):
    a, b = toy_batch(2 * u), toy_batch(2 * u + 1)
    w_before = np.array(s_acc.trainable["w"])
    s_acc, _ = step_acc(s_acc, frozen, a)
    if u > 0:  # the first update has lr 0 (warmup), so only later ones show the hold
      assert np.array_equal(np.array(s_acc.trainable["w"]), w_before)
    s_acc, _ = step_acc(s_acc, frozen, b)
    s_big, _ = step_big(s_big, frozen, jax.tree.map(lambda x, y: np.concatenate([x, y]), a, b))
    assert lr_acc(2 * u) == lr_acc(2 * u + 1) == lr_big(u)
  np.testing.assert_allclose(s_acc.trainable["w"], s_big.trainable["w"], rtol=1e-5, atol=1e-6)
  assert not np.allclose(s_acc.trainable["w"], 0)


def test_schedule_values():
  cfg = OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10, total_steps=110,
                        end_lr_ratio=0.1)
  _, lr = build_optimizer(cfg)
  assert lr(0) == 0.0
  np.testing.assert_allclose(lr(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 1.0, rtol=1e-6)
  np.testing.assert_allclose(lr(60), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-5)
  np.testing.assert_allclose(lr(110), 0.1, rtol=1e-5)
  _, lin = build_optimizer(OptimizerConfig(learning_rate=2.0, schedule="linear", total_steps=4))
  np.testing.assert_allclose([lin(i) for i in range(5)], [2.0, 1.5, 1.0, 0.5, 0.0], atol=1e-6)
  _, const = build_optimizer(OptimizerConfig(learning_rate=3.0, schedule="constant",
                                             accum_steps=4))
  assert const(0) == const(100) == 3.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(schedule="step"), "schedule"),
    (dict(schedule="cosine", warmup_steps=5, total_steps=5), "total_steps"),
    (dict(accum_steps=0), "accum_steps"),
    (dict(grad_clip_norm=0.0), "grad_clip_norm"),
    (dict(end_lr_ratio=2.0), "end_lr_ratio"),
])
def test_optimizer_config_rejects_bad_values(kwargs, field):
  base = dict(schedule="constant")
  with pytest.raises(ValueError, match=f"OptimizerConfig.{field}"):
    OptimizerConfig(**{**base, **kwargs})


def test_typed_key_is_accepted_and_bad_key_rejected():
  tx = optax.sgd(0.1)
  s = TrainState.create({"w": jnp.zeros(2)}, tx, jax.random.key(3))
  assert s.rng.dtype == jnp.uint32 and s.rng.shape == (2,)
  with pytest.raises(ValueError, match="uint32\\[2\\]"):
    TrainState.create({"w": jnp.zeros(2)}, tx, jnp.zeros(3, jnp.uint32))
