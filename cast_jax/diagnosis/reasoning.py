"""Reasoning calibration of CAST Appendix F.4: D_util = GSM8K-style word problems.

The paper swaps its MMLU calibration set for 100 GSM8K problems to diagnose the conflict for
reasoning. Both halves of the diagnosis change with D_util:

* L_util (optimization conflict) is the cross-entropy of the reference solution: the Table 4
  reasoning prompt in the model's chat template, then the response tokens (worked steps, the
  final answer as "The answer is \\boxed{N}." and the end-of-turn token), response-only loss mask,
  summed over the set and divided by its target-token count as for L_safe (`diagnosis.conflict`).
  GSM8K's "#### N" marker becomes the \\boxed{} answer Table 4 asks for, and its calculator
  annotations ("<<48/2=24>>") are dropped: neither is text a model is asked to write.
* H_gen(u) = |Acc(ablated u) - Acc(base)|, where Acc is the fraction of greedy generations
  (`max_new_tokens`) whose final answer equals the reference under `eval.answer_extraction`:
  `answer="boxed"` reads the last \\boxed{} (the format the prompt asks for), `"last_number"` the
  last number anywhere (format-agnostic). Generation under a block of head masks is one batched
  program (`sensitivity.decode_under_masks`); the base model is one more mask (all ones).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cast_jax import data
from cast_jax.data.records import ReasoningRecord
from cast_jax.diagnosis import head_ablation, sensitivity
from cast_jax.eval.answer_extraction import normalize_answer, score_reasoning
from cast_jax.models import ModelConfig
from cast_jax.models.decoder import Params

Example = tuple[np.ndarray, np.ndarray]
ANSWER_RULES = ("boxed", "last_number")
_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def reasoning_response(record: ReasoningRecord) -> str:
  """The reference solution L_util trains: the worked steps (GSM8K calculator annotations
  dropped), then "The answer is \\boxed{answer}."; just the boxed sentence when a record has no
  steps."""
  if not str(record.answer).strip():
    raise ValueError(f"ReasoningRecord {record.question[:60]!r} has no final answer")
  steps = _GSM8K_CALC.sub("", record.solution).strip()
  boxed = f"The answer is \\boxed{{{str(record.answer).strip()}}}."
  return f"{steps}\n{boxed}" if steps else boxed


def reasoning_pairs(records: Sequence[ReasoningRecord]) -> list[tuple[str, str]]:
  """(Table 4 reasoning prompt, reference solution) pairs of a reasoning D_util."""
  return [(data.reasoning_prompt(r), reasoning_response(r)) for r in records]


@dataclasses.dataclass(frozen=True)
class ReasoningSet:
  """D_util as the reasoning sweep scores it: prompt_ids (N token lists, `encode_prompt`) and
  references (N final answers, normalised by `normalize_answer`)."""
  prompt_ids: list
  references: list


def reasoning_calibration(tokenizer: Any, records: Sequence[ReasoningRecord], *, max_len: int,
                          system: str | None = None,
                          template_kwargs: Mapping[str, Any] | None = None
                          ) -> tuple[ReasoningSet, list[Example]]:
  """Reasoning D_util for both halves of the diagnosis: the scored set and the L_util examples.

  Examples longer than `max_len` are right-truncated (their loss covers the solution prefix that
  fits); one whose prompt alone reaches `max_len` is dropped from L_util with a warning
  (`data.truncate_examples`) but still scored by the sweep.

  Returns: (ReasoningSet of N items, list of (input_ids int32 [T_i], loss_mask int32 [T_i])).
  """
  if not records:
    raise ValueError("reasoning_calibration: no reasoning records (GSM8K schema)")
  pairs = reasoning_pairs(records)
  kw = dict(system=system, template_kwargs=template_kwargs)
  examples = data.encode_dataset(tokenizer, pairs, max_len=max_len, name="D_util (reasoning)",
                                 **kw)
  prompt_ids = [data.encode_prompt(tokenizer, p, **kw).tolist() for p, _ in pairs]
  references = [normalize_answer(str(r.answer)) for r in records]
  return ReasoningSet(prompt_ids, references), examples


def _check_answer_rule(answer: str) -> str:
  if answer not in ANSWER_RULES:
    raise ValueError(f"answer={answer!r}: use one of {', '.join(ANSWER_RULES)}")
  return answer


def score_texts(texts: Sequence[str], references: Sequence[str], answer: str = "boxed"
                ) -> np.ndarray:
  """bool [N]: response n's final answer (rule `answer`, module doc) equals references[n]."""
  got = score_reasoning(list(texts), list(references))
  return np.asarray(got.boxed_correct if _check_answer_rule(answer) == "boxed"
                    else got.last_number_correct, bool)


