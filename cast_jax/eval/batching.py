"""Fixed-shape chunking for the batched eval runners (padding itself is ``cast_jax.data``'s).

Every jitted runner sees only (batch_size, bucketed length) shapes, so it compiles once per
length bucket instead of once per batch. Rows are sorted by length before chunking so each chunk
pads little; callers scatter results back with the returned indices. Lengths are bucketed
geometrically (`chunk_length`): a bounded pad fraction at any length, few shapes overall.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from cast_jax.data.batching import collate_prompts


def chunk_length(n: int, multiple: int | None = None) -> int:
  """Padded length of a chunk whose longest row has n >= 1 tokens.

  `multiple` given: the next multiple of it. None: the next multiple of max(8, p / 8), p the
  smallest power of two >= n, i.e. four lengths per doubling. A fixed multiple of 32 padded the
  70-token testbed MCQ prompts to 96 (a third of the forward wasted); this adds fewer than
  max(8, n / 4) pad tokens while a stream of prompts still compiles O(log max length) programs.
  """
  n = max(int(n), 1)
  if multiple is None:
    multiple = max(8, (1 << (n - 1).bit_length()) // 8)
  return -(-n // multiple) * multiple


def encode(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
  """Token ids of each text. Works with an HF tokenizer or a ``tokenizers.Tokenizer``."""
  if isinstance(texts, str):
    raise TypeError("encode takes a list of texts, got a single string")
  out = []
  for text in texts:
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    out.append(list(getattr(ids, "ids", ids)))
  return out


@dataclasses.dataclass(frozen=True)
class PaddedChunk:
  """One fixed-shape chunk: rows [batch_size, L]; the first ``len(indices)`` rows are real, the
  rest repeat row 0 (a real row, so no all-pad row reaches attention) and must be dropped."""
  indices: np.ndarray
  input_ids: np.ndarray
  attention_mask: np.ndarray


def prompt_chunks(token_lists: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                  multiple: int | None = None) -> Iterator[PaddedChunk]:
  """Length-sorted, left-padded, row-padded chunks of prompts (see ``PaddedChunk``); each
  chunk's length is ``chunk_length(longest prompt in it, multiple)``."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  empty = [i for i, t in enumerate(token_lists) if not len(t)]
  if empty:
    raise ValueError(f"prompts {empty[:5]} encode to zero tokens; every prompt needs >= 1 token")
  order = np.argsort([-len(t) for t in token_lists], kind="stable")
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    rows = [token_lists[i] for i in idx]
    rows += [rows[0]] * (batch_size - len(rows))
    length = chunk_length(max(len(r) for r in rows), multiple)
    batch = collate_prompts(rows, pad_id=pad_id, buckets=(length,))
    yield PaddedChunk(indices=idx, input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"])


def row_chunks(arrays: dict[str, np.ndarray], batch_size: int, length_key: str = "attention_mask",
               multiple: int | None = None
               ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
  """Chunks of a right-padded batch dict of [N, T] arrays: rows sorted by length, trailing pad
  columns trimmed, then zero-padded on the right to ``chunk_length(longest row, multiple)`` and
  to ``batch_size`` rows (extra rows repeat the chunk's first row). Yields (indices of the real
  rows, chunk)."""
  n = next(iter(arrays.values())).shape[0]
  lengths = np.asarray(arrays[length_key]).sum(axis=1)
  order = np.argsort(-lengths, kind="stable")
  for start in range(0, n, batch_size):
    idx = order[start:start + batch_size]
    rows = np.concatenate([idx, np.repeat(idx[:1], batch_size - len(idx))])
    length = chunk_length(int(lengths[idx].max()), multiple)
    chunk = {}
    for key, value in arrays.items():
      value = np.asarray(value)[rows]
      out = np.zeros((batch_size, length), dtype=np.int32)
      keep = min(length, value.shape[1])
      out[:, :keep] = value[:, :keep]
      chunk[key] = out
    yield idx, chunk
