"""KL distillation as the LCDD task loss: KL(SFT || gated model) per response token against a
float64 numpy KL, the top-k + tail cache against the numpy coarsened KL (exact at k = V, never
above the full KL), the online and cached teachers through the loss, the step and run_lcdd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carrier_jax import distill
from carrier_jax.delta import GATED_WEIGHTS, expand_v_to_heads, gate_shapes, init_carrier
from carrier_jax.lcdd import build_lcdd_optimizer, make_lcdd_loss_fn, make_lcdd_train_step
from carrier_jax.multiplier import MultiplierConfig, init_multiplier
from carrier_jax.run import run_lcdd
from cast_jax.models import ModelConfig, forward, init_params
from cast_jax.train import OptimizerConfig, TrainState

CONFIG = ModelConfig(model_type="llama", vocab_size=24, hidden_size=8, intermediate_size=12,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
EXTRA = {"multiplier": init_multiplier(MultiplierConfig(warmup_steps=2))._asdict()}


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_kl(p_logits, q_logits):
  lp, lq = _np_log_softmax(p_logits), _np_log_softmax(q_logits)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _np_binned_kl(p_logits, q_logits, k):
  """KL of P and Q coarsened to P's top-k tokens plus one bucket for the rest (float64)."""
  lp, lq = _np_log_softmax(p_logits), _np_log_softmax(q_logits)
  p, q = np.exp(lp), np.exp(lq)
  top = np.argsort(-p, axis=-1)[..., :k]
  pk, qk = np.take_along_axis(p, top, -1), np.take_along_axis(q, top, -1)
  pt, qt = 1 - pk.sum(-1), 1 - qk.sum(-1)
  head = (pk * (np.log(pk) - np.log(qk))).sum(-1)
  log_ratio = np.log(np.maximum(pt, 1e-300)) - np.log(np.maximum(qt, 1e-300))
  tail = np.where(pt > 1e-12, pt * log_ratio, 0.0)
  return head + tail


def _teacher_arrays(p_logits, k):
  values, indices = jax.lax.top_k(jnp.asarray(p_logits), k)
  return values, indices, jax.nn.logsumexp(jnp.asarray(p_logits), axis=-1)


@pytest.mark.parametrize("k", [24, 5, 1])
def test_token_kl_against_numpy(k):
  rng = np.random.default_rng(k)
  p = rng.normal(0, 2.0, (3, 7, 24)).astype(np.float32)
  q = rng.normal(0, 2.0, (3, 7, 24)).astype(np.float32)
  full = _np_kl(p, q)
  np.testing.assert_allclose(distill.full_token_kl(p, q), full, rtol=2e-5, atol=1e-6)
  got = np.asarray(distill.topk_token_kl(*_teacher_arrays(p, k), q))
  np.testing.assert_allclose(got, _np_binned_kl(p, q, k), rtol=2e-4, atol=2e-6)
  assert (got <= full + 1e-5).all()
  if k == 24:
    np.testing.assert_allclose(got, full, rtol=2e-4, atol=2e-6)


def test_topk_kl_gradient_is_finite_and_matches_full_at_k_equals_v():
  rng = np.random.default_rng(1)
  p = rng.normal(0, 3.0, (2, 24)).astype(np.float32)
  q = rng.normal(0, 3.0, (2, 24)).astype(np.float32)
  g_full = jax.grad(lambda s: distill.full_token_kl(p, s).sum())(q)
  g_top = jax.grad(lambda s: distill.topk_token_kl(*_teacher_arrays(p, 24), s).sum())(q)
  # d KL / d s = softmax(s) - P, in closed form.
  want = np.exp(_np_log_softmax(q)) - np.exp(_np_log_softmax(p))
  np.testing.assert_allclose(g_full, want, atol=1e-6)
  np.testing.assert_allclose(g_top, want, atol=1e-5)


