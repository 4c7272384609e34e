"""Head sets vs plain-Python references: buckets, top / bottom k (ties, rounding), random, all."""

import numpy as np
import pytest

from cast_jax.tuning import (all_heads_mask, bottom_count_mask, bottom_fraction_mask, bucket_mask,
                             fraction_count, heads_to_mask, mask_to_heads, random_mask,
                             top_count_mask, top_fraction_mask)


def _order(c):
  """Flat heads by C descending, ties by flat index ascending (the documented rule)."""
  flat = list(np.asarray(c, float).reshape(-1))
  return sorted(range(len(flat)), key=lambda i: (-flat[i], i))


def _ref_mask(heads, shape):
  m = np.zeros(shape, np.float32)
  for i in heads:
    m[i // shape[1], i % shape[1]] = 1
  return m


@pytest.mark.parametrize("shape,m", [((4, 8), 4), ((3, 5), 4), ((2, 3), 6)])
def test_buckets_partition_by_descending_c(shape, m):
  c = np.random.RandomState(0).rand(*shape).round(1)  # rounding makes ties
  order, n = _order(c), c.size
  total = np.zeros(shape)
  for b in range(1, m + 1):
    lo, hi = (b - 1) * n // m, b * n // m
    got = bucket_mask(c, m, b)
    np.testing.assert_array_equal(got, _ref_mask(order[lo:hi], shape))
    assert got.dtype == np.float32 and set(np.unique(got)) <= {0.0, 1.0}
    total += got
  np.testing.assert_array_equal(total, np.ones(shape))  # a partition of all heads
  hi_c = c.reshape(-1)[mask_to_heads(bucket_mask(c, m, 1))].min()
  lo_c = c.reshape(-1)[mask_to_heads(bucket_mask(c, m, m))].max()
  assert hi_c >= lo_c  # B1 = highest C (Risky), BM = lowest (Safe)


def test_top_bottom_ties_and_agreement_with_buckets():
  c = np.array([[0.5, 0.9, 0.5, 0.1], [0.5, 0.2, 0.9, 0.5]])
  # Descending with ties by flat index: 1, 6 (0.9), 0, 2, 4, 7 (0.5), 5 (0.2), 3 (0.1).
  np.testing.assert_array_equal(top_count_mask(c, 3), _ref_mask([1, 6, 0], c.shape))
  np.testing.assert_array_equal(bottom_count_mask(c, 3), _ref_mask([7, 5, 3], c.shape))
  np.testing.assert_array_equal(top_fraction_mask(c, 0.25), bucket_mask(c, 4, 1))
  np.testing.assert_array_equal(bottom_fraction_mask(c, 0.25), bucket_mask(c, 4, 4))
  for k in range(1, 9):  # top k and bottom (N - k) split the heads
    np.testing.assert_array_equal(top_count_mask(c, k) + (bottom_count_mask(c, 8 - k) if k < 8
                                                          else 0), np.ones(c.shape))
  np.testing.assert_array_equal(top_fraction_mask(c, 1.0), all_heads_mask(c.shape))


def test_fraction_rounding():
  assert [fraction_count(f, 10) for f in (0.25, 0.5, 0.75, 1.0)] == [3, 5, 8, 10]  # 2.5 -> 3
  assert fraction_count(0.05, 10) == 1 and fraction_count(0.01, 10) == 1  # at least one head
  assert [fraction_count(f, 1024) for f in (0.25, 0.5, 0.75)] == [256, 512, 768]
  for bad in (0, -0.1, 1.5):
    with pytest.raises(ValueError, match="fraction"):
      fraction_count(bad, 10)


def test_random_mask_count_seed_and_uniformity():
  shape, k = (4, 8), 8
  m = random_mask(shape, k, seed=21)
  assert m.shape == shape and m.sum() == k and set(np.unique(m)) == {0.0, 1.0}
  np.testing.assert_array_equal(m, random_mask(shape, k, seed=21))
  assert not np.array_equal(m, random_mask(shape, k, seed=42))
  # Budget match: the same count as bucket 1 of a conflict map.
  c = np.random.RandomState(1).rand(*shape)
  assert random_mask(shape, int(bucket_mask(c, 4, 1).sum()), seed=0).sum() == 8
  # Uniform: over 2000 seeds every head is picked ~ k / N = 1/4 of the time.
  freq = np.mean([random_mask(shape, k, seed=s) for s in range(2000)], axis=0)
  assert np.abs(freq - 0.25).max() < 0.05, freq


def test_bad_inputs_name_the_fix():
  c = np.ones((2, 4))
  with pytest.raises(ValueError, match="1..M=4"):
    bucket_mask(c, 4, 5)
  with pytest.raises(ValueError, match=r"\[1, 8\]"):
    top_count_mask(c, 9)
  with pytest.raises(ValueError, match=r"\[L, H\]"):
    bucket_mask(np.ones(8), 4, 1)
  with pytest.raises(ValueError, match="finite"):
    top_count_mask(np.full((2, 4), np.nan), 1)
  with pytest.raises(ValueError, match=r"\[0, 8\)"):
    heads_to_mask([8], (2, 4))
