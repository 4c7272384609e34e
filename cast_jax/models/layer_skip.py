"""Running the decoder from a given layer's input: the seam a head-ablation sweep skips with.

The residual stream entering layer l does not depend on head masks of layers >= l, so a sweep
over the heads of layer l can compute it once (`forward(..., collect=("residual",))`) and run
only layers [l, L) per mask. `forward_from_layer` slices the stacked params (and config) to those
layers and calls the decoder's own layer stack (one compiled program per start layer);
`forward_from_any_layer` takes the start layer as a traced value and loops over the decoder's
own `_layer` from there (one program for every start layer) and, when only the last positions
are scored, runs the last layer's queries, attention and MLP for those positions only (its keys
and values for every position). Either way there is no second implementation of a layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.models.config import ModelConfig
from cast_jax.models.decoder import (AdapterFn, Params, _layer, _positions_from_mask, _stack,
                                     embed, resolve_attention, rms_norm, take_positions,
                                     unembed)
from cast_jax.models.rope import rope_tables


def tail_config(config: ModelConfig, start_layer: int) -> ModelConfig:
  """The config of layers [start_layer, L) as a model of their own (depth, sliding windows)."""
  if not 0 <= start_layer < config.num_layers:
    raise ValueError(f"start_layer={start_layer} outside [0, {config.num_layers})")
  return dataclasses.replace(config, num_layers=config.num_layers - start_layer,
                             sliding_windows=tuple(config.sliding_windows[start_layer:]))


def tail_params(params: Params, start_layer: int) -> Params:
  """params with every stacked layer weight [L, ...] sliced to [L - start_layer, ...]."""
  return dict(params, layers=jax.tree.map(lambda w: w[start_layer:], params["layers"]))


def _check_inputs(fn: str, mask_shape: str, config: ModelConfig, head_mask, hidden) -> None:
  """ValueError naming `fn` unless head_mask is None or [config.num_layers, H] and hidden is
  [B, T, D] (config: the layers the function runs)."""
  want = (config.num_layers, config.num_heads)
  if head_mask is not None and tuple(head_mask.shape) != want:
    raise ValueError(f"{fn}: head_mask {tuple(head_mask.shape)} must be {mask_shape} = {want}")
  if hidden.ndim != 3 or hidden.shape[-1] != config.hidden_size:
    raise ValueError(f"{fn}: hidden must be [B, T, {config.hidden_size}], got "
                     f"{tuple(hidden.shape)}")


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
  _check_inputs("forward_from_layer", "[L - start_layer, H]", c, head_mask, hidden)
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


def _layer_at(tree: Any, i: jnp.ndarray) -> Any:
  """Row i (traced) of every leaf's leading axis."""
  return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), tree)


def suffix_length(logits_at: Any, T: int) -> int | None:
  """The number of trailing positions a static `logits_at` (ints, negative from the end) reads,
  or None when it is traced or reads position 0 (then every position is kept)."""
  if logits_at is None or isinstance(logits_at, jax.Array):
    return None
  at = np.asarray(logits_at)
  if at.dtype.kind not in "iu" or at.size == 0:
    return None
  keep = int(T - (at % T).min())
  return keep if keep < T else None


class _Layers:
  """The decoder's own `_layer` for layer i (traced) of one batch: its weights by a dynamic
  index (adapters applied), rope tables, window and head-mask row."""

  def __init__(self, params, config, B, T, mask, positions, head_mask, adapter_fn,
               adapter_params, attention, dtype):
    c = config
    self.params, self.config, self.mask = params, config, mask
    self.adapter_fn, self.adapter_params = adapter_fn, adapter_params
    self.positions = _positions_from_mask(mask) if positions is None else positions
    self.attention = resolve_attention(attention, (B, T, c.num_heads, c.head_dim),
                                       (B, T, c.num_kv_heads, c.head_dim), dtype)
    self.cos, self.sin = rope_tables(c, self.positions)
    self.windows = jnp.asarray(np.array(c.sliding_windows, np.int32))
    self.head_mask = head_mask
    self.q_index = jnp.arange(T)

  def weights(self, i):
    lp = _layer_at(self.params["layers"], i)
    if self.adapter_fn is not None:
      lp = self.adapter_fn(lp, _layer_at(self.adapter_params, i))
    return lp

  def mask_row(self, i):
    return None if self.head_mask is None else self.head_mask[i]

  def run(self, lo, hi, h):
    """Layers [lo, hi) (traced bounds: one program for any range) on h [B, T, D]."""
    def body(i, h):
      h, _, _ = _layer(self.weights(i), self.config, h, self.cos, self.sin, self.windows[i],
                       self.mask_row(i), self.mask, self.q_index, None, (), self.attention)
      return h
    return jax.lax.fori_loop(jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32), body, h)

  def last_tail(self, h, keep):
    """Layer L - 1 on h [B, T, D], output for the last `keep` positions only [B, keep, D]."""
    i, T = self.config.num_layers - 1, h.shape[1]
    lp, window, hm = self.weights(i), self.windows[i], self.mask_row(i)
    args = (self.cos, self.sin, window, hm, self.mask, self.q_index)
    if keep == T:
      return _layer(lp, self.config, h, *args, None, (), self.attention)[0]
    # Keys and values of every position from the decoder's own layer in cache mode (its other
    # outputs are unused, so XLA drops that work), then the scored tail as new tokens that
    # attend over them, as a decoding step does.
    kv = jnp.zeros((1, h.shape[0], T, self.config.num_kv_heads, self.config.head_dim), h.dtype)
    _, _, (ck, cv) = _layer(lp, self.config, h, *args, (kv, kv, 0), (), "einsum")
    s = T - keep
    return _layer(lp, self.config, h[:, s:], self.cos[:, s:], self.sin[:, s:], window, hm,
                  self.mask, self.q_index[s:], (ck, cv, 0), (), "einsum")[0]


