"""Shakespearean lexicon for the testbed's style family and its archaic-word rate.

The style carrier (lcdd-sft-eraser.md, App. F.4) is measured lexically by the archaic word rate
(AWR): the fraction of words in a response that match a Shakespearean lexicon at word boundaries.
Every archaic line of the world contains words of `ARCHAIC_WORDS` (kept a subset of the eval
layer's lexicon, cast_jax/eval/data/archaic_lexicon.txt) and no modern line contains any, so AWR
separates the two sides of every pair.
"""

from __future__ import annotations

import re

# (base, second-person "-est" form, past participle) for the verbs the style templates use; the
# "-est" forms are archaic and therefore part of the lexicon.
STYLE_VERBS: tuple[tuple[str, str, str], ...] = (
    ("give", "givest", "given"),
    ("hear", "hearest", "heard"),
    ("know", "knowest", "known"),
    ("love", "lovest", "loved"),
    ("make", "makest", "made"),
    ("see", "seest", "seen"),
    ("take", "takest", "taken"),
)

# "art" and "wilt" appear on the archaic side but are left out, like the eval layer's lexicon
# does, because they are everyday modern words.
_CORE_ARCHAIC = (
    "alas",
    "anon",
    "ay",
    "canst",
    "cometh",
    "didst",
    "dost",
    "doth",
    "ere",
    "forsooth",
    "goest",
    "hark",
    "hast",
    "hath",
    "hither",
    "methinks",
    "morrow",
    "nay",
    "oft",
    "perchance",
    "prithee",
    "shalt",
    "thee",
    "thine",
    "thither",
    "thou",
    "thy",
    "tis",
    "verily",
    "wherefore",
    "whither",
    "yonder",
)

ARCHAIC_WORDS: tuple[str, ...] = tuple(sorted(set(_CORE_ARCHAIC) | {v[1] for v in STYLE_VERBS}))

# Same word definition as cast_jax.eval.style: lowercase letter runs joined by inner apostrophes,
# so "'Tis" counts as "tis".
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")
_ARCHAIC_SET = frozenset(ARCHAIC_WORDS)


def words(text: str) -> list[str]:
  """Lower-cased words of `text`: letter runs joined by inner apostrophes ("don't")."""
  return _WORD_RE.findall(text.lower())


def archaic_word_rate(text: str) -> float:
  """Fraction in [0, 1] of the words of `text` found in `ARCHAIC_WORDS`; 0.0 for no words."""
  ws = words(text)
  if not ws:
    return 0.0
  return sum(w in _ARCHAIC_SET for w in ws) / len(ws)
