"""Boundary checks of model inputs: token ids in the vocabulary, and the shapes of ids, masks,
positions and head masks against each other and the config.

Out-of-range ids fail silently inside XLA: `jnp.take` fills an id >= vocab_size with NaN and
wraps -1 to the last row, so a data bug surfaces much later as NaN logits or a "lower the
learning rate" error. These checks run where host-side ids enter (forward / forward_cached,
generate, the eval runners, run_sft's dataset) and name the argument, the position and the fix.
Shape checks also run under jit (shapes are static); value checks are skipped for traced ids.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.core import Tracer

from cast_jax.models.config import ModelConfig


class InputError(ValueError):
  """A model input that would give silently wrong results; the message names it and the fix."""


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _fix_for(value: int, vocab_size: int) -> str:
  if value < 0:
    return ("Negative ids are not padding: pad with the tokenizer's pad id (or any valid id) "
            "and mark pads 0 in attention_mask.")
  return (f"The ids come from a tokenizer larger than this model's vocabulary (vocab_size="
          f"{vocab_size}): encode with the model's own tokenizer, or resize its embeddings.")


def check_token_ids(ids: Any, vocab_size: int, *, name: str = "input_ids",
                    where: str = "forward") -> None:
  """Raises InputError unless every id is an integer in [0, vocab_size).

  Args:
    ids: an int array of any shape, or a ragged sequence of id sequences (N prompts). Traced
      values are skipped (checked where they entered, on the host).
    vocab_size: the model's vocabulary size.
    name, where: the argument and the function, for the message.
  """
  if isinstance(ids, Tracer) or (isinstance(ids, jax.Array) and not ids.is_fully_addressable):
    return  # traced, or spread over hosts: checked where the ids entered, on the host
  if isinstance(ids, (list, tuple)) and ids and not np.isscalar(ids[0]):
    for n, row in enumerate(ids):  # ragged prompts: name the row the caller knows
      check_token_ids(row, vocab_size, name=f"{name}[{n}]", where=where)
    return
  arr = np.asarray(ids)
  if arr.size == 0:
    return
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
    raise InputError(f"{where}: {name} has dtype {arr.dtype}; token ids must be integers (cast "
                     "with .astype(np.int32)).")
  bad = (arr < 0) | (arr >= vocab_size)
  if bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    value = int(arr[pos])
    where_in = f"{name}{list(pos)}" if pos else name
    raise InputError(f"{where}: {where_in} = {value} is outside the vocabulary [0, {vocab_size}) "
                     f"({int(bad.sum())} such id(s)). {_fix_for(value, vocab_size)}")


def _check_shape(where: str, name: str, value: Any, want: tuple[int, ...], meaning: str,
                 fix: str = "") -> None:
  if value is not None and _shape(value) != want:
    raise InputError(f"{where}: {name} has shape {_shape(value)}, expected {want} ({meaning})."
                     + (f" {fix}" if fix else ""))


def _batch_and_len(config: ModelConfig, input_ids: Any, input_embeds: Any,
                   where: str) -> tuple[int, int]:
  """(B, T) from input_embeds [B, T, D] or input_ids [B, T]; checks ids' values when concrete."""
  if input_embeds is not None:
    shape = _shape(input_embeds)
    if len(shape) != 3 or shape[2] != config.hidden_size:
      raise InputError(f"{where}: input_embeds has shape {shape}, expected [B, T, D] with D = "
                       f"hidden_size = {config.hidden_size}.")
    return shape[0], shape[1]
  if input_ids is None:
    raise InputError(f"{where}: pass input_ids [B, T] or input_embeds [B, T, D].")
  shape = _shape(input_ids)
  if len(shape) != 2:
    fix = " Add a batch axis: ids[None]." if len(shape) == 1 else ""
    raise InputError(f"{where}: input_ids has shape {shape}, expected [B, T] (batch, "
                     f"tokens).{fix}")
  check_token_ids(input_ids, config.vocab_size, where=where)
  return shape


def check_forward_inputs(config: ModelConfig, input_ids: Any = None, *,
                         attention_mask: Any = None, positions: Any = None,
                         head_mask: Any = None, input_embeds: Any = None,
                         where: str = "forward") -> None:
  """Checks `forward`'s inputs: input_ids [B, T] (ids in the vocabulary when concrete) or
  input_embeds [B, T, D]; attention_mask and positions [B, T]; head_mask [L, H]."""
  B, T = _batch_and_len(config, input_ids, input_embeds, where)
  _check_shape(where, "attention_mask", attention_mask, (B, T), "one entry per token of the ids",
               "Build it with the same padding as the ids.")
  _check_shape(where, "positions", positions, (B, T), "one position per token")
  _check_shape(where, "head_mask", head_mask, (config.num_layers, config.num_heads),
               "[num_layers, num_heads]")


def check_cached_inputs(config: ModelConfig, input_ids: Any, positions: Any, kv_valid: Any,
                        cache: Any, *, head_mask: Any = None, input_embeds: Any = None,
                        where: str = "forward_cached") -> None:
  """Checks `forward_cached`'s inputs against each other and the cache [L, B, S, K, Dh]."""
  B, T = _batch_and_len(config, input_ids, input_embeds, where)
  _check_shape(where, "positions", positions, (B, T), "one position per new token")
  k = cache["k"] if isinstance(cache, dict) and "k" in cache else None
  if k is not None:
    want = (config.num_layers, B, _shape(k)[2], config.num_kv_heads, config.head_dim)
    _check_shape(where, "cache['k']", k, want, "[L, B, S, K, Dh] from init_cache")
    _check_shape(where, "kv_valid", kv_valid, (B, _shape(k)[2]), "[B, S]: one flag per slot")
  _check_shape(where, "head_mask", head_mask, (config.num_layers, config.num_heads),
               "[num_layers, num_heads]")


def check_scorer_ids(config: ModelConfig, where: str, **named_ids: Any) -> None:
  """`check_token_ids` for each keyword (e.g. prompt_ids=ragged lists, choice_ids=[N, C])."""
  for name, ids in named_ids.items():
    check_token_ids(ids, config.vocab_size, name=name, where=where)
