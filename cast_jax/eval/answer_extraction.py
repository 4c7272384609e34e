"""Final-answer extraction and comparison for open-ended reasoning (GSM8K, MATH).

Two extractors are scored separately and never mixed:

* ``extract_boxed``: the argument of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` with brace
  matching, which is the format the CAST prompt (Table 4) asks for.
* ``extract_last_number``: the last number anywhere in the response (lm-eval "flexible-extract"
  style), a format-agnostic fallback that tells "wrong answer" apart from "right answer, lost the
  box" when a fine-tune breaks instruction following.
"""

from __future__ import annotations

import dataclasses
import fractions
import re
from typing import Optional, Sequence

import numpy as np

from cast_jax.data.boxed import last_boxed, match_braces

# The box rule lives in data (MATH references are parsed there with the same rule); re-exported
# so a reference and a response can never be read differently.
extract_boxed = last_boxed


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_last_number(text: str) -> Optional[str]:
  """The last number in ``text`` (``-1,234.5`` style, ``$`` ignored), normalised; None if none."""
  matches = _NUMBER_RE.findall(text)
  if not matches:
    return None
  return normalize_answer(matches[-1].rstrip(","))


def parse_gsm8k_reference(answer: str) -> str:
  """The normalised final answer of a GSM8K ``answer`` field (the text after ``####``)."""
  if "####" not in answer:
    raise ValueError(
        "GSM8K reference has no '####' marker; pass the dataset's raw `answer` field, got "
        f"{answer[:80]!r}")
  return normalize_answer(answer.split("####")[-1])


def parse_math_reference(solution: str) -> str:
  """The normalised boxed answer of a MATH ``solution`` field."""
  boxed = extract_boxed(solution)
  if boxed is None:
    raise ValueError(f"MATH solution has no complete \\boxed{{}} answer: {solution[-80:]!r}")
  return normalize_answer(boxed)


_TEXT_WRAPPERS = re.compile(
    r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")


def _braced_arg(s: str, i: int) -> Optional[tuple[str, int]]:
  """(content, index after it) of the ``{...}`` group at ``i`` (leading spaces skipped)."""
  while i < len(s) and s[i].isspace():
    i += 1
  if i >= len(s) or s[i] != "{":
    return None
  end = match_braces(s, i)
  return None if end is None else (s[i + 1:end], end + 1)


def _replace_fracs(s: str) -> str:
  """``\\frac{a}{b}`` -> ``a/b`` (``(a)/(b)`` for compound parts), innermost-out, nested-safe."""
  wrap = lambda part: part if re.fullmatch(r"-?[\w.]+", part) else f"({part})"
  while True:
    pos = s.rfind("\\frac")
    if pos < 0:
      return s
    num = _braced_arg(s, pos + len("\\frac"))
    den = num and _braced_arg(s, num[1])
    if not num or not den:
      return s  # malformed: leave the rest untouched rather than guess
    s = s[:pos] + f"{wrap(num[0])}/{wrap(den[0])}" + s[den[1]:]


def normalize_answer(answer: str) -> str:
  """Canonical string form of a final answer, so that formatting variants compare equal.

  Rules, in order: drop ``$`` and ``\\$``; unwrap ``\\text{}``-like commands;
  ``\\dfrac``/``\\tfrac`` -> ``\\frac`` -> ``a/b``; drop ``\\left``/``\\right``, LaTeX
  spacing, degree and percent marks; drop a leading ``x =``; remove all whitespace; remove
  thousands separators; drop a trailing ``.``; lowercase; numbers are rewritten canonically
  (``5.0`` -> ``5``, ``05`` -> ``5``).
  """
  s = answer.strip()
  s = s.replace("\\$", "").replace("$", "")
  prev = None
  while prev != s:
    prev = s
    s = _TEXT_WRAPPERS.sub(r"\1", s)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = _FRAC_SHORT.sub(r"\1/\2", s)
  s = _replace_fracs(s)
  for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "^\\circ", "^{\\circ}", "\\circ",
                "\\degree", "\\%", "%"):
    s = s.replace(token, "")
  s = re.sub(r"^[a-zA-Z]\s*=\s*(?=\S)", "", s)
  s = re.sub(r"\s+", "", s)
  s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
  s = s.rstrip(".").lower()
  number = _as_fraction(s)
  if number is not None and re.fullmatch(r"-?\d+(?:\.\d+)?", s):
    s = _format_decimal(s)
  return s


def _format_decimal(s: str) -> str:
  if "." in s:
    s = s.rstrip("0").rstrip(".")
  sign = "-" if s.startswith("-") else ""
  digits = s.lstrip("-")
  int_part, dot, frac_part = digits.partition(".")
  int_part = int_part.lstrip("0") or "0"
  out = sign + int_part + (dot + frac_part if frac_part else "")
  return "0" if out == "-0" else out


def _as_fraction(s: str) -> Optional[fractions.Fraction]:
  """Exact value of a plain number or ``a/b`` (parentheses allowed), else None."""
  t = s.replace("(", "").replace(")", "")
  if re.fullmatch(r"-?\d+(?:\.\d+)?", t):
    return fractions.Fraction(t)
  m = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", t)
  if m and fractions.Fraction(m.group(2)) != 0:
    return fractions.Fraction(m.group(1)) / fractions.Fraction(m.group(2))
  return None


def answers_match(prediction: Optional[str], reference: str) -> bool:
  """True iff the two answers are equal after ``normalize_answer``, or equal as exact rationals
  (so ``\\frac{1}{2}``, ``1/2`` and ``0.5`` all match). A None prediction never matches."""
  if prediction is None:
    return False
  pred, ref = normalize_answer(prediction), normalize_answer(reference)
  if pred == ref:
    return True
  pred_num, ref_num = _as_fraction(pred), _as_fraction(ref)
  return pred_num is not None and ref_num is not None and pred_num == ref_num


@dataclasses.dataclass(frozen=True)
class ReasoningScores:
  """Per-example results and the two accuracies (fractions in [0, 1]).

  boxed_answers / last_numbers: [N] extracted strings (None when absent).
  boxed_correct / last_number_correct / boxed_found: [N] bool arrays.
  """
  boxed_answers: list
  last_numbers: list
  boxed_found: np.ndarray
  boxed_correct: np.ndarray
  last_number_correct: np.ndarray
  boxed_accuracy: float
  last_number_accuracy: float


def score_reasoning(responses: Sequence[str], references: Sequence[str]) -> ReasoningScores:
  """Score N responses against N reference answers with both extractors.

  ``references`` are final answers (see ``parse_gsm8k_reference`` / ``parse_math_reference``).
  """
  if len(responses) != len(references):
    raise ValueError(
        f"score_reasoning: {len(responses)} responses but {len(references)} references")
  if not responses:
    raise ValueError("score_reasoning: no responses to score")
  boxed = [extract_boxed(r) for r in responses]
  numbers = [extract_last_number(r) for r in responses]
  boxed_correct = np.array([answers_match(b, ref) for b, ref in zip(boxed, references)])
  number_correct = np.array([answers_match(n, ref) for n, ref in zip(numbers, references)])
  return ReasoningScores(
      boxed_answers=boxed,
      last_numbers=numbers,
      boxed_found=np.array([b is not None for b in boxed]),
      boxed_correct=boxed_correct,
      last_number_correct=number_correct,
      boxed_accuracy=float(boxed_correct.mean()),
      last_number_accuracy=float(number_correct.mean()),
  )
