"""The LCDD gate (lcdd-sft-eraser.md Eqs. 3, 26, 27): exact Heaviside forward, sigmoid' backward,
sparsity loss and init, each against numpy float64 closed forms or finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carrier_jax.gates import (GateInit, count_active, count_gates, gate_values, heaviside_ste,
                               init_gate_logits, sparsity_loss)

THETA = np.array([-3.0, -0.5, -1e-30, -0.0, 0.0, 1e-30, 1e-7, 0.25, 2.0, 40.0], np.float32)


def _sigmoid64(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_exactly_the_heaviside(dtype):
  theta = jnp.asarray(THETA, dtype)
  m = jax.jit(heaviside_ste)(theta)
  assert m.dtype == dtype
  # theta = 0 (either sign) is off: Eq. 26 is strict. bf16 keeps float32's exponent range, so
  # +-1e-30 stays nonzero there too.
  expected = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], np.float32)
  np.testing.assert_array_equal(np.asarray(m, np.float32), expected)
  assert set(np.unique(np.asarray(m, np.float32))) <= {0.0, 1.0}


def test_gradient_is_upstream_times_sigmoid_prime():
  rng = np.random.default_rng(0)
  theta = rng.normal(0.0, 2.0, size=(5, 7)).astype(np.float32)
  a = rng.normal(size=(5, 7)).astype(np.float32)

  # A nonlinear loss of m: dL/dm = 2 a^2 m + a, known in closed form.
  def loss(t):
    m = heaviside_ste(t)
    return jnp.sum((a * m) ** 2) + jnp.sum(a * m)

  g = np.asarray(jax.grad(loss)(jnp.asarray(theta)), np.float64)
  m = (theta > 0).astype(np.float64)
  dl_dm = 2 * a.astype(np.float64) ** 2 * m + a
  s = _sigmoid64(theta)
  np.testing.assert_allclose(g, dl_dm * s * (1 - s), rtol=1e-5, atol=1e-7)
  # sigmoid' by central finite differences of the float64 sigmoid, not by its closed form.
  h = 1e-6
  t64 = theta.astype(np.float64)
  fd = (_sigmoid64(t64 + h) - _sigmoid64(t64 - h)) / (2 * h)
  np.testing.assert_allclose(g, dl_dm * fd, rtol=1e-5, atol=1e-7)


def test_gradient_at_zero_and_in_the_tails():
  g = jax.grad(lambda t: jnp.sum(heaviside_ste(t)))(jnp.asarray([0.0, 40.0, -40.0]))
  assert float(g[0]) == 0.25  # sigmoid'(0) = 1/4 exactly: an off gate at 0 can turn on
  assert abs(float(g[1])) < 1e-16 and abs(float(g[2])) < 1e-16


def test_gate_values_maps_every_leaf():
  tree = {"a": jnp.asarray([-1.0, 1.0]), "b": {"c": jnp.asarray([[2.0, 0.0]])}}
  m = gate_values(tree)
  np.testing.assert_array_equal(m["a"], [0.0, 1.0])
  np.testing.assert_array_equal(m["b"]["c"], [[1.0, 0.0]])


def test_sparsity_loss_and_its_gradient():
  rng = np.random.default_rng(1)
  tree = {"x": rng.normal(size=(3, 4)).astype(np.float32),
          "y": {"z": rng.normal(size=(6,)).astype(np.float32)}}
  jtree = jax.tree.map(jnp.asarray, tree)
  expected = sum(_sigmoid64(v).sum() for v in jax.tree.leaves(tree))
  np.testing.assert_allclose(float(sparsity_loss(jtree)), expected, rtol=1e-6)
  g = jax.grad(sparsity_loss)(jtree)
  for gl, tl in zip(jax.tree.leaves(g), jax.tree.leaves(tree)):
    s = _sigmoid64(tl)
    np.testing.assert_allclose(np.asarray(gl), s * (1 - s), rtol=1e-5, atol=1e-8)
  assert int(count_active(jtree)) == sum(int((v > 0).sum()) for v in jax.tree.leaves(tree))
  assert count_gates(jtree) == 18


def test_release_init_statistics_and_determinism():
  shapes = {"a": (400, 250), "b": (1000,)}
  key = jax.random.PRNGKey(3)
  t = init_gate_logits(shapes, key)
  assert t["a"].shape == (400, 250) and t["b"].shape == (1000,) and t["a"].dtype == jnp.float32
  x = np.asarray(t["a"], np.float64)
  # N(1.5, 0.5^2) over 1e5 draws: the mean within ~5 standard errors, std within ~1%.
  assert abs(x.mean() - 1.5) < 5 * 0.5 / np.sqrt(x.size)
  assert abs(x.std() - 0.5) < 0.005
  # P(theta <= 0) = Phi(-3) = 0.00135: ~135 of 1e5 gates start off.
  off = int((x <= 0).sum())
  assert 80 < off < 200
  again = init_gate_logits(shapes, key)
  np.testing.assert_array_equal(again["a"], t["a"])
  other = init_gate_logits(shapes, jax.random.PRNGKey(4))
  assert not np.array_equal(other["a"], t["a"])
  assert not np.array_equal(np.asarray(t["a"]).ravel()[:1000], np.asarray(t["b"]))


def test_algorithm1_init_starts_every_gate_off():
  t = init_gate_logits({"a": (3, 5)}, jax.random.PRNGKey(0), GateInit(mode="constant", value=0.0))
  np.testing.assert_array_equal(t["a"], np.zeros((3, 5)))
  assert int(count_active(t)) == 0
  np.testing.assert_array_equal(heaviside_ste(t["a"]), np.zeros((3, 5)))


def test_gate_init_rejects_bad_settings():
  with pytest.raises(ValueError, match="mode"):
    GateInit(mode="uniform")
  with pytest.raises(ValueError, match="std"):
    GateInit(std=-1.0)
