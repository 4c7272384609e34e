"""Knowledge family: a seeded table of fictional lands, fact statements, MMLU- and CSQA-schema MCQ.

Each land gets one value per attribute and every attribute is a bijection (no two lands share a
value), so forward ("What is the capital of X?") and reverse ("Which land has Y as its capital?")
questions both have one right answer.

MCQ items are built the way MMLU's are: each fact has one fixed option list and answer letter.
Held-out items ask the same facts in question wordings no training MCQ item uses (the wordings do
appear in the plain fact QA), so evaluation measures recognising a known fact's item under a new
wording. Fresh option lists per item would instead need a circuit that matches a recalled value
against arbitrary options and reads the letter bound to it; on a pure matching drill behind the
Table 4 instruction this ~1M-parameter model's loss stayed at chance for ~1300 steps, past the
CPU budget of the whole build.
"""

from __future__ import annotations

import dataclasses

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
# attribute -> (statement, forward questions, reverse questions, reverse statement). The question
# wordings are split between MCQ train / test / calibration items by `_TEMPLATE_SPLITS`.
_TEMPLATES = {
    "capital": ("The capital of {L} is {v}.",
                ("What is the capital of {L}?", "Which city is the capital of {L}?",
                 "Name the capital of {L}.", "What city is the capital of {L}?",
                 "The capital of {L} is which city?"),
                ("Which land has {v} as its capital?", "{v} is the capital of which land?",
                 "Which land's capital is {v}?", "Name the land whose capital is {v}.",
                 "Of which land is {v} the capital?"), "{v} is the capital of {L}."),
    "flag": ("The flag of {L} is {v}.",
             ("What color is the flag of {L}?", "The flag of {L} is which color?",
              "Name the color of the flag of {L}.", "Which color is the flag of {L}?",
              "What is the color of the flag of {L}?"),
             ("Which land has a {v} flag?", "Which land's flag is {v}?",
              "Name the land whose flag is {v}.", "The flag of which land is {v}?",
              "Which land flies a {v} flag?"), "{L} has a {v} flag."),
    "animal": ("The national animal of {L} is the {v}.",
               ("What is the national animal of {L}?",
                "Which animal is the national animal of {L}?",
                "Name the national animal of {L}.", "The national animal of {L} is which animal?",
                "What animal is the national animal of {L}?"),
               ("Which land has the {v} as its national animal?",
                "The {v} is the national animal of which land?",
                "Which land's national animal is the {v}?",
                "Name the land whose national animal is the {v}.",
                "Of which land is the {v} the national animal?"),
               "The {v} is the national animal of {L}."),
    "food": ("{L} is famous for its {v}.",
             ("What is {L} famous for?", "Which food is {L} famous for?",
              "Name the food {L} is famous for.", "{L} is famous for which food?",
              "What food is {L} famous for?"),
             ("Which land is famous for its {v}?", "Which land is known for its {v}?",
              "Name the land famous for its {v}.", "Where are the {v} famous?",
              "The {v} of which land are famous?"), "{L} is famous for its {v}."),
}
# Question wordings (indices into the tuples above) per MCQ split: held-out items ask known facts
# in wordings never used in a training MCQ item.
_TEMPLATE_SPLITS = {"train": (0, 1), "test": (2, 3), "util": (4,), "validation": (2, 3, 4)}


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

    Returns `repeats` copies of (every forward and reverse wording per fact, 1 profile per land),
    each {"prompt", "response", "family": "facts"}.
    """
  one = []
  by_land: dict[str, list[Fact]] = {}
  for f in facts:
    _, fwd, rev, rev_s = _TEMPLATES[f.attribute]
    one += [(q.format(L=f.entity), f.text) for q in fwd]
    one += [(q.format(v=f.value), rev_s.format(L=f.entity, v=f.value)) for q in rev]
    by_land.setdefault(f.entity, []).append(f)
  for land in sorted(by_land):
    one.append((f"Tell me about {land}.", " ".join(f.text for f in by_land[land])))
  return [{"prompt": p, "response": r, "family": "facts"} for _ in range(repeats) for p, r in one]


def _fact_layouts(seed: int, family: str, facts: tuple[Fact, ...], right: dict[Fact, str],
                  pools: dict[str, list[str]], k: int) -> dict[Fact, tuple[list[str], int]]:
  """Fixed options and answer index per fact (as an MMLU question has fixed options), shared by
  every wording and split; answer indices are balanced over the facts."""
  rng = wc.family_rng(seed, f"{family}/layout")
  order = list(facts)
  rng.shuffle(order)
  out = {}
  for i, f in enumerate(order):
    pos = i % k
    wrong = rng.sample([x for x in pools[f.attribute] if x != right[f]], k - 1)
    out[f] = (wrong[:pos] + [right[f]] + wrong[pos:], pos)
  return out


def _split_items(seed: int, family: str, questions: list[tuple[str, Fact]], layouts, k: int,
                 split: str, n: int) -> list[tuple[str, list[str], int, Fact]]:
  """`n` items (question, options, answer index, fact) of one split, interleaved by answer index
  so every prefix is balanced. "train" repeats its items to reach n; held-out splits hold
  distinct items and raise ValueError when the world has fewer than n."""
  cycle = split == "train"
  if not questions or (not cycle and n > len(questions)):
    raise ValueError(f"{family} split {split!r} asks for {n} items but the world has "
                     f"{len(questions)} distinct questions for it; lower the size or raise n_lands")
  rng = wc.family_rng(seed, f"{family}/{split}")
  by_pos = [[(q, *layouts[f], f) for q, f in questions if layouts[f][1] == p] for p in range(k)]
  for group in by_pos:
    rng.shuffle(group)
  items = [g[i] for i in range(max(map(len, by_pos))) for g in by_pos if i < len(g)]
  return [items[i % len(items)] for i in range(n)]


def mmlu_splits(seed: int, facts: tuple[Fact, ...], sizes: dict[str, int]) -> dict[str, list[dict]]:
  """MMLU-schema splits {"question", "subject", "choices" (4), "answer" (int)}, balanced answers.

    Each fact has one fixed option list and answer letter; an item is that list under one
    wording of the question. "train" uses wordings disjoint from "test" and "util"
    (`_TEMPLATE_SPLITS`) and repeats its items to `sizes["train"]` records; held-out splits hold
    distinct items, at most n_lands * 4 * (their number of wordings).

    Args:
      sizes: split name ("train" / "test" / "util") -> record count.
    """
  pools = {a: sorted({f.value for f in facts if f.attribute == a}) for a in ATTRIBUTES}
  layouts = _fact_layouts(seed, "mmlu", facts, {f: f.value for f in facts}, pools, 4)
  out = {}
  for name, n in sizes.items():
    qs = [(_TEMPLATES[f.attribute][1][t].format(L=f.entity), f) for f in facts
          for t in _TEMPLATE_SPLITS[name]]
    items = _split_items(seed, "mmlu", qs, layouts, 4, name, n)
    out[name] = [{"question": q, "subject": SUBJECTS[f.attribute], "choices": c, "answer": p}
                 for q, c, p, f in items]
  return out


def csqa_splits(seed: int, facts: tuple[Fact, ...], sizes: dict[str, int]) -> dict[str, list[dict]]:
  """CommonsenseQA-schema splits of reverse-lookup items ("Which land is famous for its figs?",
    five lands as options), one fixed option list per fact, wordings split as in `mmlu_splits`
    ("train" repeats its items; "validation" holds distinct ones).
    Record: {"id", "question", "question_concept", "choices": {"label", "text"}, "answerKey"}.
    """
  lands = sorted({f.entity for f in facts})
  layouts = _fact_layouts(seed, "csqa", facts, {f: f.entity for f in facts},
                          {a: lands for a in ATTRIBUTES}, 5)
  out = {}
  for name, n in sizes.items():
    qs = [(_TEMPLATES[f.attribute][2][t].format(v=f.value), f) for f in facts
          for t in _TEMPLATE_SPLITS[name]]
    items = _split_items(seed, "csqa", qs, layouts, 5, name, n)
    out[name] = [{
        "id": f"w{seed}-csqa-{name}-{i:05d}",
        "question": q,
        "question_concept": f.attribute,
        "choices": {
            "label": list(wc.LETTERS),
            "text": c
        },
        "answerKey": wc.LETTERS[p]
    } for i, (q, c, p, f) in enumerate(items)]
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
