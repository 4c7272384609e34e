"""Teacher-forced KL benchmark (LCDD / SFT-Eraser paper, Appendix F.4).

KL_t(P||Q) = sum_v P_t(v) (log P_t(v) - log Q_t(v)) over the full vocabulary at every response
token, averaged over a prompt's response tokens, then over prompts. The first argument is always
P: ``kl(sft_logits, lcdd_logits, mask)`` is KL(SFT||LCDD).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cast_jax.eval import batching
from cast_jax.eval.runners import EvalModel
from cast_jax.models import forward

LogitsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def token_kl(p_logits, q_logits):
  """KL(P||Q) per position: [..., V] x [..., V] -> [...], float32, >= 0.

  log_softmax in float32; terms with P = 0 contribute 0 (no 0 * inf NaN), and the tiny negative
  values rounding can produce are clipped to 0.
  """
  log_p = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), axis=-1)
  p = jnp.exp(log_p)
  terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
  return jnp.maximum(terms.sum(axis=-1), 0.0)


def kl(p_logits, q_logits, mask):
  """Mean KL(P||Q) over the masked positions of each row.

  Args:
    p_logits, q_logits: [B, T, V] logits of P and Q at the same positions.
    mask: [B, T], 1 where the position counts (already aligned with the logits).
  Returns:
    float32 [B]; NaN for a row with no masked position.
  """
  mask = jnp.asarray(mask, jnp.float32)
  total = (token_kl(p_logits, q_logits) * mask).sum(axis=-1)
  count = mask.sum(axis=-1)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def _split(model) -> tuple[Any, tuple]:
  """(traced arrays, hashable static spec) of an EvalModel or a logits function."""
  if isinstance(model, EvalModel):
    return ((model.params, model.head_mask, model.adapter_params, model.trigger),
            ("model", model.config, (model.adapter_fn, model.insert_fn)))
  if callable(model):
    return (), ("fn", model, None)
  raise TypeError(f"expected an EvalModel or a logits function (ids, mask) -> [B, T, V], "
                  f"got {type(model).__name__}")


def _logits(spec, arrays, ids, mask):
  kind, a, b = spec
  if kind == "fn":
    return a(ids, mask)
  params, head_mask, adapter_params, trigger = arrays
  adapter_fn, insert_fn = b
  if insert_fn is None:
    return forward(params, a, ids, attention_mask=mask, head_mask=head_mask,
                   adapter_fn=adapter_fn, adapter_params=adapter_params)
  # A triggered model reads [trigger; tokens]; its logits are taken back at the tokens' own
  # slots so they align with input_ids like an untriggered model's.
  embeds, tmask, index_map = insert_fn(params, trigger, ids, mask)
  logits = forward(params, a, input_embeds=embeds, attention_mask=tmask, head_mask=head_mask,
                   adapter_fn=adapter_fn, adapter_params=adapter_params)
  return jnp.take_along_axis(logits, index_map[:, :, None], axis=1)


# Module-level so repeated calls (one per condition) reuse compiled programs: the cache key is
# the static specs (config, adapter_fn or the logits function's identity) and the chunk shape.
@functools.partial(jax.jit, static_argnames=("p_spec", "q_spec"))
def _chunk_kl(p_arrays, q_arrays, ids, mask, loss_mask, *, p_spec, q_spec):
  p = _logits(p_spec, p_arrays, ids, mask)[:, :-1]
  q = _logits(q_spec, q_arrays, ids, mask)[:, :-1]
  target = loss_mask[:, 1:]
  return kl(p, q, target), target.sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class KLResult:
  """per_prompt: [N] mean token KL (NaN where a row has no response token); num_tokens: [N];
  mean: average over prompts with >= 1 response token."""
  per_prompt: np.ndarray
  num_tokens: np.ndarray
  mean: float


def teacher_forced_kl(p_model: EvalModel | LogitsFn, q_model: EvalModel | LogitsFn,
                      batch: Mapping[str, np.ndarray], *,
                      batch_size: int = 8) -> KLResult:
  """KL(P||Q) of two models teacher-forced on the same [prompt; reference response] rows.

  Args:
    p_model, q_model: ``EvalModel``s (a triggered one is scored with its trigger inserted and
      its logits read back at the tokens' slots), or jax-traceable functions (input_ids [B, T],
      attention_mask [B, T]) -> logits [B, T, V] aligned with input_ids.
      A function is a static jit argument: pass the same object again to reuse its compile.
    batch: training-style dict of [N, T] int arrays, right padded: ``input_ids``,
      ``attention_mask``, ``loss_mask`` (1 on response tokens; token t is predicted by the
      logits at t - 1, as in docs/design.md).
    batch_size: rows per jitted call (rows are padded to it; lengths bucketed to powers of two).
  """
  missing = {"input_ids", "attention_mask", "loss_mask"} - set(batch)
  if missing:
    raise ValueError(f"teacher_forced_kl: batch lacks {sorted(missing)}; build it with the "
                     "training batch contract of docs/design.md")
  arrays = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
  if any(a.ndim != 2 or a.shape != arrays["input_ids"].shape for a in arrays.values()):
    raise ValueError(f"batch arrays must all be [N, T]; got "
                     f"{ {k: a.shape for k, a in arrays.items()} }")
  p_arrays, p_spec = _split(p_model)
  q_arrays, q_spec = _split(q_model)

  n = arrays["input_ids"].shape[0]
  per_prompt = np.full(n, np.nan, np.float64)
  counts = np.zeros(n, np.int64)
  for idx, chunk in batching.row_chunks(arrays, batch_size):
    got, cnt = _chunk_kl(p_arrays, q_arrays, *(jnp.asarray(chunk[k]) for k in
                                               ("input_ids", "attention_mask", "loss_mask")),
                         p_spec=p_spec, q_spec=q_spec)
    per_prompt[idx] = np.asarray(got)[:len(idx)]
    counts[idx] = np.asarray(cnt)[:len(idx)]
  valid = counts > 0
  if not valid.any():
    raise ValueError("teacher_forced_kl: no row has a response token (loss_mask is all zero)")
  if not valid.all():
    logging.warning("teacher_forced_kl: %d of %d rows have no response token; excluded from the "
                    "mean", int((~valid).sum()), n)
  return KLResult(per_prompt=per_prompt, num_tokens=counts, mean=float(per_prompt[valid].mean()))
