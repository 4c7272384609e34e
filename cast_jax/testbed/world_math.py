"""Arithmetic family: 2-3 step word problems with small numbers, in the GSM8K schema.

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


def _problem(r: random.Random) -> tuple[str, list[str], int]:
  """One problem: (question, solution lines without the final answer line, answer).

    Solution lines are bare equations ("63 + 3 = 66.") to keep sequences short.
    """
  name, item = r.choice(NAMES), r.choice(ITEMS)
  if r.random() < 0.3:
    a, b = r.randint(2, 9), r.randint(2, 9)
    x = a * b
    q = [f"{name} has {a} boxes of {b} {item}."]
    sol = [f"{a} * {b} = {x}."]
  else:
    x = r.randint(2, 20)
    q = [f"{name} has {x} {item}."]
    sol = []
  n_ops = r.randint(1, 2) if sol else 2
  for _ in range(n_ops):
    if x >= 2 and r.random() < 0.5:
      b = r.randint(1, min(x - 1, 15))
      verb = r.choice(("gives away {b}", "loses {b}", "sells {b}"))
      y = x - b
      sol.append(f"{x} - {b} = {y}.")
    else:
      b = r.randint(1, 20)
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