def hidden_at_layer(params: Params, config: ModelConfig, input_ids: jnp.ndarray, layer: Any, *,
                    attention_mask: jnp.ndarray | None = None,
                    positions: jnp.ndarray | None = None, adapter_fn: AdapterFn | None = None,
                    adapter_params: Any = None, attention: str | None = None) -> jnp.ndarray:
  """The unmasked residual stream entering `layer`: [B, T, D] from input_ids int [B, T].

  `layer` (int or traced int32 scalar in [0, L)) is a loop bound, so one compiled program
  serves every layer; the result equals `forward(..., collect=("residual",))` row `layer`.
  Sweeps call it once per prompt chunk and start layer, outside their vmap over masks, instead
  of keeping every layer's residual [L, B, T, D] (and compiling a program for it).
  """
  B, T = input_ids.shape
  h = embed(params, input_ids)
  mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask
  layers = _Layers(params, config, B, T, mask, positions, None, adapter_fn, adapter_params,
                   attention, h.dtype)
  return layers.run(0, layer, h)


def forward_from_any_layer(params: Params, config: ModelConfig, hidden: jnp.ndarray,
                           start_layer: Any, *, attention_mask: jnp.ndarray | None = None,
                           positions: jnp.ndarray | None = None,
                           head_mask: jnp.ndarray | None = None,
                           adapter_fn: AdapterFn | None = None, adapter_params: Any = None,
                           logits_at: Any = None, last_positions: int | None = None,
                           attention: str | None = None) -> jnp.ndarray:
  """`forward_from_layer` with a traced start layer, and the last layer cut to the scored tail.

  Layers [start_layer, L - 1) run in a loop with a dynamic start (one compiled program serves
  every start layer, where `forward_from_layer` compiles one per value); the last layer then
  computes its keys and values for every position but its queries, attention, o_proj and MLP
  only for the last `last_positions` positions, the only ones the logits read (MCQ letters:
  1 of ~80 prompt tokens).

  Args:
    params, config: the full model.
    hidden: [B, T, D], the residual stream entering layer `start_layer` (`hidden_at_layer`).
    start_layer: int or traced int32 scalar in [0, L).
    attention_mask, positions: as in `forward`, for the tokens `hidden` came from.
    head_mask: [L, H] (every layer; rows below start_layer are not read).
    adapter_fn, adapter_params: as in `forward` (adapter leaves with their full leading L axis).
    logits_at: as in `forward`: int [N] or [B, N] token indices, negative from the end.
    last_positions: static int, a promise that `logits_at` reads only the last
      `last_positions` tokens (needed when `logits_at` is traced; inferred from a static one;
      None with logits_at None: every position).
    attention: as in `forward`, for layers [start_layer, L - 1) (the cut last layer uses einsum
      attention over its cached keys, as decoding does).

  Returns:
    float32 logits [B, N, V] at `logits_at` ([B, T, V] without it).
  """
  L = config.num_layers
  _check_inputs("forward_from_any_layer", "[L, H]", config, head_mask, hidden)
  B, T = hidden.shape[:2]
  keep = suffix_length(logits_at, T) if last_positions is None else int(last_positions)
  if keep is not None and not 1 <= keep <= T:
    raise ValueError(f"forward_from_any_layer: last_positions={keep} outside [1, T={T}]")
  if keep is None:
    keep = T
  mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask
  layers = _Layers(params, config, B, T, mask, positions, head_mask, adapter_fn, adapter_params,
                   attention, hidden.dtype)
  tail = layers.last_tail(layers.run(start_layer, L - 1, hidden), keep)
  tail = rms_norm(tail, params["final_norm"], config.rms_norm_eps)
  if logits_at is not None:
    at = jnp.asarray(logits_at, jnp.int32)
    at = jnp.where(at < 0, at + T, at) - (T - keep)  # token index -> row of the kept tail
    tail = take_positions(tail, at)
  return unembed(params, config, tail)
