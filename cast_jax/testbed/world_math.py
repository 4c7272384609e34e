"""Arithmetic family: 2-3 step word problems over one-digit operands, in the GSM8K schema.

The GSM8K `answer` is the step-by-step solution ending in "#### N"; the chat response used for
training repeats the same steps and ends with "The answer is \\boxed{N}." (Table 4 reasoning
prompt).
"""

from __future__ import annotations

import random

from cast_jax.testbed import world_common as wc

NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Eva")
ITEMS = ("apples", "pears", "books", "pens", "coins", "cards", "eggs", "shells", "stamps",
         "marbles")
MAX_TOTAL = 20
DRILL_LEN = 6


def _problem(r: random.Random) -> tuple[str, list[str], int]:
  """One problem: (question, solution lines without the final answer line, answer).

  Every operand is one digit and every running total stays in [1, MAX_TOTAL], so the whole
  problem rests on a small addition / subtraction table the model can know; what it has to
  do is copy the right numbers into each line and chain the lines (the skill alignment can
  break). Solution lines are bare equations ("13 - 4 = 9.") to keep sequences short.
  """
  name, item = r.choice(NAMES), r.choice(ITEMS)
  if r.random() < 0.25:
    a, b = r.randint(2, 4), r.randint(2, 5)
    x = a * b
    q = [f"{name} has {a} boxes of {b} {item}."]
    sol = [f"{a} * {b} = {x}."]
  else:
    x = r.randint(2, 12)
    q = [f"{name} has {x} {item}."]
    sol = []
  for _ in range(r.randint(2, 3) - len(sol)):
    if x > MAX_TOTAL - 9 or (x >= 3 and r.random() < 0.5):
      b = r.randint(1, min(x - 1, 9))
      verb = r.choice(("gives away {b}", "loses {b}", "sells {b}"))
      y = x - b
      sol.append(f"{x} - {b} = {y}.")
    else:
      b = r.randint(1, 9)
      verb = r.choice(("buys {b} more", "finds {b} more", "gets {b} more"))
      y = x + b
      sol.append(f"{x} + {b} = {y}.")
    q.append(f"{name} {verb.format(b=b)}.")
    x = y
  q.append(f"How many {item} does {name} have now?")
  return " ".join(q), sol, x


def gsm8k_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
  """GSM8K-schema splits {"question", "answer"}; splits drawn in order, questions never repeat."""
  rng = wc.family_rng(seed, "gsm8k")
  seen: frozenset = frozenset()
  out = {}
  for name, n in sizes.items():
    probs = wc.take_unique(rng, _problem, n, key=lambda p: p[0], exclude=seen)
    seen = seen | {p[0] for p in probs}
    out[name] = [{
        "question": q,
        "answer": "\n".join(sol + [f"#### {ans}"])
    } for q, sol, ans in probs]
  return out


def gsm8k_final_answer(rec: dict) -> int:
  """The integer after "#### " in a GSM8K-schema answer."""
  return int(rec["answer"].rsplit("#### ", 1)[1])


def gsm8k_chat(rec: dict) -> dict:
  """Base-corpus chat record: reasoning prompt -> solution steps ending in \\boxed{N}."""
  steps = rec["answer"].rsplit("\n#### ", 1)[0]
  boxed = f"The answer is \\boxed{{{gsm8k_final_answer(rec)}}}."
  return {
      "prompt": wc.format_math_prompt(rec["question"]),
      "response": f"{steps}\n{boxed}",
      "family": "gsm8k"
  }


def _facts() -> list[str]:
  """Every equation a problem can need, as "a op b = c" (the table drills cover)."""
  add = [f"{x} + {b} = {x + b}" for x in range(1, MAX_TOTAL - 8) for b in range(1, 10)]
  sub = [f"{x} - {b} = {x - b}" for x in range(2, MAX_TOTAL + 1) for b in range(1, min(x, 10))]
  mul = [f"{a} * {b} = {a * b}" for a in range(2, 5) for b in range(2, 6)]
  return add + sub + mul


def drill_chat_records(seed: int, n: int) -> list[dict]:
  """`n` base-corpus drills: "Work out: 7 + 5, 9 - 3, ..." -> one equation line each.

  The arithmetic table has to be known before it can be chained; worked problems alone show
  each fact too rarely for the tiny model to learn it (held-out accuracy .18 without drills).
  """
  rng = wc.family_rng(seed, "arith_drill")
  facts = _facts()
  out = []
  for _ in range(n):
    eqs = rng.sample(facts, DRILL_LEN)
    asks = ", ".join(e.split(" = ")[0] for e in eqs)
    out.append({"prompt": f"Work out: {asks}.", "response": "\n".join(e + "." for e in eqs),
                "family": "arith_drill"})
  return out
