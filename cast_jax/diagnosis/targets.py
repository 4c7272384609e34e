"""Which attention projection a diagnosis is about (`--target q|k|v|o`), and what a "unit" is.

The paper diagnoses query heads through W_q only; its limitations section leaves K, V and O open.
Here a unit is the smallest slice of the target projection that belongs to one head:

  target  unit       parameters of unit u in layer l (layout: docs/design.md)     units / layer
  q       "head"     wq[l, :, u, :]  [D, Dh]   (+ bq[l, u]  [Dh] with include_bias)  H
  k       "kv_head"  wk[l, :, u, :]  [D, Dh]   (+ bk[l, u]  [Dh] with include_bias)  KV
  v       "kv_head"  wv[l, :, u, :]  [D, Dh]   (+ bv[l, u]  [Dh] with include_bias)  KV
  o       "head"     wo[l, u, :, :]  [Dh, D]   (o_proj has no bias)                   H

A unit's gradient vector is its slice flattened in the order shown, the bias appended: P numbers.

Ablating a unit (the functional half, H_gen / H_safe): q and o units zero that query head's
attention output before o_proj (the decoder's `head_mask`), exactly the paper's head ablation.
A k or v unit zeroes the outputs of every query head that reads KV head u under grouped-query
attention, i.e. query heads [u * group, (u + 1) * group) with group = H // KV: the KV head is
removed. Zeroing its K slice alone would not remove it (all-zero keys give uniform attention
weights over the context, a different, still active head), and zeroing its V slice alone would
remove it only when the projection has no bias; zeroing the readers' outputs is the same
"the unit contributes nothing" for both K and V, with or without biases.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from cast_jax.diagnosis import head_ablation
from cast_jax.models import ModelConfig
from cast_jax.models.decoder import Params

TARGETS = ("q", "k", "v", "o")
_WEIGHT = {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}
_BIAS = {"q": "bq", "k": "bk", "v": "bv"}


def check_target(target: str) -> str:
  """`target` if it is one of TARGETS, else ValueError naming the choices."""
  if target not in TARGETS:
    raise ValueError(f"target={target!r}: use one of {', '.join(TARGETS)} (the attention "
                     "projection whose heads are diagnosed)")
  return target


def unit_name(target: str) -> str:
  """"head" for q / o (one query head), "kv_head" for k / v (one key-value head)."""
  return "kv_head" if check_target(target) in ("k", "v") else "head"


def unit_group(config: ModelConfig, target: str) -> int:
  """Query heads one unit ablates: 1 for q / o, H // KV for k / v (module doc)."""
  if unit_name(target) == "head":
    return 1
  if config.num_heads % config.num_kv_heads:
    raise ValueError(f"num_heads={config.num_heads} is not a multiple of num_kv_heads="
                     f"{config.num_kv_heads}; grouped-query units are undefined")
  return config.num_heads // config.num_kv_heads


def target_units(config: ModelConfig, target: str) -> int:
  """Units per layer: H for q / o, KV for k / v."""
  return config.num_heads // unit_group(config, target)


def unit_head_masks(config: ModelConfig, target: str) -> np.ndarray:
  """Head masks of every single-unit ablation of `target`: float32 [L * U, L, H]; row l * U + u
  removes unit u of layer l (`head_ablation.unit_masks` with this target's group)."""
  return head_ablation.unit_masks(config, unit_group(config, target))


def target_params(params: Params, target: str, include_bias: bool = False
                  ) -> dict[str, jnp.ndarray]:
  """The differentiated leaves of `target`: {"wq"} / {"wk"} / {"wv"} / {"wo"}, plus the matching
  bias ("bq" / "bk" / "bv") when `include_bias`. ValueError when a bias is asked for and absent."""
  layers = params["layers"]
  out = {_WEIGHT[check_target(target)]: layers[_WEIGHT[target]]}
  if include_bias:
    if target == "o":
      raise ValueError("include_bias=True with target='o': o_proj has no bias in any supported "
                       "architecture; use include_bias=False")
    name = _BIAS[target]
    if name not in layers:
      raise ValueError(f"include_bias=True but the model has no {target} bias "
                       "(config.attention_bias); use include_bias=False")
    out[name] = layers[name]
  return out


def unit_vectors(grads: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
  """Leaves of `target_params` (or their gradients) -> per-unit vectors [L, U, P] (module doc).

  Exactly one weight leaf ("wq", "wk", "wv" or "wo") must be present; its bias may be.
  """
  weights = [k for k in ("wq", "wk", "wv", "wo") if k in grads]
  if len(weights) != 1:
    raise ValueError(f"unit_vectors: want exactly one of wq / wk / wv / wo, got {sorted(grads)}")
  w = grads[weights[0]]
  if weights[0] == "wo":  # [L, H, Dh, D]: the head axis is already second
    L, U = w.shape[:2]
    return w.reshape(L, U, -1)
  L, D, U, Dh = w.shape
  vec = jnp.transpose(w, (0, 2, 1, 3)).reshape(L, U, D * Dh)
  bias = {"wq": "bq", "wk": "bk", "wv": "bv"}[weights[0]]
  if bias in grads:
    vec = jnp.concatenate([vec, grads[bias]], axis=-1)
  return vec
