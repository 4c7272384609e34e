"""Padded batches, length buckets, truncation and a seed-deterministic, resumable epoch order.

Batches follow docs/design.md: dicts of numpy int32 arrays. Training batches (`input_ids`,
`attention_mask`, `loss_mask`, [B, T]) are right padded; prompt batches (`input_ids`,
`attention_mask`, [B, P]) are left padded so generation continues from the last column.

The order of epoch `e` is a pure function of (seed, e): `np.random.default_rng([seed, e])`. So the
batch at (epoch, step) can be rebuilt without replaying earlier epochs, which is what exact resume
needs.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import numpy as np

from cast_jax.data import chat

Example = tuple[np.ndarray, np.ndarray]  # (input_ids [T], loss_mask [T]) int32


def _require_nonempty(n: int, name: str) -> None:
  if n == 0:
    raise ValueError(f"Dataset {name!r} is empty: no examples to batch. Check the source file, "
                     "the split and any filters (limit, data_types, ...).")


def bucket_length(n: int, *, multiple: int = 64, buckets: Sequence[int] | None = None) -> int:
  """Padded length for a batch whose longest row has `n` tokens.

  Args:
    n: longest row length (>= 0).
    multiple: round up to a multiple of this (used when `buckets` is None).
    buckets: explicit sorted lengths; the smallest bucket >= n is used.
  Returns:
    int, the padded length T >= n, so jit sees only a few distinct shapes.
  """
  if n < 0:
    raise ValueError(f"bucket_length: length must be >= 0, got {n}")
  if buckets is not None:
    fit = [b for b in sorted(buckets) if b >= n]
    if not fit:
      raise ValueError(f"bucket_length: row of {n} tokens exceeds the largest bucket "
                       f"{max(buckets)}; add a bucket or truncate to max_len first.")
    return int(fit[0])
  if multiple < 1:
    raise ValueError(f"bucket_length: multiple must be >= 1, got {multiple}")
  return max(multiple, -(-n // multiple) * multiple)


def truncate_examples(examples: Sequence[Example], max_len: int, *,
                      name: str = "dataset") -> list[Example]:
  """Right-truncates examples to `max_len` tokens, dropping those left with no response token.

  Logs one warning with the number of truncated and dropped examples (never silent).
  Returns: list of (input_ids int32 [<=max_len], loss_mask int32 [<=max_len]).
  """
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2, got {max_len}")
  out, n_trunc, n_drop = [], 0, 0
  for ids, mask in examples:
    if len(ids) > max_len:
      n_trunc += 1
      ids, mask = ids[:max_len], mask[:max_len]
    # A target at position 0 has no logits predicting it (loss_mask[t] is predicted at t-1).
    if not np.asarray(mask)[1:].any():
      n_drop += 1
      continue
    out.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
  if n_trunc or n_drop:
    logging.warning("%s: %d of %d examples truncated to max_len=%d; %d dropped with no response "
                    "token left.", name, n_trunc, len(examples), max_len, n_drop)
  return out


def encode_dataset(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_len: int,
                   name: str = "dataset", system: str | None = None,
                   template_kwargs: Mapping[str, Any] | None = None) -> list[Example]:
  """Encodes (prompt, response) pairs with `chat.encode_example`, then `truncate_examples`.

  Args:
    pairs: (prompt, response) strings, e.g. `[(r.prompt, r.response) for r in chat_records]`.
  Returns:
    list of (input_ids int32 [T_i], loss_mask int32 [T_i]), T_i <= max_len.
  """
  _require_nonempty(len(pairs), name)
  encoded = [chat.encode_example(tokenizer, p, r, system=system, template_kwargs=template_kwargs)
             for p, r in pairs]
  out = truncate_examples(encoded, max_len, name=name)
  _require_nonempty(len(out), f"{name} (after truncation to max_len={max_len})")
  return out


def collate_train(examples: Sequence[Example], *, pad_id: int, multiple: int = 64,
                  buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Right-padded training batch.

  Returns:
    {"input_ids", "attention_mask", "loss_mask"}: int32 [B, T], T = bucket_length(longest row).
  """
  _require_nonempty(len(examples), "training batch")
  t = bucket_length(max(len(ids) for ids, _ in examples), multiple=multiple, buckets=buckets)
  ids = np.full((len(examples), t), pad_id, np.int32)
  attn = np.zeros((len(examples), t), np.int32)
  loss = np.zeros((len(examples), t), np.int32)
  for b, (row, mask) in enumerate(examples):
    if len(row) != len(mask):
      raise ValueError(f"example {b}: input_ids has {len(row)} tokens but loss_mask {len(mask)}")
    ids[b, :len(row)], attn[b, :len(row)], loss[b, :len(row)] = row, 1, mask
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def collate_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int, multiple: int = 64,
                    buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Left-padded prompt batch for generation / next-token scoring.

  Returns:
    {"input_ids", "attention_mask"}: int32 [B, P], P = bucket_length(longest prompt).
  """
  _require_nonempty(len(prompts), "prompt batch")
  p = bucket_length(max(len(x) for x in prompts), multiple=multiple, buckets=buckets)
  ids = np.full((len(prompts), p), pad_id, np.int32)
  attn = np.zeros((len(prompts), p), np.int32)
  for b, row in enumerate(prompts):
    if len(row):
      ids[b, p - len(row):], attn[b, p - len(row):] = row, 1
  return {"input_ids": ids, "attention_mask": attn}


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """Example indices of epoch `epoch`, int64 [num_examples]; a pure function of (seed, epoch)."""
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int, *, drop_last: bool = True) -> int:
  """Number of batches in one epoch (the last partial batch is dropped when `drop_last`)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def train_batch_at(examples: Sequence[Example], *, epoch: int, step: int, batch_size: int,
                   seed: int, pad_id: int, shuffle: bool = True, drop_last: bool = True,
                   multiple: int = 64, buckets: Sequence[int] | None = None,
                   name: str = "dataset") -> dict[str, np.ndarray]:
  """The training batch at (epoch, step), rebuilt from scratch (no iteration history).

  Returns: `collate_train` dict, int32 [B, T].
  """
  _require_nonempty(len(examples), name)
  n_steps = steps_per_epoch(len(examples), batch_size, drop_last=drop_last)
  if not 0 <= step < n_steps:
    raise ValueError(f"{name}: step {step} outside epoch of {n_steps} steps "
                     f"({len(examples)} examples, batch_size={batch_size}).")
  order = epoch_order(len(examples), seed=seed, epoch=epoch, shuffle=shuffle)
  rows = order[step * batch_size:(step + 1) * batch_size]
  return collate_train([examples[i] for i in rows], pad_id=pad_id, multiple=multiple,
                       buckets=buckets)


