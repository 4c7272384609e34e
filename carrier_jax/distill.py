"""KL distillation to the SFT model as the LCDD task loss (lcdd-sft-eraser.md 3.2, App. E).

Direction: KL(SFT || LCDD) = sum_v P(v) (log P(v) - log Q(v)) per response token, P the SFT
(teacher) next-token distribution and Q the gated model's (student), the same direction as the
paper's KL(SFT||LCDD) fidelity metric (F.4), averaged over response tokens like the SFT
cross-entropy (`loss_mask[:, 1:]` weights; `per_sequence` averages each row first).

Two teacher sources:
  * online: the SFT params are a frozen input of the step and the teacher's full [B, T, V]
    logits are recomputed every step (exact KL; one extra forward per step, a second copy of
    the weights in memory: benchmarks/bench_lcdd.py measured 1.27x the SFT step's FLOPs).
  * cached: the teacher's top-k logits, their vocabulary ids and the logsumexp of its full
    logits are precomputed once per training example (`build_teacher_cache`) and attached to
    each batch (`attach_teacher`): 8k + 4 bytes per response token (k = 64: ~0.5 kB), instead
    of 4V bytes for full logits. The KL is then taken over k + 1 outcomes: the top-k tokens
    and one "tail" bucket holding every other token,

      KL_k = sum_{i <= k} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail),

    which is exact for k = V and, by the log-sum inequality, never larger than the full KL
    (it is the KL of the two distributions coarsened to the same k + 1 bins). With the SFT
    model's probability mass concentrated in a few tokens, p_tail is small and KL_k ~ KL.

    Its gradient is a closed-form custom VJP (one [N, V] array), which keeps the step's peak
    memory at the CE step's (bench_lcdd.py, testbed: +3.3 MiB vs +10.1 MiB with autodiff).

The cache is built in float32, in fixed chunks of the dataset order, so it is a pure function
of (SFT params, examples, k, chunking): a resumed run rebuilds the same cache.

Budget. LCDD starts from the SFT model (all gates on, dW = W_ft - W_base), where the KL is ~0,
so Algorithm 1's relative budget EMA(T_w) * (1 + r) can be ~0; `run_lcdd(budget_floor=)`
(launch: `--config.kl_budget_floor`, 0.01 nats per token by default) bounds it from below.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax import models
from cast_jax.data.batching import Example, collate_train, epoch_order

Params = dict[str, Any]
TEACHERS = ("online", "cached")
TASK_LOSSES = ("ce", "kl")
TEACHER_KEYS = ("teacher_values", "teacher_indices", "teacher_lse")
# A finite stand-in for -inf in the student's tail logsumexp, so a masked entry's gradient is
# an exact 0 rather than 0 * exp(inf) = NaN.
_NEG = -1e30


def _xlogy_ratio(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """p * (log p - log q) with 0 where p = 0 (no 0 * -inf NaN)."""
  return jnp.where(p > 0, p * (log_p - log_q), 0.0)


def full_token_kl(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """KL(P||Q) per position over the full vocabulary.

  Args:
    teacher_logits: [..., V] logits of P (the SFT model); constants (no gradient).
    student_logits: [..., V] logits of Q (the gated model).

  Returns:
    [...] float32, clipped at 0 (rounding can make a KL of ~0 slightly negative, and the
    controller's EMA must not go below 0).
  """
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.maximum(jnp.sum(_xlogy_ratio(jnp.exp(log_p), log_p, log_q), axis=-1), 0.0)


def _topk_parts(values, indices, lse, s):
  """(kl before clipping, p [N.., k], p_tail, lse_q, log_q_tail) of `topk_token_kl`."""
  V, k = s.shape[-1], indices.shape[-1]
  lse_q = jax.nn.logsumexp(s, axis=-1)
  log_p = values.astype(jnp.float32) - lse[..., None].astype(jnp.float32)
  p = jnp.exp(log_p)
  log_q = jnp.take_along_axis(s, indices, axis=-1) - lse_q[..., None]
  head = jnp.sum(_xlogy_ratio(p, log_p, log_q), axis=-1)
  if k == V:  # no tail; 1 - sum(p_i) would only be rounding noise
    zero = jnp.zeros_like(head)
    return head, p, zero, lse_q, zero
  # The tail logsumexp masks the k ids out of the student's logits (one scatter into a [N, V]
  # bool array) rather than 1 - sum(q_i), which cancels catastrophically when q_tail is tiny.
  n = int(np.prod(s.shape[:-1]))
  in_top = jnp.zeros((n, V), bool).at[jnp.arange(n)[:, None], indices.reshape(n, k)].set(True)
  log_q_tail = jax.nn.logsumexp(jnp.where(in_top.reshape(s.shape), _NEG, s), axis=-1) - lse_q
  p_tail = jnp.clip(1.0 - jnp.sum(p, axis=-1), 0.0, 1.0)
  tail = _xlogy_ratio(p_tail, jnp.log(jnp.maximum(p_tail, 1e-38)), log_q_tail)
  return head + tail, p, p_tail, lse_q, log_q_tail


@jax.custom_vjp
def _topk_kl(values, indices, lse, s):
  return jnp.maximum(_topk_parts(values, indices, lse, s)[0], 0.0)


def _topk_kl_fwd(values, indices, lse, s):
  kl, p, p_tail, lse_q, log_q_tail = _topk_parts(values, indices, lse, s)
  return jnp.maximum(kl, 0.0), (indices, s, kl > 0, p, p_tail, lse_q, log_q_tail)


def _topk_kl_bwd(res, g):
  # dKL/ds_v = q_v (sum_i p_i + p_tail) - p_i [v = id_i] - p_tail q_v / q_tail [v in tail]:
  # one [N, V] array (q, rescaled) plus a k-wide scatter-add at the top ids, instead of the
  # autodiff residuals of the masked tail logsumexp.
  indices, s, positive, p, p_tail, lse_q, log_q_tail = res
  k, V = indices.shape[-1], s.shape[-1]
  g = jnp.where(positive, g.astype(jnp.float32), 0.0)
  q = jnp.exp(s - lse_q[..., None])
  tail_ratio = jnp.where(p_tail > 0, p_tail * jnp.exp(-log_q_tail), 0.0)
  total = jnp.sum(p, axis=-1) + p_tail
  grad = q * (total - tail_ratio)[..., None]
  # At the top ids: undo the tail term (they are not in the tail) and subtract p_i.
  top = tail_ratio[..., None] * jnp.take_along_axis(q, indices, axis=-1) - p
  n = int(np.prod(s.shape[:-1]))
  grad = grad.reshape(n, V).at[jnp.arange(n)[:, None], indices.reshape(n, k)].add(
      top.reshape(n, k)).reshape(s.shape)
  return (None, None, None, (grad * g[..., None]).astype(s.dtype))


_topk_kl.defvjp(_topk_kl_fwd, _topk_kl_bwd)


def topk_token_kl(values: jax.Array, indices: jax.Array, lse: jax.Array,
                  student_logits: jax.Array) -> jax.Array:
  """KL_k(P||Q) per position: the top-k tokens of P plus one tail bucket (module docstring).

  Args:
    values: [..., k] float the teacher's top-k logits; indices: [..., k] int their ids
      (distinct within a position); lse: [...] the logsumexp of the teacher's full logits.
      Constants: no gradient flows to them.
    student_logits: [..., V] logits of Q.

  Returns:
    [...] float32, clipped at 0 (rounding can make a ~0 KL slightly negative). Its gradient
    is the closed form (a custom VJP; see `_topk_kl_bwd`).
  """
  return _topk_kl(jax.lax.stop_gradient(values), indices, jax.lax.stop_gradient(lse),
                  student_logits.astype(jnp.float32))


def masked_mean(per_token: jax.Array, loss_mask: jax.Array, *, per_sequence: bool = False
                ) -> jax.Array:
  """The SFT loss's reduction of a per-position term.

  Args:
    per_token: [B, T] float, position t being the prediction of token t + 1 (the last column
      is ignored).
    loss_mask: [B, T] the batch's loss mask (weights `loss_mask[:, 1:]`).
    per_sequence: mean per row first, then over rows with a target.

  Returns:
    float32 scalar (0 without targets).
  """
  x = per_token[:, :-1].astype(jnp.float32)
  w = loss_mask[:, 1:].astype(jnp.float32)
  if per_sequence:
    row_n = jnp.sum(w, axis=1)
    rows = jnp.sum(x * w, axis=1) / jnp.maximum(row_n, 1.0)
    return jnp.sum(rows) / jnp.maximum(jnp.sum(row_n > 0), 1.0)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def cached_kl(batch: dict, student_logits: jax.Array) -> jax.Array:
  """`topk_token_kl` at every position of a batch carrying `attach_teacher`'s keys -> [B, T]."""
  missing = [k for k in TEACHER_KEYS if k not in batch]
  if missing:
    raise ValueError(f"cached_kl: the batch lacks {missing}; attach the teacher cache with "
                     "carrier_jax.distill.attach_teacher (run_lcdd does it for teacher='cached').")
  return topk_token_kl(batch["teacher_values"], batch["teacher_indices"], batch["teacher_lse"],
                       student_logits)


def build_teacher_cache(params: Params, config: models.ModelConfig,
                        examples: Sequence[Example], *, top_k: int, pad_id: int,
                        batch_size: int = 8, pad_multiple: int = 16
                        ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The SFT model's top-k next-token logits at every response token of every example.

  Args:
    params: the teacher (SFT) params; config: its ModelConfig.
    examples: (input_ids [T_i], loss_mask [T_i]) pairs (`data.encode_dataset`).
    top_k: k, 1 <= k <= vocab size.
    pad_id, batch_size, pad_multiple: how the examples are batched for the teacher forward.

  Returns:
    per example, (values float32 [n_i, k], indices int32 [n_i, k], lse float32 [n_i]) at the
    n_i positions t with loss_mask[t + 1] = 1, in order (position t predicts token t + 1).
  """
  V = config.vocab_size
  if int(top_k) != top_k or not 1 <= top_k <= V:
    raise ValueError(f"build_teacher_cache: top_k={top_k!r}; use an integer in [1, {V}] "
                     "(the vocabulary size).")

  @jax.jit
  def teacher(params, batch):
    logits = models.forward(params, config, batch["input_ids"],
                            attention_mask=batch["attention_mask"]).astype(jnp.float32)
    values, indices = jax.lax.top_k(logits, top_k)
    return values, indices, jax.nn.logsumexp(logits, axis=-1)

  out = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    batch = collate_train(chunk, pad_id=pad_id, multiple=pad_multiple)
    values, indices, lse = map(np.asarray, teacher(params, batch))
    for b, (ids, mask) in enumerate(chunk):
      pos = np.flatnonzero(np.asarray(mask)[1:]) if len(ids) > 1 else np.zeros(0, np.int64)
      out.append((values[b, pos].astype(np.float32), indices[b, pos].astype(np.int32),
                  lse[b, pos].astype(np.float32)))
  return out


def attach_teacher(batch: dict, rows: Sequence[int], examples: Sequence[Example],
                   cache: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
  """The batch plus the cached teacher at its positions (host numpy).

  Args:
    batch: a `collate_train` batch of `examples[rows]` (right padded, [B, T]).
    rows: the example index of each batch row.
    examples, cache: the dataset and `build_teacher_cache`'s output for it.

  Returns:
    batch with "teacher_values" float32 [B, T, k], "teacher_indices" int32 [B, T, k] and
    "teacher_lse" float32 [B, T] at the positions t with loss_mask[t + 1] = 1 (zeros elsewhere,
    where the loss weight is 0; a zero row of ids with lse 0 is a valid, unused distribution).
  """
  B, T = batch["input_ids"].shape
  k = cache[0][0].shape[-1] if len(cache) else 1
  values = np.zeros((B, T, k), np.float32)
  indices = np.tile(np.arange(k, dtype=np.int32), (B, T, 1))
  lse = np.zeros((B, T), np.float32)
  for b, i in enumerate(rows):
    v, ix, l = cache[int(i)]
    pos = np.flatnonzero(np.asarray(examples[int(i)][1])[1:])
    if len(pos) != len(v):
      raise ValueError(f"attach_teacher: example {int(i)} has {len(pos)} response positions but "
                       f"its cache entry {len(v)}; rebuild the cache for these examples.")
    values[b, pos], indices[b, pos], lse[b, pos] = v, ix, l
  return {**batch, "teacher_values": values, "teacher_indices": indices, "teacher_lse": lse}


def cached_batches(examples: Sequence[Example], cache, batches, *, batch_size: int, seed: int):
  """`iterate_train_batches`' (epoch, step, batch) items -> batches with the teacher attached
  (the rows are recomputed from the same seeded epoch order the iterator uses)."""
  for epoch, step, batch in batches:
    order = epoch_order(len(examples), seed=seed, epoch=epoch)
    yield attach_teacher(batch, order[step * batch_size:(step + 1) * batch_size], examples,
                         cache)
