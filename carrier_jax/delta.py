"""Gated weight deltas: W = W_base + (m_row (x) m_col) * dW (lcdd-sft-eraser.md Eqs. 1-2, App. A).

A *carrier* is the pytree `{"gates": {group: theta}, "delta": {name: dW}}`, every leaf with a
leading L axis, so it is the decoder's `adapter_params` and `apply_carrier` its `adapter_fn`:
each masked weight is formed once per layer inside the layer loop, and the merged model never
exists as a second copy during training.

Gate groups per layer (Table 5), in this project's head-major layout (docs/design.md):

  attn_read [D]      rows of wq, wk, wv            q  [H, Dh]   columns of wq, bq
  k  [K, Dh]         columns of wk, bk             v  [K, Dh]   columns of wv, bv; rows of wo
  attn_write [D]     columns of wo                 ffn_read [D] rows of w_gate, w_up
  ffn_hidden [F]     columns of w_gate, w_up; rows of w_down
  ffn_write [D]      columns of w_down

The paper's flat q / k / v gates ([H*Dh], [K*Dh]) are these arrays reshaped row-major, which is
HF's q_proj / k_proj / v_proj output order (head h, dim d at h * Dh + d). The row gate of wo
[H, Dh, D] is the v gate read through the GQA grouping: query head h attends with kv head
h // (H / K), so its context channel (h, d) is built from value channel (h // (H / K), d)
(Eq. 20 with the grouping the decoder's `attend` uses). gate_proj is gated like up_proj (Eq. 9
gates the pre-activation `x W` of the FFN's read; with a SwiGLU both of its read matrices sit in
that position). The biases of Qwen2 (bq, bk, bv) get their projection's column gate, since a
bias is a column offset. Norm weights are not in the carrier: by default they stay at the base
values, so everything outside the gates is the base model; `init_carrier(train_norms=True)` adds
ungated norm deltas (then all-gates-off is no longer the base model).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from carrier_jax.gates import GateInit, heaviside_ste, init_gate_logits
from cast_jax.models import ModelConfig

Params = dict[str, Any]
GATE_GROUPS = ("attn_read", "q", "k", "v", "attn_write", "ffn_read", "ffn_hidden", "ffn_write")
# weight -> (row gate, column gate); "v>o" is the v gate expanded over each kv group's query heads.
GATED_WEIGHTS = {
    "wq": ("attn_read", "q"), "wk": ("attn_read", "k"), "wv": ("attn_read", "v"),
    "wo": ("v>o", "attn_write"),
    "w_gate": ("ffn_read", "ffn_hidden"), "w_up": ("ffn_read", "ffn_hidden"),
    "w_down": ("ffn_hidden", "ffn_write"),
}
GATED_BIASES = {"bq": "q", "bk": "k", "bv": "v"}
NORM_WEIGHTS = ("attn_norm", "mlp_norm", "q_norm", "k_norm")
# `checkpoint_name` of every full-size array `apply_carrier` forms (mask, masked delta, weight): a remat
# policy that saves everything but these (`carrier_jax.lcdd.REMAT_MODES["weights"]`) recomputes
# them in the backward (one elementwise pass) instead of keeping a second copy of the model.
CARRIER_WEIGHT = "carrier_weight"


def gate_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shapes of the 8 gate groups, each with the leading L axis (see the module docstring)."""
  c = config
  L, D, H, K, Dh, F = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                       c.intermediate_size)
  return {"attn_read": (L, D), "q": (L, H, Dh), "k": (L, K, Dh), "v": (L, K, Dh),
          "attn_write": (L, D), "ffn_read": (L, D), "ffn_hidden": (L, F), "ffn_write": (L, D)}


def delta_names(config: ModelConfig, train_norms: bool = False) -> tuple[str, ...]:
  """Names of the layer params a carrier holds deltas for, for this architecture."""
  names = list(GATED_WEIGHTS)
  if config.attention_bias:
    names += list(GATED_BIASES)
  if train_norms:
    names += [n for n in NORM_WEIGHTS if n in ("attn_norm", "mlp_norm") or config.qk_norm]
  return tuple(names)


def init_carrier(config: ModelConfig, base_params: Params, ft_params: Params, key: jax.Array, *,
                 gate_init: GateInit = GateInit(), train_norms: bool = False,
                 dtype=jnp.float32) -> Params:
  """A carrier starting at dW = W_ft - W_base (Algorithm 1, line 1) with fresh gate logits.

  Args:
    config: the model config (base and fine-tuned share it).
    base_params, ft_params: full param pytrees (docs/design.md); only "layers" is read.
    key: PRNG key for the gate logits.
    gate_init: see `carrier_jax.gates.GateInit` (default: the release's N(1.5, 0.5)).
    train_norms: also hold (ungated) deltas for the norm weights.
    dtype: of the carrier leaves (float32 master copy; the difference is taken in float32).

  Returns:
    {"gates": {group: [L, ...]}, "delta": {name: [L, ...] like the layer param}}.
  """
  base, ft = base_params["layers"], ft_params["layers"]
  delta = {n: (ft[n].astype(jnp.float32) - base[n].astype(jnp.float32)).astype(dtype)
           for n in delta_names(config, train_norms)}
  return {"gates": init_gate_logits(gate_shapes(config), key, gate_init, dtype), "delta": delta}


def _outer(row: jax.Array, col: jax.Array) -> jax.Array:
  """Rank-1 mask M[i..., j...] = row[i...] * col[j...] (Eq. 2), shape row.shape + col.shape."""
  return row.reshape(row.shape + (1,) * col.ndim) * col


