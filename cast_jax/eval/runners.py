"""Batched, jit-compiled runners that drive the decoder for evaluation.

Each runner tokenises once, sorts prompts by length, left-pads them into fixed (batch_size,
bucketed length) chunks and calls one jitted program per shape, so a benchmark compiles a
handful of programs. Results come back in the caller's order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cast_jax.eval import answer_extraction, batching, mcq, refusal
from cast_jax.generate import generate
from cast_jax.models import ModelConfig, forward
from cast_jax.models.inputs import check_scorer_ids


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A model as the runners see it: params + config, plus the optional forward arguments that
  turn it into a variant (ablated heads, LoRA / gated-delta adapter) without copying weights.

  `trigger` [L, D] with `insert_fn` (static, hashable; `carrier_jax.trigger.triggered` builds
  both): every prompt the runners score or decode is embedded and passed through
  `insert_fn(params, trigger, input_ids, attention_mask) -> (embeds [B, P + L, D], mask
  [B, P + L], index_map [B, P])` first, so the whole model sees the soft trigger.
  `teacher_forced_kl` reads them too (logits taken back at the tokens' own slots).
  """
  params: Any
  config: ModelConfig
  head_mask: Any = None
  adapter_fn: Callable | None = None
  adapter_params: Any = None
  trigger: Any = None
  insert_fn: Callable | None = None

  def __post_init__(self):
    if (self.trigger is None) != (self.insert_fn is None):
      raise ValueError("EvalModel: trigger and insert_fn go together; build a triggered model "
                       "with carrier_jax.trigger.triggered(model, trigger).")


def prompt_inputs(model: EvalModel, input_ids, attention_mask) -> dict[str, Any]:
  """forward / generate keyword inputs of a prompt batch [B, P] under `model`: the ids and mask,
  or (triggered model) the embeddings and mask with the trigger inserted."""
  if model.trigger is None:
    return {"input_ids": input_ids, "attention_mask": attention_mask}
  embeds, mask, _ = model.insert_fn(model.params, model.trigger, input_ids, attention_mask)
  return {"input_embeds": embeds, "attention_mask": mask}


def _pad_id(tokenizer, config: ModelConfig) -> int:
  for pid in (getattr(tokenizer, "pad_token_id", None), config.pad_token_id):
    if pid is not None:
      return int(pid)
  return 0  # masked out everywhere, so any valid id works


@functools.partial(jax.jit, static_argnames=("config", "adapter_fn", "insert_fn"))
def _choice_logits(params, head_mask, adapter_params, trigger, input_ids, attention_mask,
                   choice_ids, *, config, adapter_fn, insert_fn):
  model = EvalModel(params, config, head_mask, adapter_fn, adapter_params, trigger, insert_fn)
  # Only the last position is read: unembedding just it skips the [B, P, V] float32 logits.
  logits = forward(params, config, **prompt_inputs(model, input_ids, attention_mask),
                   head_mask=head_mask, adapter_fn=adapter_fn, adapter_params=adapter_params,
                   logits_at=[-1])
  return mcq.gather_choice_logits(logits[:, 0], choice_ids)


def choice_logits_on_batch(model: EvalModel, input_ids, attention_mask, choice_ids) -> np.ndarray:
  """forward(batch)[:, -1] at the choice tokens, for an already left-padded batch.

  Args: input_ids, attention_mask [B, P] (left padded, last column real); choice_ids [B, C].
  Returns float32 [B, C]. Compiles once per (B, P, C): pad batches to fixed shapes (or use
  ``next_token_choice_logits``, which does).
  """
  check_scorer_ids(model.config, "choice_logits_on_batch", ids=input_ids, choice_ids=choice_ids)
  mask = np.asarray(attention_mask)
  if mask.ndim != 2 or np.any(mask[:, -1] == 0):
    raise ValueError("choice_logits_on_batch needs a left-padded [B, P] batch whose last column "
                     "is real for every row")
  got = _choice_logits(model.params, model.head_mask, model.adapter_params, model.trigger,
                       jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                       jnp.asarray(choice_ids, jnp.int32), config=model.config,
                       adapter_fn=model.adapter_fn, insert_fn=model.insert_fn)
  return np.asarray(got)


def next_token_choice_logits(model: EvalModel, prompt_ids: Sequence[Sequence[int]],
                             choice_ids: np.ndarray, *, pad_id: int,
                             batch_size: int = 8) -> np.ndarray:
  """Next-token logits of the choice tokens after each prompt.

  Args:
    prompt_ids: N token lists (unpadded); choice_ids: [N, C] int token ids per prompt.
  Returns:
    float32 [N, C] = forward(prompt)[:, -1][choice_ids].
  """
  check_scorer_ids(model.config, "next_token_choice_logits", prompt_ids=prompt_ids,
                   choice_ids=choice_ids)
  choice_ids = np.asarray(choice_ids, np.int32)
  if choice_ids.shape[0] != len(prompt_ids):
    raise ValueError(f"choice_ids has {choice_ids.shape[0]} rows for {len(prompt_ids)} prompts")
  out = np.zeros(choice_ids.shape, np.float32)
  for chunk in batching.prompt_chunks(prompt_ids, batch_size, pad_id):
    rows = np.concatenate([chunk.indices, np.repeat(chunk.indices[:1],
                                                    batch_size - len(chunk.indices))])
    got = choice_logits_on_batch(model, chunk.input_ids, chunk.attention_mask, choice_ids[rows])
    out[chunk.indices] = got[:len(chunk.indices)]
  return out


