"""Shakespearean lexicon for the testbed's style family.

The style carrier (lcdd-sft-eraser.md, App. F.4) is measured lexically by the archaic word rate
(AWR): the fraction of words in a response that match a Shakespearean lexicon at word boundaries.
Every archaic line of the world contains words of `ARCHAIC_WORDS` (kept a subset of the eval
layer's lexicon, cast_jax/eval/data/archaic_lexicon.txt) and no modern line contains any, so AWR
separates the two sides of every pair (scored by `cast_jax.eval.archaic_word_rate`).
"""

from __future__ import annotations

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
