"""SFT cross-entropy on response tokens (batch contract in docs/design.md) and its loss_fn."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax import models
from cast_jax.models.inputs import check_token_ids
from cast_jax.train.state import merge

PyTree = Any
LossFn = Callable[[PyTree, PyTree, dict, jax.Array, PyTree], tuple[jax.Array, dict]]


def _next_token_terms(logits: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(nll [B, T - 1] float32, target-is-a-maximum [B, T - 1] bool) of next-token prediction.

  Computed over all T positions and sliced after the reductions: slicing the [B, T, V] logits
  first copies them (~2% of a small model's step on XLA:CPU), and "the target logit is the
  max" replaces an argmax, whose variadic reduction XLA:CPU runs several times slower. The two
  differ only on exact ties.
  """
  logits = logits.astype(jnp.float32)
  targets = jnp.pad(input_ids[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
  # logsumexp - target logit avoids materialising a second [B, T, V] log_softmax array.
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  is_top = target_logit >= jnp.max(logits, axis=-1)
  return nll[:, :-1], is_top[:, :-1]


def sft_token_nll(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
  """Per-position next-token NLL.

  Args:
    logits: [B, T, V] (any float dtype; computed in float32).
    input_ids: [B, T] int.

  Returns:
    [B, T - 1] float32: `-log p(input_ids[:, t + 1] | logits[:, t])`.
  """
  return _next_token_terms(logits, input_ids)[0]


def sft_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *,
             per_sequence: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over response tokens.

  `logits[:, :-1]` predicts `input_ids[:, 1:]`, weighted by `loss_mask[:, 1:]` (the batch
  contract: `loss_mask[b, t] = 1` iff token t is a response token, predicted at t - 1).

  Args:
    logits: [B, T, V] float.
    input_ids: [B, T] int.
    loss_mask: [B, T] int or float weights (0/1).

  Returns:
    loss: float32 scalar, sum(nll * w) / sum(w); 0 when the batch has no target token (the loop
      rejects such batches on the host before they get here).
    metrics: {"target_tokens": float32 sum(w), "accuracy": float32 weighted fraction of targets
      whose logit is the maximum (argmax accuracy up to exact ties)}.
    per_sequence: average each row's targets first, then rows (rows without targets ignored).
  """
  if logits.ndim != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
    raise ValueError(f"sft_loss: expected logits [B, T, V], input_ids [B, T], loss_mask [B, T]; "
                     f"got {logits.shape}, {input_ids.shape}, {loss_mask.shape}.")
  nll, is_top = _next_token_terms(logits, input_ids)
  w = loss_mask[:, 1:].astype(jnp.float32)
  n = jnp.sum(w)
  denom = jnp.maximum(n, 1.0)
  correct = is_top.astype(jnp.float32)
  metrics = {"target_tokens": n, "accuracy": jnp.sum(correct * w) / denom}
  if per_sequence:
    # Mean over each row's targets, then over rows: a one-token answer (an MCQ letter) weighs
    # as much as a 40-token solution instead of 1/40 of it.
    row_n = jnp.sum(w, axis=1)
    row_loss = jnp.sum(nll * w, axis=1) / jnp.maximum(row_n, 1.0)
    return jnp.sum(row_loss) / jnp.maximum(jnp.sum(row_n > 0), 1.0), metrics
  return jnp.sum(nll * w) / denom, metrics


def make_sft_loss_fn(config: models.ModelConfig, *, adapter_fn: Callable | None = None,
                     remat: bool = False, per_sequence: bool = False) -> LossFn:
  """The SFT `loss_fn(trainable, frozen, batch, rng, extra) -> (loss, metrics)` for the trainer.

  Two ways to hold the model:
    * `adapter_fn is None` (full / partial fine-tuning): params = merge(trainable, frozen), the
      two halves of `partition(params, mask)`.
    * `adapter_fn` given (LoRA and other weight transforms): `frozen` is the whole base params
      tree and `trainable` is passed as `adapter_params` (leaves with a leading L axis) to
      `forward`, which applies `adapter_fn` one layer at a time inside its scan.

  `batch` follows the training batch contract: input_ids, attention_mask, loss_mask, all [B, T].
  `rng` and `extra` are unused (the decoder has no dropout).
  """

  def loss_fn(trainable, frozen, batch, rng, extra):
    del rng, extra
    if adapter_fn is None:
      params, kwargs = merge(trainable, frozen), {}
    else:
      params, kwargs = frozen, {"adapter_fn": adapter_fn, "adapter_params": trainable}
    logits = models.forward(params, config, batch["input_ids"],
                            attention_mask=batch["attention_mask"], remat=remat, **kwargs)
    return sft_loss(logits, batch["input_ids"], batch["loss_mask"], per_sequence=per_sequence)

  return loss_fn


def check_sft_batch(batch: dict, step: int) -> None:
  """Host-side check of a training batch; raises ValueError naming the step and the fix.

  Args:
    batch: dict with input_ids, attention_mask, loss_mask, each [B, T] (numpy or jax).
    step: data position of the batch, for the message.
  """
  keys = ("input_ids", "attention_mask", "loss_mask")
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"batch at step {step} lacks {missing}; SFT batches need {list(keys)} "
                     "(see docs/design.md, Batches).")
  shapes = {k: tuple(batch[k].shape) for k in keys}
  if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 2:
    raise ValueError(f"batch at step {step}: {shapes}; all must be the same [B, T].")
  if shapes["input_ids"][1] < 2 or not np.asarray(batch["loss_mask"])[:, 1:].any():
    raise ValueError(f"batch at step {step} has no response token to predict (loss_mask[:, 1:] "
                     "is all zero); drop examples whose response was truncated away.")


def check_sft_examples(examples: Any, vocab_size: int, pad_id: int, *,
                       where: str = "run_sft") -> None:
  """One pass over a dataset before training: every token id and the pad id in [0, vocab_size).

  An id outside the vocabulary would otherwise become a NaN embedding inside XLA and stop
  training with a misleading "non-finite loss, lower the learning rate" error.

  Args:
    examples: (input_ids int [T_i], loss_mask int [T_i]) pairs (`data.encode_dataset`).
    vocab_size: the model's vocabulary size; pad_id: the padding id batches are filled with.
  Raises:
    InputError (a ValueError) naming the example, the position, the id and the fix.
  """
  check_token_ids(np.asarray(pad_id), vocab_size, name="pad_id", where=where)
  if not len(examples):
    return
  ids = [np.asarray(ex[0]) for ex in examples]
  flat = np.concatenate([x.ravel() for x in ids])
  if flat.size and (not np.issubdtype(flat.dtype, np.integer) or flat.min() < 0 or
                    flat.max() >= vocab_size):
    for i, x in enumerate(ids):  # slow path only to name the first bad example
      check_token_ids(x, vocab_size, name=f"examples[{i}] input_ids", where=where)
