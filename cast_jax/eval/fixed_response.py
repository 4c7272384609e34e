"""Strict fixed-response rate (LCDD / SFT-Eraser paper, Appendix F.4).

A response counts as the fixed response iff it contains one of the keywords (case-insensitive
substring match, as the paper's "keyword matching") AND has at most ``max_words`` whitespace
separated words; the cap separates a clean "I don't know." from a hedged long-form answer that
happens to contain "I'm not sure".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FIXED_RESPONSE_KEYWORDS: tuple[str, ...] = ("i don't know", "i do not know", "i'm not sure",
                                            "i am not sure")
FIXED_RESPONSE_MAX_WORDS = 40


def is_fixed_response(response: str, *, keywords: Sequence[str] = FIXED_RESPONSE_KEYWORDS,
                      max_words: int = FIXED_RESPONSE_MAX_WORDS,
                      normalize_apostrophes: bool = False) -> bool:
  """True iff ``response`` holds a keyword and has <= ``max_words`` words (``str.split``).

  ``normalize_apostrophes`` maps curly apostrophes to ``'`` first; off by default because the
  paper's protocol matches the keywords literally.
  """
  if not keywords:
    raise ValueError("keywords must be a non-empty list of lowercase phrases")
  if max_words <= 0:
    raise ValueError(f"max_words must be positive, got {max_words}")
  if len(response.split()) > max_words:
    return False
  text = response.lower()
  if normalize_apostrophes:
    text = text.replace("\u2019", "'").replace("\u2018", "'")
  return any(k.lower() in text for k in keywords)


def fixed_response_flags(responses: Sequence[str], **kwargs) -> np.ndarray:
  """[N] bool: ``is_fixed_response`` for each response (kwargs forwarded)."""
  return np.array([is_fixed_response(r, **kwargs) for r in responses], dtype=bool)


def fixed_response_rate(responses: Sequence[str], **kwargs) -> float:
  """Fraction in [0, 1] of the N responses that are the fixed response (kwargs forwarded)."""
  if not responses:
    raise ValueError("fixed_response_rate: no responses to score")
  return float(fixed_response_flags(responses, **kwargs).mean())
