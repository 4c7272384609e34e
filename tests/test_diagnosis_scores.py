"""Ranks, S, C, rankings and buckets against a hand-computed example with ties."""

import math

import numpy as np
import pytest

from cast_jax.diagnosis import scores

# L = 2 layers x H = 3 heads, flat index l * 3 + h.
H_GEN = [[0.1, 0.0, 0.1], [0.3, 0.0, 0.2]]
H_SAFE = [[0.2, 0.2, 0.2], [0.0, 0.5, 0.2]]
O = [[0.5, 1.0, 0.2], [0.4, 0.9, 0.5]]


def test_percentile_ranks_average_ties_scaled_to_unit_interval():
  # H_gen sorted: 0.0, 0.0 (ordinal ranks 1, 2 -> 1.5), 0.1, 0.1 (3, 4 -> 3.5), 0.2 (5), 0.3 (6);
  # (rank - 1) / (6 - 1).
  np.testing.assert_allclose(scores.percentile_ranks(H_GEN),
                             [[0.5, 0.1, 0.5], [1.0, 0.1, 0.8]])
  # H_safe: 0.0 (1), four 0.2s (2..5 -> 3.5), 0.5 (6).
  np.testing.assert_allclose(scores.percentile_ranks(H_SAFE), [[0.5, 0.5, 0.5], [0.0, 1.0, 0.5]])
  np.testing.assert_allclose(scores.percentile_ranks([7.0, 7.0, 7.0]), [0.5, 0.5, 0.5])
  np.testing.assert_allclose(scores.percentile_ranks([3.0]), [0.5])
  with pytest.raises(ValueError):
    scores.percentile_ranks([1.0, float("nan")])


def test_sensitivity_and_conflict_scores_by_hand():
  s, rank_gen, rank_safe = scores.sensitivity_score(H_GEN, H_SAFE)
  expected_s = [[1.0, math.exp(-0.4), 1.0], [math.e, math.exp(-0.9), math.exp(0.3)]]
  np.testing.assert_allclose(s, expected_s)
  np.testing.assert_allclose(rank_gen - rank_safe, [[0.0, -0.4, 0.0], [1.0, -0.9, 0.3]],
                             atol=1e-12)
  c = scores.conflict_score(O, s)
  expected_c = [[0.5, math.exp(-0.4), 0.2],
                [0.4 * math.e, 0.9 * math.exp(-0.9), 0.5 * math.exp(0.3)]]
  np.testing.assert_allclose(c, expected_c)
  # C: 1.0873 (3) > 0.6749 (5) > 0.6703 (1) > 0.5 (0) > 0.3659 (4) > 0.2 (2).
  np.testing.assert_array_equal(scores.ranking(c), [3, 5, 1, 0, 4, 2])


def test_score_heads_bundles_rankings_and_buckets():
  got = scores.score_heads(O, H_GEN, H_SAFE, m=3)
  np.testing.assert_array_equal(got.ranking_c, [3, 5, 1, 0, 4, 2])
  np.testing.assert_array_equal(got.ranking_o, [1, 4, 0, 5, 3, 2])  # 0.5 tie: index 0 before 5
  # S: e (3) > e^.3 (5) > 1, 1 (0, 2) > e^-.4 (1) > e^-.9 (4).
  np.testing.assert_array_equal(got.ranking_s, [3, 5, 0, 2, 1, 4])
  np.testing.assert_array_equal(got.bucket, [[2, 2, 3], [1, 3, 1]])


def test_ranking_ties_break_by_flat_index():
  np.testing.assert_array_equal(scores.ranking([[1.0, 2.0], [2.0, 0.0]]), [1, 2, 0, 3])


@pytest.mark.parametrize("n,m", [(12, 4), (32, 4), (10, 5), (7, 7)])
def test_buckets_partition_all_heads_with_equal_sizes(n, m):
  c = np.random.RandomState(n).rand(n)
  got = scores.buckets(c, m)
  assert [len(b) for b in got] == [n // m] * m
  np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(n))
  for hi, lo in zip(got, got[1:]):  # every head of B_i scores at least every head of B_{i+1}
    assert c[hi].min() >= c[lo].max()
  assert c[got[0]].max() == c.max()


def test_buckets_when_m_does_not_divide_n():
  # N = 6, M = 4: bounds floor(i * 6 / 4) = 0, 1, 3, 4, 6 -> sizes 1, 2, 1, 2.
  np.testing.assert_array_equal(scores.bucket_bounds(6, 4), [0, 1, 3, 4, 6])
  c = scores.conflict_score(O, scores.sensitivity_score(H_GEN, H_SAFE)[0])
  got = scores.buckets(c, 4)
  assert [b.tolist() for b in got] == [[3], [5, 1], [0], [4, 2]]
  np.testing.assert_array_equal(scores.bucket_of(c, 4), [[3, 2, 4], [1, 4, 2]])
  with pytest.raises(ValueError):
    scores.buckets(c, 7)
