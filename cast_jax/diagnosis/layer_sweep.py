"""The layer-skipping sweep driver shared by the teacher-forced sweeps (MCQ letters, refusal
log-probs), organised in resumable blocks of layers.

For each prompt chunk and layer l the sweep's one compiled program computes the unmasked
residual stream entering l (`layer_skip.hidden_at_layer`, once, outside the vmap over masks)
and runs layers [l, L) under each unit mask of l (`layer_skip.forward_from_any_layer`); the
layer is a traced input, so one program serves every layer and the base values come from the
same program (all-ones masks at the last layer). The shared prefix costs about 1 / U of the
masked work; in exchange nothing of shape [L, B, T, D] is kept and no second program compiles.
Blocks of layers let a killed run keep every block it finished (`done` / `on_block`, stored by
`stage_cache.cached_blocks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from cast_jax.diagnosis.head_ablation import num_units
from cast_jax.eval import batching
from cast_jax.models import ModelConfig
from cast_jax.models.decoder import Params


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One fixed-shape prompt chunk: rows [B, T] (the first len(indices) real, the rest filler
  copies), and the sweep's own per-row inputs (`extra`, e.g. MCQ choice ids [B, C])."""
  indices: np.ndarray
  input_ids: Any
  attention_mask: Any
  extra: dict[str, Any]


def prompt_chunks(token_lists: Sequence[Sequence[int]], batch_size: int, pad_id: int
                  ) -> list[Chunk]:
  """`eval.batching.prompt_chunks` (length-sorted, left padded, fixed [batch_size, T] shapes)
  as device arrays, `extra` empty for the caller to fill (gather per-row inputs with `rows`)."""
  return [Chunk(c.indices, jax.numpy.asarray(c.input_ids), jax.numpy.asarray(c.attention_mask),
                {}) for c in batching.prompt_chunks(token_lists, batch_size, pad_id)]


def rows(chunk: Chunk) -> np.ndarray:
  """int [B]: the source row of each chunk row (fillers repeat the first real row)."""
  B, real = chunk.input_ids.shape[0], len(chunk.indices)
  return np.concatenate([chunk.indices, np.repeat(chunk.indices[:1], B - real)])


def layer_blocks(num_layers: int, layer_block: int | None = None) -> list[tuple[int, int]]:
  """[(a, b)]: consecutive ranges of `layer_block` layers (default: one block of all)."""
  size = num_layers if layer_block is None else int(layer_block)
  if size < 1:
    raise ValueError(f"layer_block={layer_block!r} must be an integer >= 1 (or None: one block)")
  return [(a, min(a + size, num_layers)) for a in range(0, num_layers, size)]


def block_key(a: int, b: int) -> str:
  """The storage name of layer block [a, b)."""
  return f"layers_{a:03d}_{b:03d}"


# base_fn(chunk) -> values [B] of the unablated model;
# layer_fn(chunk, layer, masks [U, L, H]) -> values [U, B] under each unit mask of `layer`.
BaseFn = Callable[[Any], Any]
LayerFn = Callable[[Any, int, Any], Any]


def run(params: Params, config: ModelConfig, chunks: Sequence[Chunk], n_rows: int, *,
        base_fn: BaseFn, layer_fn: LayerFn, layer_masks: Callable[[int], Any], group: int = 1,
        dtype=np.float64, layer_block: int | None = None,
        done: Mapping[str, np.ndarray] | None = None,
        on_block: Callable[[str, np.ndarray], None] | None = None,
        progress: Callable[[float], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Base values [N] and unit-ablated values [L, U, N] over `chunks` (`prompt_chunks`).

  done: {block_key: values [b - a, U, N]} finished by an earlier run (not recomputed).
  on_block(key, values [b - a, U, N]): called as each remaining block finishes, in order.
  progress(units): called with the (fractional) number of units finished by each chunk.
  """
  del params  # the passes close over them
  L, U = config.num_layers, num_units(config, group)
  done = dict(done or {})
  base = np.zeros(n_rows, dtype)
  have_base = False
  out = np.zeros((L, U, n_rows), dtype)
  for a, b in layer_blocks(L, layer_block):
    key = block_key(a, b)
    if key in done:
      got = np.asarray(done[key])
      if got.shape != (b - a, U, n_rows):
        raise ValueError(f"stored sweep block {key} has shape {got.shape}, expected "
                         f"{(b - a, U, n_rows)}: it belongs to another run; use a new workdir")
      out[a:b] = got
      continue
    masks = {layer: layer_masks(layer) for layer in range(a, b)}
    for chunk in chunks:
      real = len(chunk.indices)
      if b == L:
        base[chunk.indices] = np.asarray(base_fn(chunk))[:real]
      for layer in range(a, b):
        got = layer_fn(chunk, layer, masks[layer])
        out[layer][:, chunk.indices] = np.asarray(got)[:, :real]
        if progress is not None:
          progress(U * real / n_rows)
    have_base |= b == L
    if on_block is not None:
      on_block(key, out[a:b].copy())
  if not have_base:  # the last block came from an earlier run
    for chunk in chunks:
      base[chunk.indices] = np.asarray(base_fn(chunk))[:len(chunk.indices)]
  return base, out
