"""Carrier outputs: sparsity two ways and the active channels against numpy recounts, the
delta measure against what actually changed in the merged model, and load-back round trips of
the orbax carrier and the HF export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carrier_jax.delta import GATED_BIASES, GATED_WEIGHTS, gate_shapes, init_carrier, merge_carrier
from carrier_jax.multiplier import MultiplierConfig, init_multiplier
from carrier_jax.outputs import load_carrier, sparsity_report, write_outputs
from cast_jax.models import ModelConfig, init_params, load_pretrained
from cast_jax.train import tree_equal

# GQA (H = 4 query heads over K = 2 kv heads) and Qwen2 biases.
CONFIG = ModelConfig(model_type="qwen2", vocab_size=32, hidden_size=8, intermediate_size=12,
                     num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, attention_bias=True)


def _carrier(seed=0, p_on=0.6):
  base = init_params(CONFIG, jax.random.PRNGKey(seed), std=0.2)
  ft = init_params(CONFIG, jax.random.PRNGKey(seed + 1), std=0.2)
  car = init_carrier(CONFIG, base, ft, jax.random.PRNGKey(seed + 2))
  rng = np.random.default_rng(seed)
  # theta = +-1 with P(on) = p_on; layer 1 gets every gate off, to pin the per-layer order.
  gates = {}
  for g, s in gate_shapes(CONFIG).items():
    t = np.where(rng.random(s) < p_on, 1.0, -1.0).astype(np.float32)
    t[1] = -1.0
    gates[g] = jnp.asarray(t)
  car["gates"] = gates
  # init_params gives zero biases, so their dW would be 0: make every delta entry nonzero.
  for b in GATED_BIASES:
    car["delta"][b] = jnp.asarray(rng.normal(size=car["delta"][b].shape) + 3.0, jnp.float32)
  return base, car


def _numpy_masks(gates):
  """Per-layer 0/1 masks of every gated param, built by hand with numpy broadcasting."""
  m = {g: (np.asarray(t) > 0).astype(np.int64) for g, t in gates.items()}
  group = CONFIG.num_heads // CONFIG.num_kv_heads
  m["v>o"] = np.repeat(m["v"], group, axis=1)  # query head h reads kv head h // group
  out = {}
  for name, (r, c) in GATED_WEIGHTS.items():
    row, col = m[r], m[c]
    out[name] = (row.reshape(row.shape + (1,) * (col.ndim - 1)) *
                 col.reshape(col.shape[:1] + (1,) * (row.ndim - 1) + col.shape[1:]))
  out.update({b: m[c] for b, c in GATED_BIASES.items()})
  return out


def test_sparsity_report_matches_numpy_recounts():
  base, car = _carrier()
  rep = sparsity_report(car)
  L = CONFIG.num_layers
  on = np.zeros(L)
  n_gates = 0
  for t in car["gates"].values():
    t = np.asarray(t).reshape(L, -1)
    on += (t > 0).sum(axis=1)
    n_gates += t.shape[1]
  np.testing.assert_allclose(rep["gate_sparsity"]["per_layer"], 1 - on / n_gates, rtol=1e-12)
  np.testing.assert_allclose(rep["gate_sparsity"]["overall"], 1 - on.sum() / (L * n_gates),
                             rtol=1e-12)
  assert rep["gate_sparsity"]["per_layer"][1] == 1.0
  masks = _numpy_masks(car["gates"])
  kept = sum(m.reshape(L, -1).sum(axis=1) for m in masks.values())
  total = sum(m.reshape(L, -1).shape[1] for m in masks.values())
  np.testing.assert_allclose(rep["delta_sparsity"]["per_layer"], 1 - kept / total, rtol=1e-12)
  assert rep["delta_sparsity"]["active"] == kept.sum() and rep["delta_sparsity"]["total"] == \
      L * total
  # The same entries are what the merge actually changes (dW is dense: random base and ft).
  merged = merge_carrier(base, car)["layers"]
  changed = sum((np.asarray(merged[n]) != np.asarray(base["layers"][n])).reshape(L, -1).sum(1)
                for n in masks)
  np.testing.assert_array_equal(changed, kept)
  for name, m in masks.items():
    np.testing.assert_allclose(rep["delta_params"][name]["overall"], 1 - m.mean(), rtol=1e-12)
  assert rep["train_norms"] is False


def test_write_outputs_round_trip(tmp_path):
  base, car = _carrier(3)
  ctrl = init_multiplier(MultiplierConfig(warmup_steps=4))._replace(lam=jnp.float32(0.25))
  metrics = tmp_path / "metrics.jsonl"
  with open(metrics, "w") as f:
    for s in range(1, 5):
      f.write(json.dumps({"step": s, "task_loss": 2.0 / s, "active_gates": 100 - s,
                          "extra/multiplier/lam": 0.5 * s, "extra/multiplier/ema": 1.0 / s,
                          "extra/multiplier/budget": 1.3 if s >= 2 else 0.0}) + "\n")
  out = tmp_path / "out"
  paths = write_outputs(out, config=CONFIG, base_params=base, carrier=car, controller=ctrl,
                        metrics_path=str(metrics))
  assert set(paths) == {"carrier", "lcdd_model", "active_channels", "sparsity", "sparsity_plot",
                        "controller_curves"}
  for name in ("sparsity_plot", "controller_curves"):
    with open(paths[name], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  loaded, loaded_ctrl = load_carrier(paths["carrier"])
  assert tree_equal(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, car))
  assert float(loaded_ctrl["lam"]) == 0.25 and int(loaded_ctrl["updates"]) == 0
  _, params = load_pretrained(paths["lcdd_model"])
  assert tree_equal(jax.tree.map(np.asarray, params),
                    jax.tree.map(np.asarray, merge_carrier(base, car)))
  with open(paths["active_channels"]) as f:
    channels = json.load(f)
  for g, t in car["gates"].items():
    t = np.asarray(t).reshape(CONFIG.num_layers, -1)
    assert channels[g] == [np.nonzero(row > 0)[0].tolist() for row in t], g
  with open(paths["sparsity"]) as f:
    report = json.load(f)
  assert report["controller"]["lam"] == 0.25
  recount = 1 - sum(int((np.asarray(t) > 0).sum()) for t in car["gates"].values()) / sum(
      np.asarray(t).size for t in car["gates"].values())
  np.testing.assert_allclose(report["gate_sparsity"]["overall"], recount, rtol=1e-12)
  with pytest.raises(FileExistsError):
    write_outputs(out, config=CONFIG, base_params=base, carrier=car, controller=ctrl)
