"""UCR / MMLU-CR against Table 7 of the CAST paper; correlations against scipy."""

import numpy as np
import pytest
from scipy import stats

from cast_jax.eval import metrics

# Llama base (Table 1): Gen 66.10, Safe 67.22, MMLU 59.38.
LLAMA_BASE = dict(gen=66.10, safe=67.22, mmlu=59.38)
# Table 7, Llama / Unified Conflict rows: (MMLU, Gen, Safe, UCR, MMLU-CR).
LLAMA_UNIFIED = [
    (48.52, 56.02, 91.79, 0.41, 0.44),
    (52.40, 57.27, 91.29, 0.37, 0.29),
    (52.52, 58.71, 94.79, 0.27, 0.25),
    (55.73, 61.34, 92.62, 0.19, 0.14),
]


@pytest.mark.parametrize("mmlu,gen,safe,ucr,mmlu_cr", LLAMA_UNIFIED)
def test_ucr_matches_table7(mmlu, gen, safe, ucr, mmlu_cr):
  b = LLAMA_BASE
  assert metrics.utility_cost_ratio(b["gen"], gen, b["safe"], safe) == pytest.approx(ucr, abs=0.005)
  assert metrics.mmlu_cost_ratio(b["mmlu"], mmlu, b["safe"], safe) == pytest.approx(mmlu_cr,
                                                                                   abs=0.005)


def test_ucr_clipping_units_and_broadcast():
  # Mistral Safe Zone (Table 7): MMLU rose above base 46.98 -> MMLU-CR clipped to 0.00.
  assert metrics.mmlu_cost_ratio(46.98, 47.62, 50.11, 65.14) == 0.0
  # Percent and fraction inputs give the same ratio.
  pct = metrics.utility_cost_ratio(66.10, 56.02, 67.22, 91.79)
  frac = metrics.utility_cost_ratio(0.6610, 0.5602, 0.6722, 0.9179)
  assert pct == pytest.approx(frac, rel=1e-6)
  got = metrics.utility_cost_ratio(66.10, np.array([56.02, 61.34]), 67.22, np.array([91.79, 92.62]))
  np.testing.assert_allclose(got, [0.4103, 0.1878], atol=1e-3)
  # Zero safety gain: eps keeps it finite.
  assert np.isfinite(metrics.utility_cost_ratio(2.0, 1.0, 5.0, 5.0))


def test_table8_llama_correlation_from_table7():
  conflict = [1.27, 0.88, 0.67, 0.47]
  ucr = [row[3] for row in LLAMA_UNIFIED]
  mmlu_cr = [row[4] for row in LLAMA_UNIFIED]
  # Table 8, Llama / C: U-CR Pearson 0.95, Spearman 1.00; MMLU-CR Pearson 0.99, Spearman 1.00.
  assert metrics.pearson(conflict, ucr) == pytest.approx(0.95, abs=0.01)
  assert metrics.spearman(conflict, ucr) == pytest.approx(1.0)
  assert metrics.pearson(conflict, mmlu_cr) == pytest.approx(0.99, abs=0.01)
  assert metrics.spearman(conflict, mmlu_cr) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=12)
  y = 0.5 * x + rng.normal(size=12)
  # Ties on both sides exercise average ranks.
  xt, yt = np.round(x), np.round(y)
  for a, b in ((x, y), (xt, yt), (xt, y)):
    assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
  np.testing.assert_allclose(metrics.average_ranks(xt), stats.rankdata(xt, method="average"))


def test_correlation_edge_cases():
  assert np.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))
  with pytest.raises(ValueError, match="same length"):
    metrics.pearson([1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="at least 2"):
    metrics.spearman([1], [1])
  with pytest.raises(ValueError, match="finite"):
    metrics.pearson([1, np.nan], [1, 2])


def test_mean_std_over_seeds():
  s = metrics.mean_std([61.0, 62.0, 60.0])
  assert (s.mean, s.std, s.n, s.ddof) == (61.0, 1.0, 3, 1)
  assert metrics.mean_std([61.0, 62.0, 60.0], ddof=0).std == pytest.approx(np.std([61, 62, 60]))
  assert np.isnan(metrics.mean_std([5.0]).std)
  with pytest.raises(ValueError, match="per-seed"):
    metrics.mean_std([])


def test_cost_ratio_is_undefined_below_min_gain():
  from cast_jax.eval.metrics import mmlu_cost_ratio, utility_cost_ratio
  # 30 points of utility lost, no safety gained: the literal Eq. 7 prices it at 30 / 1e-8.
  assert utility_cost_ratio(90.0, 60.0, 16.0, 16.0) == pytest.approx(3e9)
  assert np.isnan(utility_cost_ratio(90.0, 60.0, 16.0, 16.0, min_gain=1.0))
  assert np.isnan(utility_cost_ratio(90.0, 60.0, 16.0, 10.0, min_gain=1.0))  # safety fell
  assert utility_cost_ratio(90.0, 60.0, 16.0, 46.0, min_gain=1.0) == pytest.approx(1.0)
  got = mmlu_cost_ratio(np.array([90.0, 90.0]), np.array([80.0, 80.0]), 10.0,
                        np.array([10.5, 30.0]), min_gain=1.0)
  assert np.isnan(got[0]) and got[1] == pytest.approx(0.5)
