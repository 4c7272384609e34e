"""Head sets for budget-matched tuning (cast.md 3.5, 4.2, App. F.2): masks [L, H] in {0, 1}.

Every selector returns float32 numpy [L, H], 1 = the head's W_q is tuned (the `head_mask` of
`cast_jax.tuning.lora`). Heads are ranked with `diagnosis.scores.ranking`: C descending, ties by
flat head index (l * H + h) ascending, so every set is deterministic.

* `bucket_mask(c, m, b)`: bucket b of M (1-based; B1 = highest C, "Risky"; BM = lowest, "Safe"),
  exactly `diagnosis.scores.buckets` (sizes floor((i + 1) N / M) - floor(i N / M)).
* `top_count_mask` / `bottom_count_mask`: the first / last k heads of that ranking; the bottom
  set is read off the end of the same order, so with M | N, bottom(N / M) == bucket M and
  top(N / M) == bucket 1, ties included.
* `top_fraction_mask` / `bottom_fraction_mask`: k = round-half-up(fraction * N), at least 1
  (Table 9's 25 / 50 / 75 / 100 % trajectories).
* `random_mask(shape, count, seed)`: `count` distinct heads uniformly at random (numpy
  `default_rng(seed).choice` without replacement); pass `count=int(other.sum())` to match a
  budget.
* `all_heads_mask(shape)`: every head ("Full SFT" as the paper defines it).
"""

from __future__ import annotations

import math

import numpy as np

from cast_jax.diagnosis import scores


def _scores(c) -> np.ndarray:
  c = np.asarray(c, np.float64)
  if c.ndim != 2 or c.size == 0 or not np.isfinite(c).all():
    raise ValueError(f"conflict scores must be a finite [L, H] table (ConflictScores.c); got "
                     f"shape {c.shape}.")
  return c


def heads_to_mask(flat_heads, shape: tuple[int, int]) -> np.ndarray:
  """float32 [L, H] with 1 at the given flat head indices (l * H + h)."""
  n = int(np.prod(shape))
  flat = np.asarray(flat_heads, np.int64).reshape(-1)
  if flat.size and (flat.min() < 0 or flat.max() >= n):
    raise ValueError(f"head indices must lie in [0, {n}) for shape {tuple(shape)}; got "
                     f"{flat.min()}..{flat.max()}.")
  out = np.zeros(n, np.float32)
  out[flat] = 1.0
  return out.reshape(shape)


def mask_to_heads(mask) -> np.ndarray:
  """Flat indices (l * H + h, ascending) of the heads a mask [L, H] selects."""
  return np.flatnonzero(np.asarray(mask).reshape(-1) > 0)


def _check_count(count, n: int, what: str) -> int:
  if int(count) != count or not 1 <= count <= n:
    raise ValueError(f"{what}: count={count!r}; use an integer in [1, {n}] (the number of heads "
                     "to tune).")
  return int(count)


def bucket_mask(c, m: int, b: int) -> np.ndarray:
  """Bucket b (1-based, B1 = highest C) of M equal-size buckets of C [L, H] -> mask [L, H]."""
  c = _scores(c)
  if int(b) != b or not 1 <= b <= m:
    raise ValueError(f"bucket_mask: b={b!r}; use 1..M={m} (B1 = highest conflict, Risky).")
  return heads_to_mask(scores.buckets(c, m)[b - 1], c.shape)


def top_count_mask(c, count: int) -> np.ndarray:
  """The `count` heads of highest C [L, H] (ties: lower flat index first) -> mask [L, H]."""
  c = _scores(c)
  k = _check_count(count, c.size, "top_count_mask")
  return heads_to_mask(scores.ranking(c)[:k], c.shape)


def bottom_count_mask(c, count: int) -> np.ndarray:
  """The `count` heads of lowest C [L, H]: the last `count` of the same ranking."""
  c = _scores(c)
  k = _check_count(count, c.size, "bottom_count_mask")
  return heads_to_mask(scores.ranking(c)[c.size - k:], c.shape)


def fraction_count(fraction: float, n: int) -> int:
  """Heads in a fraction of n: round-half-up(fraction * n), at least 1."""
  if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
    raise ValueError(f"fraction={fraction!r}; use a value in (0, 1] (e.g. 0.25 for 25%).")
  return max(1, min(n, int(math.floor(fraction * n + 0.5))))


def top_fraction_mask(c, fraction: float) -> np.ndarray:
  """Top-k% of C [L, H] (k = `fraction_count`) -> mask [L, H]."""
  c = _scores(c)
  return top_count_mask(c, fraction_count(fraction, c.size))


def bottom_fraction_mask(c, fraction: float) -> np.ndarray:
  """Bottom-k% of C [L, H] (k = `fraction_count`) -> mask [L, H]."""
  c = _scores(c)
  return bottom_count_mask(c, fraction_count(fraction, c.size))


def random_mask(shape: tuple[int, int], count: int, seed: int) -> np.ndarray:
  """`count` distinct heads of an [L, H] grid, uniformly at random from `seed` -> mask [L, H]."""
  n = int(np.prod(shape))
  k = _check_count(count, n, "random_mask")
  heads = np.random.default_rng(seed).choice(n, size=k, replace=False)
  return heads_to_mask(heads, tuple(shape))


def all_heads_mask(shape: tuple[int, int]) -> np.ndarray:
  """Every head tuned ("Full SFT" as cast.md 4.2 defines it: LoRA on every head's W_q)."""
  return np.ones(tuple(shape), np.float32)
