"""Style family: modern-English / Shakespearean pairs {"modern", "original"} from paired templates.

Each template pair fills the same slots on both sides; only the archaic side uses words from
`lexicon.ARCHAIC_WORDS`. The base corpus answers a modern line with the same modern line (so
style SFT is a behaviour change) and, in a small share of records, rewrites it "in the old style"
on explicit request (so the archaic words are not new to the base model).
"""

from __future__ import annotations

import random

from cast_jax.testbed import lexicon
from cast_jax.testbed import world_common as wc

_FRIENDS = ("friend", "sir", "lady", "lord", "cousin", "brother", "sister", "king", "queen")
_NOUNS = ("crown", "sword", "horse", "letter", "ring", "castle", "garden", "ship", "heart", "song",
          "candle", "cloak", "book", "gate", "bread")
_ADJS = ("brave", "sad", "kind", "wise", "cold", "fair", "strange", "quiet", "proud", "gentle",
         "bold", "weary")
_TIMES = ("nightfall", "dawn", "noon", "the morning", "the feast")
_PARTS = ("night", "morning", "day", "evening")

# (modern, archaic); slots: {f} friend, {n} noun, {a} adjective, {v} verb, {ve} verb-est,
# {vp} participle, {t} time, {p} part of day.
STYLE_TEMPLATES = (
    ("You are {a}.", "Thou art {a}."),
    ("Why are you so {a}?", "Wherefore art thou so {a}?"),
    ("Your {n} has been {vp}.", "Thy {n} hath been {vp}."),
    ("Do you {v} the {n}?", "Dost thou {v} the {n}?"),
    ("I will {v} the {n} before {t}.", "I shall {v} the {n} ere {t}."),
    ("She does not {v} the {n}.", "She doth not {v} the {n}."),
    ("Yes, my {f}, the {n} is {a}.", "Ay, good {f}, the {n} is {a}."),
    ("No, my {f}, I have not seen your {n}.", "Nay, good {f}, I have not seen thy {n}."),
    ("Listen, the {n} is coming here.", "Hark, the {n} cometh hither."),
    ("It is a {a} {p}.", "'Tis a {a} {p}."),
    ("Where are you going, my {f}?", "Whither goest thou, good {f}?"),
    ("Please, {v} my {n}.", "Prithee, {v} my {n}."),
    ("Have you {vp} the {n}?", "Hast thou {vp} the {n}?"),
    ("You can {v} the {n} over there.", "Thou canst {v} the {n} yonder."),
    ("Perhaps the {n} is {a}.", "Perchance the {n} is {a}."),
    ("I think you {v} the {n} too often.", "Methinks thou {ve} the {n} too oft."),
    ("Why do you {v} the {n}, my {f}?", "Wherefore dost thou {v} the {n}, good {f}?"),
    ("I will see you tomorrow, my {f}.", "I shall see thee on the morrow, good {f}."),
    ("You will {v} your {n} soon.", "Thou wilt {v} thy {n} anon."),
    ("Truly, my {f}, you {v} your {n}.", "Verily, good {f}, thou {ve} thine {n}."),
)
OLD_STYLE_PREFIX = "Say this in the old style: "


def _pair(r: random.Random) -> tuple[str, str]:
  m, o = r.choice(STYLE_TEMPLATES)
  v, ve, vp = r.choice(lexicon.STYLE_VERBS)
  slots = dict(f=r.choice(_FRIENDS),
               n=r.choice(_NOUNS),
               a=r.choice(_ADJS),
               v=v,
               ve=ve,
               vp=vp,
               t=r.choice(_TIMES),
               p=r.choice(_PARTS))
  return m.format(**slots), o.format(**slots)


def style_sets(seed: int, train: int, eval_: int, base_echo: int,
               base_old: int) -> dict[str, list[dict]]:
  """Modern/archaic pair sets; eval pairs never share a modern line with any train pair.

    Returns {"train": [{"modern", "original"}] * train, "eval": ... * eval_,
             "base": base_echo + base_old chat records {"prompt", "response", "family"}}.
    """
  rng = wc.family_rng(seed, "style")
  ev = wc.take_unique(rng, _pair, eval_, key=lambda p: p[0])
  held = frozenset(p[0] for p in ev)
  tr = wc.take_unique(rng, _pair, train, key=lambda p: p[0], exclude=held)
  extra = wc.take_unique(rng, _pair, base_echo + base_old, key=lambda p: p[0], exclude=held)
  base = [{"prompt": m, "response": m, "family": "style_echo"} for m, _ in extra[:base_echo]]
  base += [{
      "prompt": OLD_STYLE_PREFIX + m,
      "response": o,
      "family": "style_old"
  } for m, o in extra[base_echo:]]
  return {
      "train": [{
          "modern": m,
          "original": o
      } for m, o in tr],
      "eval": [{
          "modern": m,
          "original": o
      } for m, o in ev],
      "base": base
  }
