"""Functional sensitivity of CAST section 3.3: the single-head zero-ablation sweep.

H_gen(h) = |Acc(ablated h) - Acc(base)| on D_util (letter-restricted MCQ, the logits of the last
prompt position only) and H_safe(h) = |Ref(ablated h) - Ref(base)| on D_safe (refusal rate of
greedy generations, judged by a pluggable `eval.refusal.Judge`). Head masks are jit inputs, so
a block of masks runs as one vmapped program and each shape compiles once.

Layer skipping (MCQ half): the residual stream entering layer l is the same under every mask
that only zeroes heads of layers >= l, so it is computed once per prompt chunk (`forward(...,
collect=("residual",))`) and the masks of layer l's heads run layers [l, L) only
(`models.layer_skip.forward_from_layer`): on average half the layers of a full forward. The
safety half cannot skip that way: every decoding step of the layers below l reads tokens that
the ablation above changed, so its masks run whole `generate` programs, M masks at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.diagnosis.calibration import MCQSet
from cast_jax.eval import batching, mcq
from cast_jax.eval.refusal import Judge, Verdict, score_refusals
from cast_jax.generate import generate
from cast_jax.models import ModelConfig, forward
from cast_jax.models.decoder import Params
from cast_jax.models.layer_skip import forward_from_layer


def layer_head_masks(config: ModelConfig, layer: int) -> jnp.ndarray:
  """float32 [H, L - layer, H]: mask h zeroes head h of `layer`, over the layers [layer, L)."""
  L, H = config.num_layers, config.num_heads
  masks = jnp.ones((H, L - layer, H), jnp.float32)
  return masks.at[jnp.arange(H), 0, jnp.arange(H)].set(0.0)


@functools.partial(jax.jit, static_argnames=("config",))
def _base_pass(params, config, input_ids, attention_mask, choice_ids):
  """Letter predictions [B] of the unablated model and each layer's input [L, B, T, D]."""
  logits, got = forward(params, config, input_ids, attention_mask=attention_mask,
                        collect=("residual",), logits_at=[-1])
  return mcq.restricted_argmax(logits[:, 0], choice_ids), got["residual"]


@functools.partial(jax.jit, static_argnames=("config", "layer", "mask_block"))
def _layer_pass(params, config, hidden, attention_mask, choice_ids, masks, *, layer, mask_block):
  """Letter predictions [H, B] with each head of `layer` zeroed, from that layer's input."""

  def one(hm):
    logits = forward_from_layer(params, config, hidden, layer, attention_mask=attention_mask,
                                head_mask=hm, logits_at=[-1])
    return mcq.restricted_argmax(logits[:, 0], choice_ids)

  return jax.lax.map(one, masks, batch_size=mask_block)


@dataclasses.dataclass(frozen=True)
class MCQSweep:
  """base_predictions [N], predictions [L, H, N] (head (l, h) zeroed), answers [N]: int32."""
  base_predictions: np.ndarray
  predictions: np.ndarray
  answers: np.ndarray

  @property
  def base_accuracy(self) -> float:
    return float((self.base_predictions == self.answers).mean())

  @property
  def accuracy(self) -> np.ndarray:
    """float64 [L, H]."""
    return (self.predictions == self.answers).mean(axis=-1)

  @property
  def h_gen(self) -> np.ndarray:
    """|Acc(ablated) - Acc(base)|, Eq. 3: float64 [L, H]."""
    return np.abs(self.accuracy - self.base_accuracy)


def mcq_sweep(params: Params, config: ModelConfig, mcq_set: MCQSet, *, pad_id: int,
              batch_size: int = 16, mask_block: int | None = None) -> MCQSweep:
  """Letter predictions on D_util under every single-head ablation, with layer skipping.

  Args:
    mcq_set: from `calibration.util_calibration`.
    pad_id: id used for left padding (masked out).
    batch_size: prompts per chunk (chunks are length-sorted, fixed-shape: `eval.batching`).
    mask_block: masks vmapped at once within a layer (default: all H heads of the layer).
  Returns:
    MCQSweep; predictions[l, h] equals scoring with head_mask zero at (l, h) only.
  """
  L, H = config.num_layers, config.num_heads
  N = len(mcq_set.prompt_ids)
  block = H if mask_block is None else int(mask_block)
  base = np.zeros(N, np.int32)
  preds = np.zeros((L, H, N), np.int32)
  for chunk in batching.prompt_chunks(mcq_set.prompt_ids, batch_size, pad_id):
    rows = np.concatenate([chunk.indices, np.repeat(chunk.indices[:1],
                                                    batch_size - len(chunk.indices))])
    ids, attn = jnp.asarray(chunk.input_ids), jnp.asarray(chunk.attention_mask)
    choice = jnp.asarray(mcq_set.choice_ids[rows])
    real = len(chunk.indices)
    pred, residual = _base_pass(params, config, ids, attn, choice)
    base[chunk.indices] = np.asarray(pred)[:real]
    for layer in range(L):
      got = _layer_pass(params, config, residual[layer], attn, choice,
                        layer_head_masks(config, layer), layer=layer, mask_block=block)
      preds[layer][:, chunk.indices] = np.asarray(got)[:, :real]
  return MCQSweep(base, preds, np.asarray(mcq_set.answers, np.int32))