def correct_under_masks(params: Params, config: ModelConfig, tokenizer: Any,
                        reasoning_set: ReasoningSet, head_masks, *, answer: str = "boxed",
                        max_new_tokens: int = 256, pad_id: int, batch_size: int = 16,
                        mask_block: int = 8) -> np.ndarray:
  """Correctness of greedy generations on D_util under each of M head masks.

  Args:
    head_masks: [M, L, H]; `mask_block` of them decode together.
    answer: "boxed" | "last_number" (module doc).
  Returns:
    bool [M, N]: the response to problem n under mask m has the reference final answer.
  """
  _check_answer_rule(answer)
  texts = sensitivity.decode_under_masks(params, config, tokenizer, reasoning_set.prompt_ids,
                                         np.asarray(head_masks, np.float32),
                                         max_new_tokens=max_new_tokens, pad_id=pad_id,
                                         batch_size=batch_size, mask_block=mask_block)
  return np.stack([score_texts(t, reasoning_set.references, answer) for t in texts])


@dataclasses.dataclass(frozen=True)
class ReasoningSweep:
  """base_correct bool [N]; correct bool [L, U, N] (unit (l, u) ablated)."""
  base_correct: np.ndarray
  correct: np.ndarray

  @property
  def base_accuracy(self) -> float:
    return float(np.mean(self.base_correct))

  @property
  def accuracy(self) -> np.ndarray:
    """float64 [L, U]."""
    return np.asarray(self.correct, np.float64).mean(axis=-1)

  @property
  def h_gen(self) -> np.ndarray:
    """|Acc(ablated) - Acc(base)|, Eq. 3 on generated answers: float64 [L, U]."""
    return np.abs(self.accuracy - self.base_accuracy)


def reasoning_sweep(params: Params, config: ModelConfig, tokenizer: Any,
                    reasoning_set: ReasoningSet, *, group: int = 1, answer: str = "boxed",
                    max_new_tokens: int = 256, pad_id: int, batch_size: int = 16,
                    mask_block: int = 8, done: Mapping[str, np.ndarray] | None = None,
                    on_block: Callable[[str, np.ndarray], None] | None = None,
                    progress: Callable[[float], None] | None = None) -> ReasoningSweep:
  """Generated-answer correctness on D_util for the base model and every single-unit ablation.

  Args:
    group: query heads per unit; unit u of layer l zeroes heads [u * group, (u + 1) * group)
      (1 for q / o targets, H // KV for k / v: `targets.unit_group`);
      ValueError unless it divides H.
    done / on_block / progress: the sweeps' resume protocol (`sensitivity.safety_sweep`): the
      1 + L * U masks (base first) run in `sensitivity.safety_blocks` order; `done` {key: bool
      [end - start, N]} blocks are not recomputed, on_block(key, correct) is called as each other
      block finishes and progress(masks) after it.
    other args: as `correct_under_masks`.
  Returns:
    ReasoningSweep with correct [L, H // group, N].
  """
  L, H = config.num_layers, config.num_heads
  masks = np.concatenate([np.ones((1, L, H), np.float32), head_ablation.unit_masks(config, group)])
  N = len(reasoning_set.prompt_ids)
  correct = np.zeros((len(masks), N), bool)
  done = dict(done or {})
  for key, s, e in sensitivity.safety_blocks(config, group, mask_block):
    if key in done:
      got = np.asarray(done[key], bool)
      if got.shape != (e - s, N):
        raise ValueError(f"stored reasoning block {key} has shape {got.shape}, expected "
                         f"{(e - s, N)}: it belongs to another run; use a new workdir")
    else:
      got = correct_under_masks(params, config, tokenizer, reasoning_set, masks[s:e],
                                answer=answer, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                batch_size=batch_size, mask_block=mask_block)
      if on_block is not None:
        on_block(key, got)
      if progress is not None:
        progress(e - s)
    correct[s:e] = got
  return ReasoningSweep(correct[0], correct[1:].reshape(L, H // group, N))