@dataclasses.dataclass(frozen=True)
class MCQResult:
  """predictions / answers / correct: [N]; choice_logits [N, C]; choice_token_ids [N, C] (the ids
  scored per prompt); letter_token_ids: choice -> distinct ids used for it; accuracy in [0, 1]."""
  predictions: np.ndarray
  answers: np.ndarray
  correct: np.ndarray
  choice_logits: np.ndarray
  choice_token_ids: np.ndarray
  letter_token_ids: dict
  accuracy: float


def score_mcq(model: EvalModel, tokenizer, prompts: Sequence[str], answers: Sequence, *,
              choices: Sequence[str] = tuple("ABCD"), batch_size: int = 8,
              space_before: bool | None = None, add_special_tokens: bool = False) -> MCQResult:
  """Zero-shot MCQ accuracy: argmax of the next-token logits over the choice letters.

  Args:
    prompts: N fully rendered prompts (``cast_jax.data.chat.render_prompt`` of
      ``cast_jax.data.prompts.mcq_prompt``).
    answers: N answer indices or letters.
    choices: the option letters scored (C of them); their ids are resolved per prompt.
    space_before / add_special_tokens: see ``mcq.resolve_choice_tokens``.
  """
  if len(prompts) != len(answers) or not prompts:
    raise ValueError(f"score_mcq: need matching non-empty prompts/answers, got {len(prompts)} and "
                     f"{len(answers)}")
  gold = mcq.answer_indices(answers, choices)
  tokens = mcq.resolve_choice_tokens(tokenizer, prompts, choices, space_before=space_before,
                                     add_special_tokens=add_special_tokens)
  logging.info("score_mcq: %d prompts, choice token ids %s", len(prompts), tokens.by_choice)
  logits = next_token_choice_logits(model, tokens.prompt_ids, tokens.choice_ids,
                                    pad_id=_pad_id(tokenizer, model.config), batch_size=batch_size)
  pred = logits.argmax(axis=-1).astype(np.int32)
  return MCQResult(predictions=pred, answers=gold, correct=pred == gold, choice_logits=logits,
                   choice_token_ids=tokens.choice_ids, letter_token_ids=tokens.by_choice,
                   accuracy=mcq.mcq_accuracy(pred, gold))


@functools.partial(jax.jit, static_argnames=("insert_fn",))
def _insert(params, trigger, input_ids, attention_mask, *, insert_fn):
  embeds, mask, _ = insert_fn(params, trigger, input_ids, attention_mask)
  return {"input_embeds": embeds, "attention_mask": mask}


def generate_texts(model: EvalModel, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                   batch_size: int = 8, eos_token_ids: Sequence[int] | None = None,
                   add_special_tokens: bool = False, skip_special_tokens: bool = True,
                   temperature: float = 0.0, key: jax.Array | None = None) -> list[str]:
  """Decoded responses (N strings) to N rendered prompts; greedy unless ``temperature`` > 0.

  EOS defaults to the config's ids plus the tokenizer's ``eos_token_id``. Sampling needs ``key``;
  chunk i uses ``fold_in(key, i)``.
  """
  if not prompts:
    raise ValueError("generate_texts: no prompts")
  if eos_token_ids is None:
    eos = set(model.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
      eos.add(int(tokenizer.eos_token_id))
    eos_token_ids = sorted(eos)
  if not eos_token_ids:
    logging.warning("generate_texts: no EOS ids; every response runs to max_new_tokens")
  pad_id = _pad_id(tokenizer, model.config)
  prompt_ids = batching.encode(tokenizer, prompts, add_special_tokens=add_special_tokens)
  texts: list[str] = [""] * len(prompts)
  for i, chunk in enumerate(batching.prompt_chunks(prompt_ids, batch_size, pad_id)):
    inputs = {"input_ids": chunk.input_ids, "attention_mask": chunk.attention_mask}
    if model.trigger is not None:
      inputs = _insert(model.params, model.trigger, jnp.asarray(chunk.input_ids, jnp.int32),
                       jnp.asarray(chunk.attention_mask, jnp.int32), insert_fn=model.insert_fn)
    out = generate(model.params, model.config, **inputs,
                   max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                   pad_token_id=pad_id, temperature=temperature,
                   key=None if key is None else jax.random.fold_in(key, i),
                   head_mask=model.head_mask, adapter_fn=model.adapter_fn,
                   adapter_params=model.adapter_params,
                   prompt_bucket=1)  # the chunk's length is already bucketed
    for row, n in enumerate(chunk.indices):
      ids = out.tokens[row, :out.lengths[row]].tolist()
      if ids and ids[-1] in eos_token_ids:
        ids = ids[:-1]
      texts[n] = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
  return texts


def score_reasoning_generation(model: EvalModel, tokenizer, prompts: Sequence[str],
                               references: Sequence[str], *, max_new_tokens: int,
                               batch_size: int = 8, **generate_kwargs
                               ) -> tuple[list[str], answer_extraction.ReasoningScores]:
  """Greedy responses to N reasoning prompts and their boxed / last-number accuracies."""
  responses = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, **generate_kwargs)
  return responses, answer_extraction.score_reasoning(responses, references)


def score_refusal_generation(model: EvalModel, tokenizer, prompts: Sequence[str], *,
                             max_new_tokens: int, judge: refusal.Judge | None = None,
                             judge_prompts: Sequence[str] | None = None, batch_size: int = 8,
                             **generate_kwargs
                             ) -> tuple[list[str], list[refusal.Verdict], refusal.RefusalCounts]:
  """Greedy responses to N rendered prompts, three-way verdicts and counts (defense success on
  harmful prompts, over-refusal on benign ones).

  ``judge_prompts`` are the raw requests shown to the judge (default: ``prompts``), so a judge
  does not see the chat template markup.
  """
  responses = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, **generate_kwargs)
  verdicts, counts = refusal.score_refusals(list(judge_prompts or prompts), responses, judge)
  return responses, verdicts, counts
