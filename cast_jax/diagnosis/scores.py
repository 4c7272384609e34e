"""Conflict scores of CAST section 3.3-3.5: percentile ranks, S, C, O-/S-only rankings, buckets.

Everything here is numpy on [L, U] (or any shaped) tables of per-unit values, a unit being a
query head (targets q / o) or a KV head (k / v, `diagnosis.targets`); the docs below say "head"
for either. The expensive parts (gradients, ablation sweep) happen elsewhere, this is the cheap
arithmetic on their results, kept separate so the rules (ties, buckets) are stated once.

Tie rule for percentile ranks: heads with equal values share the mean of the ordinal ranks
they span (1-based, ascending), and rank r maps to (r - 1) / (N - 1), so the smallest value
gets 0, the largest 1, and tied heads get the same rank. N == 1 gets rank 0.5 (no spread).

Bucket rule for N heads and M buckets: heads are sorted by C descending (ties by flat head
index, ascending, so the order is deterministic) and bucket i (0-based, B1 = index 0, highest
C) takes sorted positions [floor(i N / M), floor((i + 1) N / M)). Sizes therefore differ by at
most one when M does not divide N, and the larger buckets are spread evenly rather than all
at the front or back.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cast_jax.eval.metrics import average_ranks


def percentile_ranks(values) -> np.ndarray:
  """Average-rank percentiles in [0, 1] of any-shaped values (tie rule in the module doc).

  Args: values [...] finite floats. Returns float64 [...], same shape.
  """
  v = np.asarray(values, dtype=np.float64)
  if v.size == 0 or not np.isfinite(v).all():
    raise ValueError(f"percentile_ranks: need a non-empty finite array, got shape {v.shape}")
  flat = v.reshape(-1)
  if flat.size == 1:
    return np.full(v.shape, 0.5)
  return ((average_ranks(flat) - 1.0) / (flat.size - 1)).reshape(v.shape)


def sensitivity_score(h_gen, h_safe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """S = exp(rank(H_gen) - rank(H_safe)), Eq. 5, ranks over all heads together.

  Args: h_gen, h_safe [...] (e.g. [L, H]) ablation deltas. Returns (S, rank_gen, rank_safe),
  each float64 [...]; S in [1/e, e].
  """
  h_gen, h_safe = np.asarray(h_gen, np.float64), np.asarray(h_safe, np.float64)
  if h_gen.shape != h_safe.shape:
    raise ValueError(f"sensitivity_score: H_gen {h_gen.shape} and H_safe {h_safe.shape} differ")
  rank_gen, rank_safe = percentile_ranks(h_gen), percentile_ranks(h_safe)
  return np.exp(rank_gen - rank_safe), rank_gen, rank_safe


def conflict_score(o, s) -> np.ndarray:
  """C = O * S, Eq. 6. o, s [...] -> float64 [...]."""
  o, s = np.asarray(o, np.float64), np.asarray(s, np.float64)
  if o.shape != s.shape:
    raise ValueError(f"conflict_score: O {o.shape} and S {s.shape} differ")
  return o * s


def ranking(score) -> np.ndarray:
  """Flat head indices ordered by score, highest first; ties by flat index ascending.

  Args: score [...] (e.g. [L, H]; flat index = l * H + h). Returns int64 [N].
  """
  flat = np.asarray(score, np.float64).reshape(-1)
  return np.lexsort((np.arange(flat.size), -flat))


def bucket_bounds(n: int, m: int) -> np.ndarray:
  """int64 [M + 1]: bucket i holds sorted positions [bounds[i], bounds[i + 1]), floor(i N / M)."""
  if not 1 <= m <= n:
    raise ValueError(f"bucket_bounds: need 1 <= M <= N, got M={m}, N={n}")
  return (np.arange(m + 1) * n) // m


def buckets(score, m: int) -> list[np.ndarray]:
  """M equal buckets of heads by score (rule in the module doc); B1 = highest score.

  Args: score [...] per head; m number of buckets. Returns M int64 arrays of flat head indices,
  each in descending score order; together they partition range(N).
  """
  order = ranking(score)
  bounds = bucket_bounds(order.size, m)
  return [order[bounds[i]:bounds[i + 1]] for i in range(m)]


def bucket_of(score, m: int) -> np.ndarray:
  """Bucket number (1 = highest score) of every head: int64 [...] shaped like score."""
  shape = np.shape(score)
  out = np.empty(int(np.prod(shape)), np.int64)
  for i, heads in enumerate(buckets(score, m)):
    out[heads] = i + 1
  return out.reshape(shape)


@dataclasses.dataclass(frozen=True)
class ConflictScores:
  """Per-head tables, all float64 / int64 [L, H] except the rankings (flat indices [N])."""
  o: np.ndarray
  h_gen: np.ndarray
  h_safe: np.ndarray
  rank_gen: np.ndarray
  rank_safe: np.ndarray
  s: np.ndarray
  c: np.ndarray
  bucket: np.ndarray
  ranking_c: np.ndarray
  ranking_o: np.ndarray
  ranking_s: np.ndarray


def score_heads(o, h_gen, h_safe, m: int = 4) -> ConflictScores:
  """All of section 3.3-3.5 from O [L, H], H_gen [L, H], H_safe [L, H]: ranks, S, C, the C-, O-
  and S-only rankings (Appendix F.1) and each head's bucket among M."""
  s, rank_gen, rank_safe = sensitivity_score(h_gen, h_safe)
  c = conflict_score(o, s)
  return ConflictScores(o=np.asarray(o, np.float64), h_gen=np.asarray(h_gen, np.float64),
                        h_safe=np.asarray(h_safe, np.float64), rank_gen=rank_gen,
                        rank_safe=rank_safe, s=s, c=c, bucket=bucket_of(c, m),
                        ranking_c=ranking(c), ranking_o=ranking(o), ranking_s=ranking(s))


def spearman(a, b) -> float:
  """Spearman rank correlation of two same-shaped tables (e.g. two H_safe [L, H]).

  Pearson r of their `percentile_ranks` (the average-rank tie rule above; the affine map to
  [0, 1] does not change r). Returns NaN when either table is constant (r is undefined).
  """
  ra, rb = percentile_ranks(a).reshape(-1), percentile_ranks(b).reshape(-1)
  if ra.shape != rb.shape:
    raise ValueError(f"spearman: shapes {np.shape(a)} and {np.shape(b)} differ")
  da, db = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((da * da).sum() * (db * db).sum())
  if denom == 0.0:
    return float("nan")
  return float(np.clip((da * db).sum() / denom, -1.0, 1.0))
