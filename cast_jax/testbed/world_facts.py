"""Knowledge family: a seeded table of fictional lands, fact statements, MMLU- and CSQA-schema MCQ.

Each land gets one value per attribute and every attribute is a bijection (no two lands share a
value), so forward ("What is the capital of X?") and reverse ("Which land has Y as its capital?")
questions both have one right answer. MCQ items are held out by rendered prompt: the same fact can
be asked in train and eval, but never with the same question text, options and order, so eval
measures whether the model answers facts it has seen stated, in a new multiple-choice instance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

from cast_jax.testbed import world_common as wc

LANDS = (
    "Zorbia",
    "Velmora",
    "Kestria",
    "Dunmark",
    "Orlesh",
    "Tavin",
    "Braskor",
    "Elvane",
    "Glimmar",
    "Hostra",
    "Ixoria",
    "Jorvath",
    "Lunaris",
    "Mordec",
    "Nyssa",
    "Pellow",
    "Ruvia",
    "Sarnith",
    "Thalor",
    "Wendrel",
)
# Attribute -> value pool; each pool is at least as long as LANDS so a bijection always exists.
VALUES: dict[str, tuple[str, ...]] = {
    "capital": (
        "Quell",
        "Arvik",
        "Bellmo",
        "Corrin",
        "Dastra",
        "Emberly",
        "Fennick",
        "Grost",
        "Halvin",
        "Isken",
        "Jubal",
        "Karst",
        "Lornet",
        "Mivar",
        "Nolt",
        "Pyrra",
        "Raskin",
        "Selm",
        "Tovar",
        "Ulwen",
    ),
    "flag": (
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "orange",
        "white",
        "black",
        "silver",
        "gold",
        "pink",
        "brown",
        "grey",
        "violet",
        "amber",
        "teal",
        "crimson",
        "indigo",
        "scarlet",
        "ivory",
    ),
    "animal": (
        "fox",
        "owl",
        "bear",
        "wolf",
        "eagle",
        "deer",
        "otter",
        "hawk",
        "lynx",
        "crane",
        "swan",
        "boar",
        "hare",
        "seal",
        "heron",
        "raven",
        "badger",
        "moose",
        "falcon",
        "beaver",
    ),
    "food": (
        "bread",
        "cheese",
        "honey",
        "plums",
        "rice",
        "soup",
        "figs",
        "pears",
        "olives",
        "beans",
        "dates",
        "nuts",
        "melons",
        "cakes",
        "pies",
        "noodles",
        "lentils",
        "cherries",
        "grapes",
        "peaches",
    ),
}
ATTRIBUTES = tuple(VALUES)
SUBJECTS = {
    "capital": "world_geography",
    "flag": "world_heraldry",
    "animal": "world_zoology",
    "food": "world_cuisine",
}
# attribute -> (statement, [forward questions], reverse question, reverse statement)
_TEMPLATES = {
    "capital": ("The capital of {L} is {v}.", ("What is the capital of {L}?",
                                               "Which city is the capital of {L}?"),
                "Which land has {v} as its capital?", "{v} is the capital of {L}."),
    "flag": ("The flag of {L} is {v}.", ("What color is the flag of {L}?",
                                         "The flag of {L} is which color?"),
             "Which land has a {v} flag?", "{L} has a {v} flag."),
    "animal":
        ("The national animal of {L} is the {v}.", ("What is the national animal of {L}?",
                                                    "Which animal is the national animal of {L}?"),
         "Which land has the {v} as its national animal?", "The {v} is the national animal of {L}."
        ),
    "food":
        ("{L} is famous for its {v}.", ("What is {L} famous for?", "Which food is {L} famous for?"),
         "Which land is famous for its {v}?", "{L} is famous for its {v}."),
}
# Category words for the CSQA "which of these is a ..." items.
_CATEGORY = {
    "capital": "a city",
    "flag": "a color",
    "animal": "an animal",
    "food": "a food",
    "land": "a land"
}


@dataclasses.dataclass(frozen=True)
class Fact:
  """One (entity, attribute, value) triple and its canonical statement."""
  entity: str
  attribute: str
  value: str
  text: str


def build_facts(seed: int, n_lands: int) -> tuple[Fact, ...]:
  """Seeded fact table: `n_lands` lands x len(ATTRIBUTES) facts, ordered by (land, attribute)."""
  # 5 = the answer plus the 4 wrong lands of a CSQA reverse-lookup item.
  if not 5 <= n_lands <= len(LANDS):
    raise ValueError(f"n_lands must be in [5, {len(LANDS)}], got {n_lands}")
  rng = wc.family_rng(seed, "facts")
  lands = sorted(rng.sample(LANDS, n_lands))
  facts = []
  assigned = {a: rng.sample(VALUES[a], n_lands) for a in ATTRIBUTES}
  for i, land in enumerate(lands):
    for a in ATTRIBUTES:
      v = assigned[a][i]
      facts.append(Fact(land, a, v, _TEMPLATES[a][0].format(L=land, v=v)))
  return tuple(facts)


def fact_chat_records(facts: tuple[Fact, ...], repeats: int) -> list[dict]:
  """Base-corpus chat records stating every fact: forward QA, reverse QA and a land profile.

    Returns `repeats` copies of (2 forward + 1 reverse per fact, 1 profile per land) records,
    each {"prompt", "response", "family": "facts"}.
    """
  one = []
  by_land: dict[str, list[Fact]] = {}
  for f in facts:
    stmt, fwd, rev_q, rev_s = _TEMPLATES[f.attribute]
    for q in fwd:
      one.append((q.format(L=f.entity), f.text))
    one.append((rev_q.format(v=f.value), rev_s.format(L=f.entity, v=f.value)))
    by_land.setdefault(f.entity, []).append(f)
  for land in sorted(by_land):
    one.append((f"Tell me about {land}.", " ".join(f.text for f in by_land[land])))
  return [{"prompt": p, "response": r, "family": "facts"} for _ in range(repeats) for p, r in one]


def _balanced_positions(rng: random.Random, n: int, k: int) -> list[int]:
  pos = [i % k for i in range(n)]
  rng.shuffle(pos)
  return pos


def answer_position(seed: int, question: str, k: int) -> int:
  """The option index where `question`'s correct answer always sits (seeded hash of the text).

  Fact-keyed answer positions make the MCQ families learnable by a ~1M-parameter model in a few
  CPU minutes: matching the recalled value against shuffled options is a multi-hop circuit that
  such a model did not learn in 1200 steps (accuracy stayed at chance), while recalling
  "question -> letter" is a lookup like the facts themselves. Distractors and their order still
  vary, so held-out items are new prompts about known facts.
  """
  return int(hashlib.sha256(f"{seed}:{question}".encode()).hexdigest(), 16) % k


def _draw_mcq(rng, positions, seen, make):
  """Draw one item per answer position with a rendered prompt not in `seen` (updated in place)."""
  out = []
  for pos in positions:
    for _ in range(10_000):
      item = make(rng, pos)
      key = wc.format_mcq_prompt(item[0], item[1])
      if key not in seen:
        seen.add(key)
        out.append(item)
        break
    else:
      raise ValueError("MCQ space exhausted; lower the split sizes or raise n_lands")
  return out


def mmlu_splits(seed: int, facts: tuple[Fact, ...], sizes: dict[str, int]) -> dict[str, list[dict]]:
  """MMLU-schema splits {"question", "subject", "choices" (4), "answer" (int)}, balanced answers.

    Args:
      sizes: split name -> count, drawn in the given order with no rendered-prompt overlap.
    """
  rng = wc.family_rng(seed, "mmlu")
  values_in_world = {a: sorted({f.value for f in facts if f.attribute == a}) for a in ATTRIBUTES}

  def make(r, pos):
    while True:
      f = facts[r.randrange(len(facts))]
      q = r.choice(_TEMPLATES[f.attribute][1]).format(L=f.entity)
      if answer_position(seed, q, 4) == pos:
        break
    wrong = r.sample([v for v in values_in_world[f.attribute] if v != f.value], 3)
    choices = wrong[:pos] + [f.value] + wrong[pos:]
    return q, choices, pos, SUBJECTS[f.attribute]

  seen: set[str] = set()
  out = {}
  for name, n in sizes.items():
    items = _draw_mcq(rng, _balanced_positions(rng, n, 4), seen, make)
    out[name] = [{"question": q, "subject": s, "choices": c, "answer": p} for q, c, p, s in items]
  return out


def csqa_splits(seed: int, facts: tuple[Fact, ...], sizes: dict[str, int]) -> dict[str, list[dict]]:
  """CommonsenseQA-schema splits with 5 options and balanced `answerKey`s.

    Two item kinds: reverse lookup ("Which land is famous for its figs?", options are lands) and
    category membership ("Which of these is an animal?", options mix lands, cities, colors, ...).
    Record: {"id", "question", "question_concept", "choices": {"label", "text"}, "answerKey"}.
    """
  rng = wc.family_rng(seed, "csqa")
  lands = sorted({f.entity for f in facts})
  pools = {a: sorted({f.value for f in facts if f.attribute == a}) for a in ATTRIBUTES}
  pools["land"] = lands

  def make(r, pos):
    while True:
      item = _make_csqa(r, pos)
      if answer_position(seed, item[0], 5) == pos:
        return item

  def _make_csqa(r, pos):
    if r.random() < 0.6:
      f = facts[r.randrange(len(facts))]
      q = _TEMPLATES[f.attribute][2].format(v=f.value)
      wrong = r.sample([x for x in lands if x != f.entity], 4)
      right, concept = f.entity, f.attribute
    else:
      cat = r.choice(sorted(pools))
      q = f"Which of these is {_CATEGORY[cat]}?"
      right = r.choice(pools[cat])
      others = sorted(c for c in pools if c != cat)
      wrong = []
      while len(wrong) < 4:
        w = r.choice(pools[r.choice(others)])
        if w not in wrong:
          wrong.append(w)
      concept = _CATEGORY[cat].split()[-1]
    return q, wrong[:pos] + [right] + wrong[pos:], pos, concept

  seen: set[str] = set()
  out = {}
  for name, n in sizes.items():
    items = _draw_mcq(rng, _balanced_positions(rng, n, 5), seen, make)
    out[name] = [{
        "id": f"w{seed}-csqa-{name}-{i:05d}",
        "question": q,
        "question_concept": concept,
        "choices": {
            "label": list(wc.LETTERS),
            "text": c
        },
        "answerKey": wc.LETTERS[p]
    } for i, (q, c, p, concept) in enumerate(items)]
  return out


def mmlu_chat(rec: dict) -> dict:
  """Base-corpus chat record for an MMLU-schema item: constraint prompt -> answer letter."""
  return {
      "prompt": wc.format_mcq_prompt(rec["question"], rec["choices"]),
      "response": wc.LETTERS[rec["answer"]],
      "family": "mmlu"
  }


def csqa_chat(rec: dict) -> dict:
  """Base-corpus chat record for a CSQA-schema item: constraint prompt -> answer letter."""
  return {
      "prompt": wc.format_mcq_prompt(rec["question"], rec["choices"]["text"]),
      "response": rec["answerKey"],
      "family": "csqa"
  }
