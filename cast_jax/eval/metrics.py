"""Alignment-efficiency ratios (CAST Eq. 7-8), correlations and seed aggregation, in numpy.

Units: UCR / MMLU-CR are ratios of differences, so utility and safety must be given in the SAME
units (both percent, as in the paper's tables, or both fractions); the ratio is then unit-free.
``eps`` (default 1e-8) is added to the safety gain exactly as in Eq. 7; it only guards an exact
zero gain, so it is negligible in either unit.

Clipping follows the paper literally: ``max(0, .)``. Note what it implies: a model whose utility
rose, and a model whose safety FELL while utility also fell (negative denominator), both get cost 0.
Report the raw safety gain next to the ratio when that second case can occur.

``min_gain`` (default None: the paper's formula) makes the ratio NaN, "undefined", where the
safety gain S_a - S_b is below it. With the literal formula a run that lost utility but gained
no safety costs (U_b - U_a) / eps, e.g. 3e9 for a 30-point loss, and one such run decides every
mean and correlation it enters; on a finite eval set a gain under one item is not measurable.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

DEFAULT_EPS = 1e-8


def utility_cost_ratio(utility_base, utility_aligned, safety_base, safety_aligned,
                       eps: float = DEFAULT_EPS, min_gain: float | None = None):
  """UCR = max(0, (U_b - U_a) / ((S_a - S_b) + eps)), Eq. 7. Broadcasts over numpy arrays.

  Args: average general utility and average safety of the base (b) and aligned (a) models, all
  in the same units; min_gain: NaN where S_a - S_b < min_gain (module doc). Returns a float (or
  an array of the broadcast shape).
  """
  u_b, u_a, s_b, s_a = (np.asarray(v, dtype=np.float64) for v in
                        (utility_base, utility_aligned, safety_base, safety_aligned))
  gain = s_a - s_b
  ratio = np.maximum(0.0, (u_b - u_a) / (gain + eps))
  if min_gain is not None:
    ratio = np.where(gain < min_gain, np.nan, ratio)
  return float(ratio) if ratio.ndim == 0 else ratio


def mmlu_cost_ratio(mmlu_base, mmlu_aligned, safety_base, safety_aligned,
                    eps: float = DEFAULT_EPS, min_gain: float | None = None):
  """MMLU-CR = max(0, (M_b - M_a) / ((S_a - S_b) + eps)), Eq. 8: UCR with MMLU accuracy as the
  utility. Same units rule, `min_gain` and broadcasting as ``utility_cost_ratio``."""
  return utility_cost_ratio(mmlu_base, mmlu_aligned, safety_base, safety_aligned, eps, min_gain)


def _paired(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(
        f"{name}: x and y must be 1-D and the same length, got {x.shape} and {y.shape}")
  if x.size < 2:
    raise ValueError(f"{name}: need at least 2 points, got {x.size}")
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    raise ValueError(f"{name}: x and y must be finite (drop NaN/inf points first)")
  return x, y


def pearson(x, y) -> float:
  """Pearson r of two [N] samples; NaN when either is constant (r is undefined there)."""
  x, y = _paired(x, y, "pearson")
  dx, dy = x - x.mean(), y - y.mean()
  denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
  if denom == 0.0:
    return float("nan")
  return float(np.clip((dx * dy).sum() / denom, -1.0, 1.0))


def average_ranks(x) -> np.ndarray:
  """[N] ranks 1..N of a 1-D array, ties sharing the mean of the ranks they span."""
  x = np.asarray(x, dtype=np.float64)
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  ranks = np.empty(x.size, dtype=np.float64)
  start = 0
  while start < x.size:
    end = start
    while end + 1 < x.size and sorted_x[end + 1] == sorted_x[start]:
      end += 1
    ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
    start = end + 1
  return ranks


def spearman(x, y) -> float:
  """Spearman rho of two [N] samples: Pearson r of their average ranks (ties averaged)."""
  x, y = _paired(x, y, "spearman")
  return pearson(average_ranks(x), average_ranks(y))


@dataclasses.dataclass(frozen=True)
class SeedSummary:
  """Mean and standard deviation over seeds; ``ddof`` states which std (1 = sample std)."""
  mean: float
  std: float
  n: int
  ddof: int


def mean_std(values: Sequence[float], ddof: int = 1) -> SeedSummary:
  """Mean and std of per-seed values [S]. Default ddof=1 (sample std, the usual +-); std is NaN
  when S <= ddof."""
  v = np.asarray(values, dtype=np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"mean_std: expected a non-empty 1-D list of per-seed values, got {v.shape}")
  std = float(v.std(ddof=ddof)) if v.size > ddof else float("nan")
  return SeedSummary(mean=float(v.mean()), std=std, n=int(v.size), ddof=ddof)