def iterate_train_batches(examples: Sequence[Example], *, batch_size: int, seed: int, pad_id: int,
                          start_epoch: int = 0, start_step: int = 0, num_epochs: int | None = None,
                          shuffle: bool = True, drop_last: bool = True, multiple: int = 64,
                          buckets: Sequence[int] | None = None,
                          name: str = "dataset"
                          ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
  """Yields (epoch, step, batch) from (start_epoch, start_step) on.

  Resuming after the batch at (e, s) was consumed: pass start_epoch=e, start_step=s + 1 (a step
  past the end of the epoch rolls over). `num_epochs` counts from epoch 0 (None: forever).
  Batches are `collate_train` dicts, int32 [B, T].
  """
  _require_nonempty(len(examples), name)
  n_steps = steps_per_epoch(len(examples), batch_size, drop_last=drop_last)
  if n_steps == 0:
    raise ValueError(f"{name}: {len(examples)} examples give no full batch of {batch_size}; use "
                     "a smaller batch_size or drop_last=False.")
  epoch, step = start_epoch + start_step // n_steps, start_step % n_steps
  while num_epochs is None or epoch < num_epochs:
    order = epoch_order(len(examples), seed=seed, epoch=epoch, shuffle=shuffle)
    for s in range(step, n_steps):
      rows = order[s * batch_size:(s + 1) * batch_size]
      yield epoch, s, collate_train([examples[i] for i in rows], pad_id=pad_id,
                                    multiple=multiple, buckets=buckets)
    epoch, step = epoch + 1, 0


def prompt_batches(prompts: Sequence[Sequence[int]], *, batch_size: int, pad_id: int,
                   multiple: int = 64, buckets: Sequence[int] | None = None,
                   name: str = "prompts") -> Iterator[dict[str, np.ndarray]]:
  """Left-padded prompt batches in input order (the last one may have fewer rows)."""
  _require_nonempty(len(prompts), name)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for i in range(0, len(prompts), batch_size):
    yield collate_prompts(prompts[i:i + batch_size], pad_id=pad_id, multiple=multiple,
                          buckets=buckets)
