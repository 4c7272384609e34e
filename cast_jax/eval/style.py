"""Archaic word rate (AWR), the lexical Shakespeare-style measure of the LCDD paper (App. F.4).

Definition used here: words are maximal runs of ASCII letters joined by inner apostrophes
(``o'er``, ``thou'rt``), after curly apostrophes become ``'`` and text is lowercased; a word is
archaic iff it is in the lexicon. For a response, AWR = archaic words / words (0 for a response
with no words). This is the same as counting word-boundary regex matches of single-word lexicon
entries, but guarantees the numerator never exceeds the denominator.

The shipped lexicon (``data/archaic_lexicon.txt``) deliberately leaves out archaic forms that are
also common modern words ("art", "mine", "hence", "wilt", "marry"), which would inflate the rate
of plain modern English.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from typing import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


@functools.lru_cache(maxsize=None)
def default_lexicon() -> frozenset[str]:
  """The shipped lexicon (one lowercase word per line, ``#`` comments)."""
  text = importlib.resources.files("cast_jax.eval").joinpath("data/archaic_lexicon.txt").read_text()
  return parse_lexicon(text.splitlines())


def parse_lexicon(lines: Iterable[str]) -> frozenset[str]:
  """Lexicon from lines: strips comments/blank lines, lowercases; each entry must be one word."""
  words = set()
  for n, line in enumerate(lines, 1):
    entry = line.split("#", 1)[0].strip().lower().replace("\u2019", "'")
    if not entry:
      continue
    if not _WORD.fullmatch(entry):
      raise ValueError(f"lexicon line {n}: {entry!r} is not a single word (letters and inner "
                       "apostrophes only); split multi-word entries")
    words.add(entry)
  if not words:
    raise ValueError("archaic lexicon is empty")
  return frozenset(words)


def tokenize_words(text: str) -> list[str]:
  """Lowercased words of ``text`` as defined in the module docstring."""
  return _WORD.findall(text.replace("\u2019", "'").replace("\u2018", "'").lower())


@dataclasses.dataclass(frozen=True)
class ArchaicRate:
  """per_response: [N] AWR per response; mean_rate: mean of those (macro);
  pooled_rate: total archaic words / total words over all responses (micro)."""
  archaic_counts: np.ndarray
  word_counts: np.ndarray
  per_response: np.ndarray
  mean_rate: float
  pooled_rate: float


def archaic_word_rate(responses: Sequence[str],
                      lexicon: frozenset[str] | None = None) -> ArchaicRate:
  """AWR over N responses against ``lexicon`` (default: the shipped one)."""
  if isinstance(responses, str):
    raise TypeError("archaic_word_rate takes a list of responses, got a single string")
  if not responses:
    raise ValueError("archaic_word_rate: no responses to score")
  lexicon = default_lexicon() if lexicon is None else lexicon
  words = [tokenize_words(r) for r in responses]
  total = np.array([len(w) for w in words], dtype=np.int64)
  archaic = np.array([sum(t in lexicon for t in w) for w in words], dtype=np.int64)
  per = np.where(total > 0, archaic / np.maximum(total, 1), 0.0)
  pooled = float(archaic.sum() / total.sum()) if total.sum() else 0.0
  return ArchaicRate(archaic_counts=archaic, word_counts=total, per_response=per,
                     mean_rate=float(per.mean()), pooled_rate=pooled)