def test_topk_kl_gradient_against_finite_differences():
  """The custom VJP of the top-k + tail KL against central differences of the float64 numpy
  binned KL (k < V: the tail's gradient spreads P's tail mass over Q's tail in proportion)."""
  rng = np.random.default_rng(2)
  p = rng.normal(0, 2.0, (2, 24))
  q = rng.normal(0, 2.0, (2, 24))
  for k in (1, 5):
    top = _teacher_arrays(p.astype(np.float32), k)
    got = np.asarray(jax.grad(lambda s: distill.topk_token_kl(*top, s).sum())(
        jnp.asarray(q, jnp.float32)))
    h, want = 1e-5, np.zeros_like(q)
    for idx in np.ndindex(*q.shape):
      e = np.zeros_like(q)
      e[idx] = h
      want[idx] = (_np_binned_kl(p, q + e, k).sum() - _np_binned_kl(p, q - e, k).sum()) / (2 * h)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"k={k}")


def _setup(seed=0):
  base = init_params(CONFIG, jax.random.PRNGKey(seed), std=0.3)
  ft = init_params(CONFIG, jax.random.PRNGKey(seed + 1), std=0.3)
  rng = np.random.default_rng(seed)
  car = init_carrier(CONFIG, base, ft, jax.random.PRNGKey(seed + 2))
  # About a third of the gates off, so the gated model is neither base nor SFT.
  car["gates"] = {g: jnp.asarray(rng.uniform(-1.0, 2.0, s), jnp.float32)
                  for g, s in gate_shapes(CONFIG).items()}
  examples = []
  for n, start in ((7, 3), (5, 2), (9, 4), (6, 5)):
    ids = rng.integers(1, CONFIG.vocab_size, n).astype(np.int32)
    mask = (np.arange(n) >= start).astype(np.int32)
    examples.append((ids, mask))
  return base, ft, car, examples


def _np_gated_params(base, car):
  """The gated model built in numpy from the gate signs (Eq. 2), independent of apply_carrier."""
  m = {g: (np.asarray(t) > 0).astype(np.float64) for g, t in car["gates"].items()}
  m["v>o"] = np.asarray(expand_v_to_heads(jnp.asarray(m["v"]), CONFIG.num_heads))
  layers = dict(base["layers"])
  for name, (r, c) in GATED_WEIGHTS.items():
    row, col = m[r], m[c]
    full = np.stack([np.multiply.outer(row[l], col[l]) for l in range(row.shape[0])])
    layers[name] = jnp.asarray(np.asarray(base["layers"][name], np.float64) +
                               full * np.asarray(car["delta"][name], np.float64), jnp.float32)
  return {**base, "layers": layers}


def _batch(examples):
  from cast_jax.data.batching import collate_train
  return collate_train(examples, pad_id=0, multiple=4)


def _np_task_kl(teacher_params, student_params, batch):
  p = np.asarray(forward(teacher_params, CONFIG, batch["input_ids"],
                         attention_mask=batch["attention_mask"]))
  q = np.asarray(forward(student_params, CONFIG, batch["input_ids"],
                         attention_mask=batch["attention_mask"]))
  w = batch["loss_mask"][:, 1:].astype(np.float64)
  return float((_np_kl(p, q)[:, :-1] * w).sum() / w.sum()), p, q


