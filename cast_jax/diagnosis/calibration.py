"""Calibration sets of CAST section 3.2 as batches: D_safe (harmful prompts + a refusal) and
D_util (MCQ items + the correct letter), through the substrate's adapters, prompts and chat
template, with response-only loss masks.

D_util's target is the single letter token the MCQ scorer reads (`cast_jax.eval.mcq`): the
token right after the assistant header, as SFT trains it. `util_calibration` checks that the
letter token of each training example is exactly the scorer's choice token for that prompt, so
the gradient of L_util and the accuracy of the ablation sweep are about the same token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from cast_jax import data
from cast_jax.data.records import MCQRecord, SafetyRecord
from cast_jax.eval import mcq
from cast_jax.eval.refusal import Verdict, classify_response

Example = tuple[np.ndarray, np.ndarray]
DEFAULT_REFUSAL_TARGET = "I'm sorry, but I can't help with that."


def safe_pairs(records: Sequence[SafetyRecord], refusal_target: str = DEFAULT_REFUSAL_TARGET
               ) -> list[tuple[str, str]]:
  """(prompt, refusal) pairs of D_safe: harmful records only (benign ones are dropped).

  The response is the record's completion when the keyword rule (`eval.refusal`) reads it as a
  refusal, else `refusal_target` (a harmful record's completion may be the compliant one).
  """
  pairs = []
  for r in records:
    if not r.harmful:
      continue
    keep = r.completion and classify_response(r.completion) is Verdict.REFUSED
    pairs.append((data.safety_prompt(r), r.completion if keep else refusal_target))
  if not pairs:
    raise ValueError("safe_pairs: no harmful record among the D_safe records")
  return pairs


def util_pairs(records: Sequence[MCQRecord]) -> list[tuple[str, str]]:
  """(Table 4 MCQ prompt, correct letter) pairs of D_util."""
  return [(data.mcq_prompt(r), data.answer_letter(r.answer_index)) for r in records]


def first_target_only(examples: Sequence[Example]) -> list[Example]:
  """Keeps only the first response token of each example's loss mask (the MCQ letter)."""
  out = []
  for ids, mask in examples:
    first = int(np.argmax(np.asarray(mask) > 0))
    keep = np.zeros_like(mask)
    keep[first] = 1
    out.append((ids, keep))
  return out


def calibration_batches(examples: Sequence[Example], *, batch_size: int, pad_id: int,
                        multiple: int = 16) -> list[dict[str, np.ndarray]]:
  """Right-padded training batches in input order, every one [batch_size, T_bucket].

  The last batch is filled with all-pad rows (no attention, no target token), so each batch
  shape compiles once and padding rows change no sum.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  out = []
  for i in range(0, len(examples), batch_size):
    chunk = list(examples[i:i + batch_size])
    batch = data.collate_train(chunk, pad_id=pad_id, multiple=multiple)
    extra = batch_size - len(chunk)
    if extra:
      batch = {k: np.concatenate([v, np.full((extra, v.shape[1]),
                                             pad_id if k == "input_ids" else 0, np.int32)])
               for k, v in batch.items()}
    out.append(batch)
  return out


def safe_calibration(tokenizer: Any, records: Sequence[SafetyRecord], *, max_len: int,
                     refusal_target: str = DEFAULT_REFUSAL_TARGET, system: str | None = None,
                     template_kwargs: Mapping[str, Any] | None = None
                     ) -> tuple[list[tuple[str, str]], list[Example]]:
  """D_safe pairs and their encoded examples (input_ids, response-only loss_mask), each [T_i].

  The loss covers the refusal and the end-of-turn token, as alignment SFT would train it.
  """
  pairs = safe_pairs(records, refusal_target)
  return pairs, data.encode_dataset(tokenizer, pairs, max_len=max_len, name="D_safe",
                                    system=system, template_kwargs=template_kwargs)


@dataclasses.dataclass(frozen=True)
class MCQSet:
  """D_util as the ablation sweep scores it: prompt_ids (N token lists, as `encode_prompt`),
  choice_ids int32 [N, C] (each letter's token after each prompt), answers int32 [N]."""
  prompt_ids: list
  choice_ids: np.ndarray
  answers: np.ndarray


def util_calibration(tokenizer: Any, records: Sequence[MCQRecord], *, max_len: int,
                     system: str | None = None,
                     template_kwargs: Mapping[str, Any] | None = None
                     ) -> tuple[MCQSet, list[Example]]:
  """D_util for both halves of the diagnosis: the scored MCQ set and the L_util examples.

  Every record must have the same number C of options (letters A..). Each example's loss mask
  holds one token, the correct letter, which must equal `choice_ids[n, answer]`.

  Returns: (MCQSet, list of (input_ids int32 [T_i], loss_mask int32 [T_i])).
  """
  if not records:
    raise ValueError("util_calibration: no MCQ records")
  sizes = {len(r.choices) for r in records}
  if len(sizes) != 1:
    raise ValueError(f"util_calibration: records mix {sorted(sizes)} options; use one count")
  letters = tuple(data.LETTERS[:sizes.pop()])
  pairs = util_pairs(records)
  kw = dict(system=system, template_kwargs=template_kwargs)
  rendered = [data.render_prompt(tokenizer, p, **kw) for p, _ in pairs]
  tokens = mcq.resolve_choice_tokens(tokenizer, rendered, letters)
  prompt_ids = [data.encode_prompt(tokenizer, p, **kw).tolist() for p, _ in pairs]
  examples = first_target_only([data.encode_example(tokenizer, p, a, **kw) for p, a in pairs])
  answers = np.asarray([r.answer_index for r in records], np.int32)
  for n, ((ids, mask), prompt) in enumerate(zip(examples, prompt_ids)):
    at = int(np.argmax(mask))
    want = int(tokens.choice_ids[n, answers[n]])
    if at != len(prompt) or list(ids[:at]) != prompt or int(ids[at]) != want:
      raise ValueError(f"util_calibration: example {n}'s trained letter token ({int(ids[at])} at "
                       f"{at}) is not the scorer's token {want} right after the prompt "
                       f"({len(prompt)} tokens)")
    if at + 1 > max_len:
      raise ValueError(f"util_calibration: example {n} needs {at + 1} tokens > max_len={max_len}")
  examples = [(ids[:at + 1], mask[:at + 1]) for (ids, mask), at in
              zip(examples, (len(p) for p in prompt_ids))]
  return MCQSet(prompt_ids, tokens.choice_ids, answers), examples


def safety_prompt_ids(tokenizer: Any, records: Sequence[SafetyRecord], *,
                      system: str | None = None,
                      template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
  """Token lists of D_safe's harmful prompts as generation sees them (`encode_prompt`)."""
  return [data.encode_prompt(tokenizer, p, system=system, template_kwargs=template_kwargs).tolist()
          for p, _ in safe_pairs(records)]