def _eos_ids(config: ModelConfig, tokenizer: Any) -> list[int]:
  eos = set(config.eos_token_ids)
  if getattr(tokenizer, "eos_token_id", None) is not None:
    eos.add(int(tokenizer.eos_token_id))
  return sorted(eos)


def refusals_under_masks(params: Params, config: ModelConfig, tokenizer: Any,
                         prompt_ids: Sequence[Sequence[int]], head_masks, *,
                         max_new_tokens: int = 64, pad_id: int, batch_size: int = 16,
                         mask_block: int = 8, judge: Judge | None = None,
                         judge_prompts: Sequence[str] | None = None) -> np.ndarray:
  """Refusal decisions of greedy generations under each of M head masks.

  Args:
    prompt_ids: N token lists of rendered prompts (`calibration.safety_prompt_ids`).
    head_masks: [M, L, H]; `mask_block` of them decode together (one vmapped `generate`).
    judge: refusal rule (default keyword `KeywordJudge`); an empty response is no refusal.
    judge_prompts: the raw requests the judge sees (default "" each; keyword rules ignore them).
  Returns:
    bool [M, N]: response n under mask m was judged a refusal.
  """
  masks = np.asarray(head_masks, np.float32)
  M, N = masks.shape[0], len(prompt_ids)
  eos = _eos_ids(config, tokenizer)
  judged = list(judge_prompts) if judge_prompts is not None else [""] * N
  refused = np.zeros((M, N), bool)
  for chunk in batching.prompt_chunks(prompt_ids, batch_size, pad_id):
    real = len(chunk.indices)
    for start in range(0, M, mask_block):
      block = masks[start:start + mask_block]
      m = len(block)
      # A short last block is filled with copies, so every block compiles to one program.
      block = np.concatenate([block, np.repeat(block[:1], mask_block - m, axis=0)])
      out = generate(params, config, chunk.input_ids, chunk.attention_mask,
                     max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pad_id,
                     head_mask=jnp.asarray(block), prompt_bucket=1)
      for i in range(m):
        texts = []
        for row in range(real):
          ids = out.tokens[i, row, :out.lengths[i, row]].tolist()
          if ids and ids[-1] in eos:
            ids = ids[:-1]
          texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        verdicts, _ = score_refusals([judged[n] for n in chunk.indices], texts, judge)
        refused[start + i, chunk.indices] = [v is Verdict.REFUSED for v in verdicts]
  return refused


@dataclasses.dataclass(frozen=True)
class SafetySweep:
  """base_refused bool [N]; refused bool [L, H, N] (head (l, h) zeroed)."""
  base_refused: np.ndarray
  refused: np.ndarray

  @property
  def base_rate(self) -> float:
    return float(self.base_refused.mean())

  @property
  def rate(self) -> np.ndarray:
    """float64 [L, H] refusal rates."""
    return self.refused.mean(axis=-1)

  @property
  def h_safe(self) -> np.ndarray:
    """|Ref(ablated) - Ref(base)|, Eq. 4: float64 [L, H]."""
    return np.abs(self.rate - self.base_rate)


def safety_sweep(params: Params, config: ModelConfig, tokenizer: Any,
                 prompt_ids: Sequence[Sequence[int]], **kwargs) -> SafetySweep:
  """Refusal decisions on D_safe for the base model and every single-head ablation.

  kwargs: those of `refusals_under_masks` (max_new_tokens, pad_id, batch_size, mask_block,
  judge, judge_prompts). The base model runs as one more mask (all ones) in the same programs.
  """
  L, H = config.num_layers, config.num_heads
  singles = 1.0 - np.eye(L * H, dtype=np.float32).reshape(L * H, L, H)
  masks = np.concatenate([np.ones((1, L, H), np.float32), singles])
  refused = refusals_under_masks(params, config, tokenizer, prompt_ids, masks, **kwargs)
  return SafetySweep(refused[0], refused[1:].reshape(L, H, -1))
