"""Running the decoder from a given layer's input: the seam a head-ablation sweep skips with.

The residual stream entering layer l does not depend on head masks of layers >= l, so a sweep
over the heads of layer l can compute it once (`forward(..., collect=("residual",))`) and run
only layers [l, L) per mask. This module slices the stacked params (and config) to those layers
and calls the decoder's own layer stack: there is no second implementation of a layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cast_jax.models.config import ModelConfig
from cast_jax.models.decoder import (AdapterFn, Params, _positions_from_mask, _stack,
                                     resolve_attention, take_positions, unembed)


def tail_config(config: ModelConfig, start_layer: int) -> ModelConfig:
  """The config of layers [start_layer, L) as a model of their own (depth, sliding windows)."""
  if not 0 <= start_layer < config.num_layers:
    raise ValueError(f"start_layer={start_layer} outside [0, {config.num_layers})")
  return dataclasses.replace(config, num_layers=config.num_layers - start_layer,
                             sliding_windows=tuple(config.sliding_windows[start_layer:]))


def tail_params(params: Params, start_layer: int) -> Params:
  """params with every stacked layer weight [L, ...] sliced to [L - start_layer, ...]."""
  return dict(params, layers=jax.tree.map(lambda w: w[start_layer:], params["layers"]))


def forward_from_layer(params: Params, config: ModelConfig, hidden: jnp.ndarray,
                       start_layer: int, *, attention_mask: jnp.ndarray | None = None,
                       positions: jnp.ndarray | None = None, head_mask: jnp.ndarray | None = None,
                       adapter_fn: AdapterFn | None = None, adapter_params: Any = None,
                       logits_at: Any = None, attention: str | None = None) -> jnp.ndarray:
  """Layers [start_layer, L), final norm and unembedding, from the input of layer start_layer.

  `forward_from_layer(p, c, forward(p, c, ids, collect=("residual",))[1]["residual"][l], l)`
  equals `forward(p, c, ids)` for every l (and likewise with a head mask that is 1 on layers
  < l).

  Args:
    params, config: the full model (docs/design.md layout).
    hidden: [B, T, D], the residual stream entering layer `start_layer`.
    start_layer: static int in [0, L); one compiled program per value.
    attention_mask, positions: as in `forward` ([B, T]), for the same tokens `hidden` came from.
    head_mask: [L - start_layer, H], the masks of the layers that run.
    adapter_fn, adapter_params: as in `forward`; adapter leaves keep their full leading L axis
      and are sliced here.
    logits_at, attention: as in `forward`.

  Returns:
    float32 logits [B, T, V] ([B, N, V] with `logits_at`).
  """
  start_layer = int(start_layer)
  c = tail_config(config, start_layer)
  if head_mask is not None and tuple(head_mask.shape) != (c.num_layers, c.num_heads):
    raise ValueError(f"forward_from_layer: head_mask {tuple(head_mask.shape)} must be "
                     f"[L - start_layer, H] = {(c.num_layers, c.num_heads)}")
  if hidden.ndim != 3 or hidden.shape[-1] != c.hidden_size:
    raise ValueError(f"forward_from_layer: hidden must be [B, T, {c.hidden_size}], got "
                     f"{tuple(hidden.shape)}")
  B, T = hidden.shape[:2]
  mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask
  if positions is None:
    positions = _positions_from_mask(mask)
  if adapter_params is not None:
    adapter_params = jax.tree.map(lambda a: a[start_layer:], adapter_params)
  attention = resolve_attention(attention, (B, T, c.num_heads, c.head_dim),
                                (B, T, c.num_kv_heads, c.head_dim), hidden.dtype)
  h, _, _ = _stack(tail_params(params, start_layer), c, hidden, positions, mask, jnp.arange(T),
                   None, head_mask, adapter_fn, adapter_params, (), False, attention)
  return unembed(params, config, h if logits_at is None else take_positions(h, logits_at))