def test_online_and_cached_kl_task_loss_equal_numpy_kl():
  base, ft, car, examples = _setup()
  batch = _batch(examples)
  want, p, q = _np_task_kl(ft, _np_gated_params(base, car), batch)
  assert want > 1e-3  # the gated model is not the SFT model
  online = jax.jit(make_lcdd_loss_fn(CONFIG, task_loss="kl", teacher="online"))
  _, m_on = online(car, {"base": base, "teacher": ft}, batch, jax.random.PRNGKey(0), EXTRA)
  np.testing.assert_allclose(float(m_on["task_loss"]), want, rtol=1e-4)
  cached = jax.jit(make_lcdd_loss_fn(CONFIG, task_loss="kl", teacher="cached"))
  for k in (CONFIG.vocab_size, 3):
    cache = distill.build_teacher_cache(ft, CONFIG, examples, top_k=k, pad_id=0, batch_size=3,
                                        pad_multiple=4)
    tb = distill.attach_teacher(batch, range(len(examples)), examples, cache)
    _, m = cached(car, base, tb, jax.random.PRNGKey(0), EXTRA)
    w = batch["loss_mask"][:, 1:].astype(np.float64)
    ref = (_np_binned_kl(p, q, k)[:, :-1] * w).sum() / w.sum()
    np.testing.assert_allclose(float(m["task_loss"]), ref, rtol=2e-4, err_msg=f"k={k}")
    assert float(m["task_loss"]) <= want * (1 + 1e-4)
  # The CE is still logged (monitoring only).
  assert float(m_on["ce"]) > 0


def test_step_feeds_the_kl_to_the_controller():
  base, ft, car, examples = _setup(1)
  batch = _batch(examples)
  tx = build_lcdd_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant"),
                            multiplier=MultiplierConfig(warmup_steps=1, budget_ratio=0.5))
  step = make_lcdd_train_step(CONFIG, tx, donate=False, task_loss="kl", teacher="online")
  state = TrainState.create(car, tx, jax.random.PRNGKey(0))
  want, _, _ = _np_task_kl(ft, _np_gated_params(base, car), batch)
  _, metrics = step(state, {"base": base, "teacher": ft}, batch)
  np.testing.assert_allclose(float(metrics["task_loss"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["extra/multiplier/ema"]), float(metrics["task_loss"]),
                             rtol=1e-7)
  np.testing.assert_allclose(float(metrics["extra/multiplier/budget"]),
                             1.5 * float(metrics["task_loss"]), rtol=1e-6)


def test_run_lcdd_cached_teacher_at_full_k_follows_the_online_run():
  """run_lcdd's cached batches carry the right rows' teacher (shuffled epochs): with k = V the
  cached and online runs compute the same loss, so their carriers agree to float precision."""
  base, ft, _, examples = _setup(2)
  examples = examples * 2
  kw = dict(pad_id=0, num_steps=4, batch_size=2, seed=5, pad_multiple=4, progress=False,
            delta_optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
            multiplier=MultiplierConfig(warmup_steps=2), task_loss="kl", budget_floor=0.01)
  car_on, ctrl_on, _ = run_lcdd(base, ft, CONFIG, examples, teacher="online", **kw)
  car_ca, ctrl_ca, _ = run_lcdd(base, ft, CONFIG, examples, teacher="cached",
                                teacher_top_k=CONFIG.vocab_size, **kw)
  for a, b in zip(jax.tree.leaves(car_on), jax.tree.leaves(car_ca)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(ctrl_on.ema), float(ctrl_ca.ema), rtol=1e-3)
  np.testing.assert_allclose(float(ctrl_on.lam), float(ctrl_ca.lam), rtol=1e-4)
  # Base and "SFT" differ outside the layers too, so the KL is far from 0 and above the floor.
  assert float(ctrl_on.budget) > 0.01 and np.isfinite(float(ctrl_on.lam))


def test_bad_options_name_the_fix():
  with pytest.raises(ValueError, match="task_loss"):
    make_lcdd_loss_fn(CONFIG, task_loss="mse")
  with pytest.raises(ValueError, match="teacher"):
    make_lcdd_loss_fn(CONFIG, task_loss="kl", teacher="disk")
  base, ft, _, examples = _setup()
  with pytest.raises(ValueError, match="top_k"):
    distill.build_teacher_cache(ft, CONFIG, examples, top_k=CONFIG.vocab_size + 1, pad_id=0)
  cached = make_lcdd_loss_fn(CONFIG, task_loss="kl", teacher="cached")
  car = init_carrier(CONFIG, base, ft, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="attach_teacher"):
    cached(car, base, _batch(examples), jax.random.PRNGKey(0), EXTRA)
