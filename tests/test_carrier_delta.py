"""Gated weight deltas (lcdd-sft-eraser.md Eqs. 1-2, App. A, Table 5) against a plain numpy
construction of W_base + (m_row (x) m_col) * dW on HF-style flat [in, out] matrices, with the
GQA row gate of o_proj built by an explicit per-head loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carrier_jax.delta import (GATE_GROUPS, active_channels, apply_carrier, carrier_stats,
                               expand_v_to_heads, gate_shapes, init_carrier, merge_carrier)
from carrier_jax.gates import GateInit
from cast_jax.models import ModelConfig, forward, init_params

# H = 4 query heads over K = 2 kv heads: heads 0, 1 read kv head 0 and heads 2, 3 kv head 1.
LLAMA = ModelConfig(model_type="llama", vocab_size=40, hidden_size=8, intermediate_size=12,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
QWEN2 = ModelConfig(model_type="qwen2", vocab_size=40, hidden_size=8, intermediate_size=12,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, attention_bias=True)
QWEN3 = ModelConfig(model_type="qwen3", vocab_size=40, hidden_size=8, intermediate_size=12,
                    num_layers=3, num_heads=4, num_kv_heads=1, head_dim=4, qk_norm=True)
CONFIGS = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3}


def _models(config, seed=0):
  base = init_params(config, jax.random.PRNGKey(seed), std=0.2)
  ft = init_params(config, jax.random.PRNGKey(seed + 100), std=0.2)
  # Nonzero biases and norm changes, so gating a bias and leaving norms at base is visible.
  for i, n in enumerate(("bq", "bk", "bv")):
    if n in ft["layers"]:
      ft["layers"][n] = 0.3 * jax.random.normal(jax.random.PRNGKey(seed + i), ft["layers"][n].shape)
  ft["layers"]["attn_norm"] = ft["layers"]["attn_norm"] * 1.5
  return base, ft


def _random_gates(config, seed, p_on=0.6):
  """Logits of +-1 with P(on) = p_on, so every mask is a known mix of 0 and 1."""
  rng = np.random.default_rng(seed)
  return {g: np.where(rng.random(s) < p_on, 1.0, -1.0).astype(np.float32)
          for g, s in gate_shapes(config).items()}


def _carrier(config, base, ft, gates):
  car = init_carrier(config, base, ft, jax.random.PRNGKey(0))
  return {"gates": jax.tree.map(jnp.asarray, gates), "delta": car["delta"]}


def _ref_masks(config, gates, layer):
  """Flat HF-layout masks {name: [in, out] or [out]} of one layer, built with np.outer."""
  H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim
  m = {g: (np.asarray(v[layer]) > 0).astype(np.float64).reshape(-1) for g, v in gates.items()}
  # o_proj input channel h * Dh + d is the context of query head h, built from kv head h // G.
  o_row = np.zeros(H * Dh)
  for h in range(H):
    for d in range(Dh):
      o_row[h * Dh + d] = m["v"][(h // (H // K)) * Dh + d]
  out = {
      "wq": np.outer(m["attn_read"], m["q"]), "wk": np.outer(m["attn_read"], m["k"]),
      "wv": np.outer(m["attn_read"], m["v"]), "wo": np.outer(o_row, m["attn_write"]),
      "w_gate": np.outer(m["ffn_read"], m["ffn_hidden"]),
      "w_up": np.outer(m["ffn_read"], m["ffn_hidden"]),
      "w_down": np.outer(m["ffn_hidden"], m["ffn_write"]),
  }
  if config.attention_bias:
    out.update(bq=m["q"], bk=m["k"], bv=m["v"])
  return out


def _ref_merged(config, base, ft, gates):
  """Merged params in float64 numpy: base + M * (ft - base) per flat matrix; norms at base."""
  layers = {n: np.asarray(v, np.float64).copy() for n, v in base["layers"].items()}
  for layer in range(config.num_layers):
    for name, mask in _ref_masks(config, gates, layer).items():
      b = np.asarray(base["layers"][name][layer], np.float64)
      f = np.asarray(ft["layers"][name][layer], np.float64)
      shape = b.shape
      flat = (b.reshape(mask.shape) + mask * (f - b).reshape(mask.shape))
      layers[name][layer] = flat.reshape(shape)
  return {**base, "layers": {n: jnp.asarray(v, jnp.float32) for n, v in layers.items()}}


def _ids(config, seed=0, shape=(2, 7)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape), jnp.int32)


def test_gqa_row_gate_of_o_proj_by_hand():
  # K = 2 kv heads, Dh = 2, H = 4: the wo row gate lists kv head 0's gate twice, then kv 1's.
  m_v = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_array_equal(expand_v_to_heads(m_v, 4),
                                [[1, 0], [1, 0], [0, 1], [0, 1]])
  # H = 6 over K = 2 (G = 3), with a leading layer axis.
  m_v = jnp.asarray([[[1.0, 1.0], [0.0, 1.0]]])
  np.testing.assert_array_equal(expand_v_to_heads(m_v, 6),
                                [[[1, 1], [1, 1], [1, 1], [0, 1], [0, 1], [0, 1]]])


def test_one_layer_masks_by_hand():
  """Table 5 on a hand-sized layer: D = 2, H = 2, K = 1, Dh = 2, F = 2, every dW = 1."""
  lp = {"attn_norm": jnp.ones(2), "mlp_norm": jnp.ones(2),
        "wq": jnp.zeros((2, 2, 2)), "wk": jnp.zeros((2, 1, 2)), "wv": jnp.zeros((2, 1, 2)),
        "wo": jnp.zeros((2, 2, 2)), "w_gate": jnp.zeros((2, 2)), "w_up": jnp.zeros((2, 2)),
        "w_down": jnp.zeros((2, 2))}
  ones = {n: jnp.ones_like(v) for n, v in lp.items() if n.startswith("w")}
  on, off = 1.0, -1.0
  gates = {"attn_read": jnp.asarray([on, off]), "q": jnp.asarray([[on, off], [off, on]]),
           "k": jnp.asarray([[off, on]]), "v": jnp.asarray([[on, off]]),
           "attn_write": jnp.asarray([off, on]), "ffn_read": jnp.asarray([on, on]),
           "ffn_hidden": jnp.asarray([off, on]), "ffn_write": jnp.asarray([on, off])}
  out = apply_carrier(lp, {"gates": gates, "delta": ones})
  # wq[i, h, d] = read[i] * q[h, d]: row 0 only, heads' active dims (0, 0) and (1, 1).
  np.testing.assert_array_equal(out["wq"], [[[1, 0], [0, 1]], [[0, 0], [0, 0]]])
  np.testing.assert_array_equal(out["wk"], [[[0, 1]], [[0, 0]]])
  np.testing.assert_array_equal(out["wv"], [[[1, 0]], [[0, 0]]])
  # wo[h, d, j] = v[h // 2, d] * write[j]: both query heads read kv head 0's dim 0.
  np.testing.assert_array_equal(out["wo"], [[[0, 1], [0, 0]], [[0, 1], [0, 0]]])
  np.testing.assert_array_equal(out["w_gate"], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(out["w_up"], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(out["w_down"], [[0, 0], [1, 0]])
  np.testing.assert_array_equal(out["attn_norm"], [1, 1])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_gated_forward_equals_numpy_merged_weights(arch, seed):
  config = CONFIGS[arch]
  base, ft = _models(config, seed)
  gates = _random_gates(config, seed)
  car = _carrier(config, base, ft, gates)
  ref = _ref_merged(config, base, ft, gates)
  ids = _ids(config, seed)
  got = forward(base, config, ids, adapter_fn=apply_carrier, adapter_params=car)
  want = forward(ref, config, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  merged = merge_carrier(base, car)
  for name, v in ref["layers"].items():
    np.testing.assert_allclose(merged["layers"][name], v, rtol=1e-6, atol=1e-6, err_msg=name)
  # Outside the layers (embed, final norm, head) merged is base, leaf for leaf.
  for name in base:
    if name != "layers":
      np.testing.assert_array_equal(merged[name], base[name])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_all_on_is_the_fine_tuned_model_all_off_the_base_exactly(arch):
  config = CONFIGS[arch]
  base, ft = _models(config)
  # The carrier spans the layers' matrices (and biases): embeddings, head and norms stay base.
  ft_layers = {n: base["layers"][n] if "norm" in n else v for n, v in ft["layers"].items()}
  ft_no_norm = {**base, "layers": ft_layers}
  ids = _ids(config, 3)
  shapes = gate_shapes(config)
  on = _carrier(config, base, ft, {g: np.ones(s, np.float32) for g, s in shapes.items()})
  off = _carrier(config, base, ft, {g: -np.ones(s, np.float32) for g, s in shapes.items()})
  np.testing.assert_allclose(
      forward(base, config, ids, adapter_fn=apply_carrier, adapter_params=on),
      forward(ft_no_norm, config, ids), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      forward(base, config, ids, adapter_fn=apply_carrier, adapter_params=off),
      forward(base, config, ids))
  for name, v in merge_carrier(base, off)["layers"].items():
    np.testing.assert_array_equal(v, base["layers"][name], err_msg=name)


def test_trainable_norms_are_ungated_deltas():
  config = QWEN3
  base, ft = _models(config)
  car = init_carrier(config, base, ft, jax.random.PRNGKey(0), train_norms=True,
                     gate_init=GateInit(mode="constant", value=-1.0))
  assert set(car["delta"]) >= {"attn_norm", "mlp_norm", "q_norm", "k_norm"}
  merged = merge_carrier(base, car)
  np.testing.assert_allclose(merged["layers"]["attn_norm"], ft["layers"]["attn_norm"], rtol=1e-6)
  np.testing.assert_array_equal(merged["layers"]["wq"], base["layers"]["wq"])
  default = init_carrier(config, base, ft, jax.random.PRNGKey(0))
  assert not any("norm" in n for n in default["delta"])


def test_init_carrier_holds_the_sft_delta_and_release_gates():
  base, ft = _models(QWEN2)
  car = init_carrier(QWEN2, base, ft, jax.random.PRNGKey(7))
  assert set(car["delta"]) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down",
                               "bq", "bk", "bv"}
  for n, d in car["delta"].items():
    np.testing.assert_allclose(d, np.asarray(ft["layers"][n], np.float64)
                               - np.asarray(base["layers"][n], np.float64), atol=1e-6)
  assert set(car["gates"]) == set(GATE_GROUPS)
  assert car["gates"]["q"].shape == (2, 4, 4) and car["gates"]["ffn_hidden"].shape == (2, 12)
  all_theta = np.concatenate([np.asarray(t).ravel() for t in car["gates"].values()])
  assert 1.0 < all_theta.mean() < 2.0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_delta_gradient_is_zero_wherever_the_mask_is_zero(arch):
  config = CONFIGS[arch]
  base, ft = _models(config, 2)
  gates = _random_gates(config, 5, p_on=0.5)
  car = _carrier(config, base, ft, gates)
  ids = _ids(config, 4)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, config.vocab_size)), jnp.float32)

  def loss(c):
    return jnp.sum(w * forward(base, config, ids, adapter_fn=apply_carrier, adapter_params=c))

  grads = jax.grad(loss)(car)
  for layer in range(config.num_layers):
    for name, mask in _ref_masks(config, gates, layer).items():
      g = np.asarray(grads["delta"][name][layer]).reshape(mask.shape)
      assert np.all(g[mask == 0] == 0), name
      assert np.any(g[mask == 1] != 0), name
  # The gate logits get STE gradients, off gates included (sigmoid'(-1) > 0).
  assert all(np.any(np.asarray(g) != 0) for g in grads["gates"].values())


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_stats_and_channels_count_the_numpy_masks(arch):
  config = CONFIGS[arch]
  base, ft = _models(config)
  gates = _random_gates(config, 11, p_on=0.4)
  stats = carrier_stats(_carrier(config, base, ft, gates))
  L = config.num_layers
  for layer in range(L):
    masks = _ref_masks(config, gates, layer)
    for name, mask in masks.items():
      assert stats["active_delta"][name][layer] == np.count_nonzero(mask), name
      assert stats["num_delta"][name] == mask.size, name
    assert stats["active_delta_layer"][layer] == sum(np.count_nonzero(m) for m in masks.values())
    assert stats["num_delta_layer"] == sum(m.size for m in masks.values())
    for g in GATE_GROUPS:
      assert stats["active_gates"][g][layer] == int((gates[g][layer] > 0).sum()), g
    assert stats["active_gates_layer"][layer] == sum(int((v[layer] > 0).sum())
                                                     for v in gates.values())
  assert stats["num_gates_layer"] == sum(int(np.prod(v.shape[1:])) for v in gates.values())
  channels = active_channels({"gates": gates})
  for g in GATE_GROUPS:
    assert len(channels[g]) == L
    for layer in range(L):
      assert channels[g][layer] == [i for i, x in enumerate(gates[g][layer].ravel()) if x > 0]
