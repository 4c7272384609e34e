"""Multiple-choice scoring by letter-restricted next-token prediction (CAST "constrained
generation": the answer is the option letter with the highest next-token logit).

The letter's token id depends on the text before it ("A" after a newline, " A" after "Answer:"),
so ids are resolved per prompt from the tokenisation of ``prompt + letter``: the letter must add
exactly one token and leave the prompt's tokens unchanged, or resolution fails loudly.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from cast_jax.eval.batching import encode


def continuation_text(prompt: str, choice: str, space_before: bool | None = None,
                      special_tokens: Sequence[str] = ()) -> str:
  """The literal text a model writes for ``choice`` right after ``prompt``.

  ``space_before=None`` (auto) prefixes a space iff the prompt ends in neither whitespace nor one
  of ``special_tokens``: "Answer:" is continued by " A", while a chat template's trailing newline
  or a role header token ("<|assistant|>") is followed by the reply's first character, "A".
  """
  if space_before is None:
    space_before = (bool(prompt) and not prompt[-1].isspace()
                    and not any(prompt.endswith(t) for t in special_tokens if t))
  return (" " + choice) if space_before else choice


@dataclasses.dataclass(frozen=True)
class ChoiceTokens:
  """prompt_ids: N token lists of the prompts; choice_ids [N, C] int32: the token of each choice
  after each prompt; by_choice: choice -> sorted distinct ids used for it across prompts."""
  prompt_ids: list
  choice_ids: np.ndarray
  by_choice: dict


def _special_token_strings(tokenizer) -> frozenset[str]:
  """Special and added tokens of `tokenizer` (role headers such as "<|assistant|>")."""
  found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
  if callable(getattr(tokenizer, "get_added_vocab", None)):
    found.update(tokenizer.get_added_vocab())
  return frozenset(found)


def resolve_choice_tokens(tokenizer, prompts: Sequence[str], choices: Sequence[str], *,
                          space_before: bool | None = None,
                          add_special_tokens: bool = False) -> ChoiceTokens:
  """Tokenises N prompts and finds the single token each of the C choices adds after each.

  Raises ValueError naming the prompt and choice when a choice is not exactly one token after
  the prompt, changes the prompt's own tokens, maps to the unknown token, or two choices share
  an id.
  """
  if len(set(choices)) != len(choices) or len(choices) < 2:
    raise ValueError(f"choices must be >= 2 distinct strings, got {list(choices)}")
  prompt_ids = encode(tokenizer, prompts, add_special_tokens=add_special_tokens)
  unk = getattr(tokenizer, "unk_token_id", None)
  specials = _special_token_strings(tokenizer)
  ids = np.zeros((len(prompts), len(choices)), dtype=np.int32)
  for c, choice in enumerate(choices):
    texts = [p + continuation_text(p, choice, space_before, specials) for p in prompts]
    full = encode(tokenizer, texts, add_special_tokens=add_special_tokens)
    for n, (base, ext) in enumerate(zip(prompt_ids, full)):
      if len(ext) != len(base) + 1 or ext[:len(base)] != base:
        added = ext[len(base):] if ext[:len(base)] == base else ext[-3:]
        raise ValueError(
            f"choice {choice!r} is not a single token after prompt {n} (...{prompts[n][-30:]!r}): "
            f"tokenised continuation {added}. Use choices that are single tokens in this "
            "tokenizer, or end the prompt so the choice does not merge with it "
            "(set space_before explicitly).")
      if unk is not None and ext[-1] == unk:
        raise ValueError(f"choice {choice!r} maps to the unknown token after prompt {n}")
      ids[n, c] = ext[-1]
  dup = [n for n in range(len(prompts)) if len(set(ids[n].tolist())) != len(choices)]
  if dup:
    raise ValueError(
        f"choices {list(choices)} share a token id after prompt {dup[0]}: {ids[dup[0]]}")
  by_choice = {ch: sorted(set(ids[:, c].tolist())) for c, ch in enumerate(choices)}
  return ChoiceTokens(prompt_ids=prompt_ids, choice_ids=ids, by_choice=by_choice)


def gather_choice_logits(last_logits, choice_ids):
  """Logits of the choice tokens: last_logits [B, V], choice_ids [C] or [B, C] -> [B, C].
  Works on numpy and jax arrays (jit-safe)."""
  xp = jnp if isinstance(last_logits, jnp.ndarray) else np
  choice_ids = xp.asarray(choice_ids)
  if choice_ids.ndim == 1:
    return last_logits[:, choice_ids]
  return xp.take_along_axis(last_logits, choice_ids, axis=1)


def restricted_argmax(last_logits, choice_ids):
  """Predicted choice index [B] (int32): argmax over the choice tokens' logits only
  (last_logits [B, V], choice_ids [C] or [B, C]); ties go to the earliest choice."""
  xp = jnp if isinstance(last_logits, jnp.ndarray) else np
  return xp.argmax(gather_choice_logits(last_logits, choice_ids), axis=-1).astype(xp.int32)


def answer_indices(answers: Sequence, choices: Sequence[str]) -> np.ndarray:
  """[N] int answer indices from ints (already indices), integral floats (2.0) or choice strings
  ("B"). Booleans and fractional numbers are refused, not read as 1 / truncated."""
  out = []
  for n, a in enumerate(answers):
    if isinstance(a, (bool, np.bool_)) or (isinstance(a, (float, np.floating)) and
                                           not float(a).is_integer()):
      raise ValueError(f"answer {n} = {a!r} is not an option index or letter; give an int in "
                       f"[0, {len(choices)}) or one of {list(choices)}")
    if isinstance(a, (int, np.integer, float, np.floating)):
      if not 0 <= a < len(choices):
        raise ValueError(f"answer {n} = {a} is out of range for {len(choices)} choices")
      out.append(int(a))
    elif isinstance(a, str) and a.strip() in choices:
      out.append(list(choices).index(a.strip()))
    else:
      raise ValueError(f"answer {n} = {a!r} is neither an index nor one of {list(choices)}")
  return np.asarray(out, dtype=np.int32)


def mcq_accuracy(predictions, answers) -> float:
  """Fraction in [0, 1] of predictions [N] equal to answer indices [N]."""
  predictions, answers = np.asarray(predictions), np.asarray(answers)
  if predictions.shape != answers.shape or predictions.ndim != 1 or predictions.size == 0:
    raise ValueError(f"predictions {predictions.shape} and answers {answers.shape} must be "
                     "matching non-empty [N] arrays")
  return float((predictions == answers).mean())
