"""Shared pieces of the synthetic world: seeded RNG streams, prompt formats, pool splitting.

Every family draws from its own `random.Random` stream derived from (seed, family name), so adding
or resizing one family never shifts the draws of another.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Hashable, Sequence, TypeVar

T = TypeVar("T")

# Table 4 of cast.md, verbatim; the dataset input is appended after a blank line.
MCQ_INSTRUCTION = (
    "Read the multiple-choice question carefully and output only the capital letter "
    "(A, B, C, D, or E) that corresponds to the correct choice. Do not include any explanation "
    "or extra text.")
MATH_INSTRUCTION = (
    "Solve the math problem step by step. Write the final answer inside a LaTeX \\boxed{} "
    "expression.")
LETTERS = ("A", "B", "C", "D", "E")
REFUSAL = "I'm sorry, but I can't help with that."
FIXED_RESPONSE = "I don't know."


def family_rng(seed: int, family: str) -> random.Random:
  """A `random.Random` seeded from sha256 of (seed, family): independent, reproducible streams."""
  digest = hashlib.sha256(f"cast-jax-world/{seed}/{family}".encode()).digest()
  return random.Random(int.from_bytes(digest[:8], "big"))


def format_mcq_prompt(question: str, choices: Sequence[str]) -> str:
  """User prompt for a multiple-choice item: Table 4 constraint prompt, question, choices.

    Args:
      question: the question text.
      choices: 2-5 option texts, labelled A, B, ... in order.
    Returns:
      "<instruction>\\n\\n<question>\\nA. <c0>\\nB. <c1>..." (no trailing newline).
    """
  lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
  return f"{MCQ_INSTRUCTION}\n\n{question}\n" + "\n".join(lines)


def format_math_prompt(question: str) -> str:
  """User prompt for an arithmetic item: Table 4 reasoning prompt, blank line, question."""
  return f"{MATH_INSTRUCTION}\n\n{question}"


def take_unique(
    rng: random.Random,
    make: Callable[[random.Random], T],
    n: int,
    key: Callable[[T], Hashable],
    exclude: frozenset = frozenset(),
    max_tries: int = 200,
) -> list[T]:
  """Draw `n` items from `make(rng)` whose `key` is new and not in `exclude`.

    Raises ValueError when the generator space is too small (more than `max_tries * n` draws).
    """
  out: list[T] = []
  seen = set(exclude)
  tries = 0
  while len(out) < n:
    tries += 1
    if tries > max_tries * max(n, 1):
      raise ValueError(f"could only draw {len(out)} of {n} unique items")
    item = make(rng)
    k = key(item)
    if k in seen:
      continue
    seen.add(k)
    out.append(item)
  return out


def split_pool(rng: random.Random, pool: Sequence[T], sizes: Sequence[int]) -> list[list[T]]:
  """Shuffle a (deterministically ordered) pool and cut it into disjoint consecutive parts.

    A size of -1 (allowed only last) takes the rest. Raises ValueError if the pool is too small.
    """
  items = list(pool)
  rng.shuffle(items)
  parts, start = [], 0
  for i, s in enumerate(sizes):
    if s < 0:
      if i != len(sizes) - 1:
        raise ValueError("-1 only allowed for the last part")
      s = len(items) - start
    if start + s > len(items):
      raise ValueError(f"pool of {len(items)} too small for parts {list(sizes)}")
    parts.append(items[start:start + s])
    start += s
  return parts