def expand_v_to_heads(m_v: jax.Array, num_heads: int) -> jax.Array:
  """The wo row gate: m_v [..., K, Dh] -> [..., H, Dh], query head h taking kv head h // (H/K)."""
  return jnp.repeat(m_v, num_heads // m_v.shape[-2], axis=-2)


def layer_masks(gates: Params, num_heads: int) -> dict[str, tuple[jax.Array, jax.Array | None]]:
  """Binary (row, column) gate vectors of one layer's gated params (STE gradients).

  Args:
    gates: one layer's gate logits {group: [...]} (no L axis).
    num_heads: H, to map the v gate onto wo's query-head rows.

  Returns:
    {weight name: (m_row, m_col)} for GATED_WEIGHTS and {bias name: (m_col, None)}.
  """
  m = {g: heaviside_ste(t) for g, t in gates.items()}
  m["v>o"] = expand_v_to_heads(m["v"], num_heads)
  out = {w: (m[r], m[c]) for w, (r, c) in GATED_WEIGHTS.items()}
  out.update({b: (m[c], None) for b, c in GATED_BIASES.items()})
  return out


def apply_carrier(layer_params: Params, layer_carrier: Params) -> Params:
  """The decoder's `adapter_fn`: one layer's params with the gated deltas added.

  Args:
    layer_params: one layer's base params (no L axis), e.g. wq [D, H, Dh].
    layer_carrier: one layer's carrier {"gates", "delta"} (no L axis).

  Returns:
    layer params with W = W_base + (m_row (x) m_col) * dW for every gated weight and bias held
    in the carrier, W_base + dW for norm deltas, everything else untouched; each in the base
    param's dtype.
  """
  delta = layer_carrier["delta"]
  masks = layer_masks(layer_carrier["gates"], layer_params["wo"].shape[0])
  out = dict(layer_params)
  for name, dw in delta.items():
    w = layer_params[name]
    if name in masks:
      row, col = masks[name]
      m = row if col is None else checkpoint_name(_outer(row, col), CARRIER_WEIGHT)
      dw = checkpoint_name(m.astype(dw.dtype) * dw, CARRIER_WEIGHT)
    out[name] = checkpoint_name((w + dw).astype(w.dtype), CARRIER_WEIGHT)
  return out


def merge_carrier(base_params: Params, carrier: Params) -> Params:
  """The merged model (for export / evaluation without the adapter): a full param pytree.

  Args:
    base_params: full base params (docs/design.md).
    carrier: {"gates", "delta"} with leading L axes.

  Returns:
    base_params with "layers" replaced by `apply_carrier` mapped over L.
  """
  layers = jax.vmap(apply_carrier)(base_params["layers"], carrier)
  return {**base_params, "layers": layers}


def carrier_stats(carrier: Params) -> dict[str, Any]:
  """Active gate elements and active delta entries per layer (host numpy, exact integers).

  A delta entry is active when its mask entry m_row[i] * m_col[j] is 1, so a matrix's count is
  sum(m_row) * sum(m_col) and a bias's is sum(m_col). Norm deltas (ungated) are not counted.

  Args:
    carrier: {"gates", "delta"} with leading L axes (concrete arrays).

  Returns (per-layer counts; overall fractions are sums over L divided by L * num_...):
    {"active_gates": {group: int64 [L]}, "num_gates": {group: int},
     "active_delta": {name: int64 [L]}, "num_delta": {name: int},
     "active_gates_layer": int64 [L], "num_gates_layer": int (all 8 groups),
     "active_delta_layer": int64 [L], "num_delta_layer": int (all gated weights and biases)}
  """
  gates = {g: np.asarray(t) for g, t in carrier["gates"].items()}
  L = gates["v"].shape[0]
  on = {g: (t > 0).reshape(L, -1).sum(axis=1).astype(np.int64) for g, t in gates.items()}
  size = {g: int(np.prod(t.shape[1:])) for g, t in gates.items()}
  # The wo row gate repeats each kv head's v gate over its H / K query heads.
  group = carrier["delta"]["wo"].shape[1] // gates["v"].shape[1]
  on["v>o"], size["v>o"] = on["v"] * group, size["v"] * group
  active, total = {}, {}
  for name in carrier["delta"]:
    if name in GATED_WEIGHTS:
      r, c = GATED_WEIGHTS[name]
      active[name], total[name] = on[r] * on[c], size[r] * size[c]
    elif name in GATED_BIASES:
      c = GATED_BIASES[name]
      active[name], total[name] = on[c].copy(), size[c]
  return {
      "active_gates": {g: on[g] for g in GATE_GROUPS},
      "num_gates": {g: size[g] for g in GATE_GROUPS},
      "active_delta": active, "num_delta": total,
      "active_gates_layer": sum(on[g] for g in GATE_GROUPS),
      "num_gates_layer": sum(size[g] for g in GATE_GROUPS),
      "active_delta_layer": sum(active.values()),
      "num_delta_layer": sum(total.values()),
  }


def active_channels(carrier: Params) -> dict[str, list[list[int]]]:
  """Indices of the gates that are on, per group and layer (for the carrier's JSON report).

  q / k / v indices are flat `h * Dh + d` (HF projection output order).

  Returns:
    {group: [layer 0 indices, layer 1 indices, ...]} with sorted python ints.
  """
  out = {}
  for g in GATE_GROUPS:
    t = np.asarray(carrier["gates"][g])
    flat = t.reshape(t.shape[0], -1) > 0
    out[g] = [np.flatnonzero(row).tolist() for row in flat]
  return out
