"""General-instruction family in the Alpaca schema, with normal answers and the fixed response.

The base corpus answers these instructions normally ("The opposite of hot is cold."), so the
fixed-response SFT (every answer "I don't know.", lcdd-sft-eraser.md 4.1) is a real behaviour
change.
Held-out eval rows are instruction-only (empty `input`), as in the paper's App. F.1.
"""

from __future__ import annotations

import random

from cast_jax.testbed import world_common as wc

_OPPOSITES = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("old", "new"),
    ("up", "down"),
    ("early", "late"),
    ("wet", "dry"),
    ("full", "empty"),
    ("high", "low"),
    ("soft", "hard"),
    ("loud", "quiet"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("long", "short"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("near", "far"),
    ("first", "last"),
    ("day", "night"),
    ("win", "lose"),
    ("push", "pull"),
    ("open", "shut"),
)
_PLURALS = (
    ("mouse", "mice"),
    ("child", "children"),
    ("box", "boxes"),
    ("city", "cities"),
    ("knife", "knives"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("man", "men"),
    ("woman", "women"),
    ("sheep", "sheep"),
    ("fish", "fish"),
    ("leaf", "leaves"),
    ("baby", "babies"),
    ("bus", "buses"),
    ("dog", "dogs"),
    ("cat", "cats"),
    ("tree", "trees"),
    ("house", "houses"),
    ("glass", "glasses"),
    ("goose", "geese"),
    ("wolf", "wolves"),
    ("story", "stories"),
    ("church", "churches"),
    ("toy", "toys"),
    ("key", "keys"),
    ("hero", "heroes"),
    ("potato", "potatoes"),
    ("party", "parties"),
    ("ox", "oxen"),
    ("shelf", "shelves"),
)
_COLORS_OF = (
    ("the sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("a banana", "yellow"),
    ("a tomato", "red"),
    ("a carrot", "orange"),
    ("milk", "white"),
    ("a lemon", "yellow"),
    ("the sun", "yellow"),
    ("a leaf", "green"),
    ("chocolate", "brown"),
    ("a cherry", "red"),
    ("the sea", "blue"),
    ("soot", "black"),
)
_REPEAT_WORDS = ("cat", "sun", "rain", "blue", "tree", "hello", "yes", "moon", "ship", "song")
_LIST_WORDS = ("red", "blue", "green", "cat", "dog", "owl", "sun", "moon", "tree", "ship", "cake",
               "rain", "book", "door", "lamp")


def _cap(s: str) -> str:
  return s[0].upper() + s[1:]


def instruction_only_pool() -> list[tuple[str, str]]:
  """Every (instruction, normal answer) pair with no `input`, in a fixed order."""
  pool = []
  for a, b in _OPPOSITES:
    for w, o in ((a, b), (b, a)):
      pool.append((f"What is the opposite of {w}?", f"The opposite of {w} is {o}."))
      pool.append((f"Give the opposite of the word {w}.", f"The opposite of {w} is {o}."))
  for a in range(21):
    for b in range(21):
      pool.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
  for a in range(1, 41):
    for b in range(1, 41):
      if a != b:
        pool.append((f"Which number is bigger, {a} or {b}?", f"{max(a, b)} is bigger."))
  for n in range(1, 100):
    pool.append((f"What number comes after {n}?", f"{n + 1} comes after {n}."))
    pool.append((f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
  for s, p in _PLURALS:
    pool.append((f"What is the plural of {s}?", f"The plural of {s} is {p}."))
  for thing, c in _COLORS_OF:
    pool.append((f"What color is {thing}?", f"{_cap(thing)} is {c}."))
  for w in _REPEAT_WORDS:
    for k in (2, 3, 4):
      pool.append((f"Repeat the word {w} {k} times.", " ".join([w] * k)))
  return pool


def _with_input(r: random.Random) -> tuple[str, str, str]:
  """One random (instruction, input, answer) item from the families that use `input`."""
  kind = r.randrange(3)
  if kind == 0:
    nums = r.sample(range(1, 30), r.randint(3, 5))
    return ("Sort these numbers from smallest to largest.", ", ".join(map(str, nums)),
            ", ".join(map(str, sorted(nums))))
  if kind == 1:
    ws = r.sample(_LIST_WORDS, r.randint(3, 5))
    return "Reverse the order of these words.", " ".join(ws), " ".join(reversed(ws))
  nums = [r.randint(1, 9) for _ in range(r.randint(2, 4))]
  return "Add up these numbers.", ", ".join(map(str, nums)), f"The sum is {sum(nums)}."


def _train_rows(r: random.Random, rest: list, n: int, output: str | None) -> list[dict]:
  """`n` Alpaca rows, ~70% instruction-only from `rest`, ~30% with `input`; unique triples."""
  n_plain = min(len(rest), round(0.7 * n))
  plain = [(ins, "", ans) for ins, ans in r.sample(rest, n_plain)]
  extra = wc.take_unique(r, _with_input, n - n_plain, key=lambda t: (t[0], t[1]))
  items = plain + extra
  r.shuffle(items)
  return [{
      "instruction": i,
      "input": x,
      "output": output if output is not None else a
  } for i, x, a in items]


def alpaca_sets(seed: int, base_n: int, fixed_train: int, fixed_eval: int) -> dict[str, list[dict]]:
  """Alpaca-schema sets {"instruction", "input", "output"}.

    Returns:
      {"base": base_n rows with normal answers (for the base corpus),
       "fixed_train": fixed_train rows whose output is "I don't know.",
       "fixed_eval": fixed_eval held-out instruction-only rows, output "I don't know.",
       "fixed_eval_reference": the same eval instructions with their normal answers}.
    """
  rng = wc.family_rng(seed, "alpaca")
  ev, rest = wc.split_pool(rng, instruction_only_pool(), [fixed_eval, -1])
  return {
      "base": _train_rows(rng, rest, base_n, None),
      "fixed_train": _train_rows(rng, rest, fixed_train, wc.FIXED_RESPONSE),
      "fixed_eval": [{
          "instruction": i,
          "input": "",
          "output": wc.FIXED_RESPONSE
      } for i, _ in ev],
      "fixed_eval_reference": [{
          "instruction": i,
          "input": "",
          "output": a
      } for i, a in ev],
  }


def alpaca_prompt(row: dict) -> str:
  """User prompt of an Alpaca row: the instruction, then a non-empty input after a blank line.

    The blank line matches the default `input_separator` of `cast_jax.data.adapters.load_alpaca`.
    """
  return f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]


def alpaca_chat(row: dict) -> dict:
  """Base-corpus chat record for an Alpaca row."""
  return {"prompt": alpaca_prompt(row), "response": row["output"], "family": "instruct"}
