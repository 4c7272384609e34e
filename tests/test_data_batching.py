"""Padding, bucketing, truncation and exact-resume ordering of cast_jax.data.batching."""

from unittest import mock

import numpy as np
import pytest

from cast_jax.data import batching


def _example(n, n_prompt, start=1):
  ids = np.arange(start, start + n, dtype=np.int32)
  mask = np.array([0] * n_prompt + [1] * (n - n_prompt), np.int32)
  return ids, mask


def _dataset(n=10):
  return [_example(3 + (i % 4), 2, start=100 * i + 1) for i in range(n)]


def test_bucket_length():
  assert [batching.bucket_length(n, multiple=8) for n in (0, 1, 8, 9)] == [8, 8, 8, 16]
  assert batching.bucket_length(33, buckets=(16, 64, 32)) == 64
  with pytest.raises(ValueError, match="largest bucket"):
    batching.bucket_length(65, buckets=(16, 64))


def test_collate_train_right_pads():
  rows = [_example(5, 2), _example(3, 1, start=50)]
  b = batching.collate_train(rows, pad_id=0, multiple=4)
  assert set(b) == {"input_ids", "attention_mask", "loss_mask"}
  assert all(v.dtype == np.int32 and v.shape == (2, 8) for v in b.values())
  assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [50, 51, 52, 0, 0, 0, 0, 0]]
  assert b["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
  assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]


def test_collate_prompts_left_pads():
  b = batching.collate_prompts([[7, 8, 9], [5]], pad_id=0, multiple=4)
  assert b["input_ids"].tolist() == [[0, 7, 8, 9], [0, 0, 0, 5]]
  assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
  assert b["input_ids"].dtype == np.int32 and set(b) == {"input_ids", "attention_mask"}


def test_prompt_batches_keep_order_and_all_rows():
  prompts = [[i] * (1 + i % 3) for i in range(5)]
  out = list(batching.prompt_batches(prompts, batch_size=2, pad_id=-1, multiple=1))
  assert [b["input_ids"].shape[0] for b in out] == [2, 2, 1]
  assert [int(b["input_ids"][r, -1]) for b in out for r in range(len(b["input_ids"]))] == list(
      range(5))


def test_truncation_is_counted_and_empty_targets_dropped():
  rows = [_example(10, 2), _example(4, 2), _example(10, 8)]
  with mock.patch.object(batching.logging, "warning") as warn:
    out = batching.truncate_examples(rows, 6, name="toy")
  assert [len(ids) for ids, _ in out] == [6, 4]  # third row kept no response token
  args = warn.call_args[0]
  assert args[1:] == ("toy", 2, 3, 6, 1)


def test_no_warning_when_nothing_truncated():
  with mock.patch.object(batching.logging, "warning") as warn:
    batching.truncate_examples([_example(4, 2)], 6)
  assert not warn.called


def test_empty_dataset_error_names_dataset():
  with pytest.raises(ValueError, match="'my_set' is empty"):
    list(batching.iterate_train_batches([], batch_size=2, seed=0, pad_id=0, name="my_set"))
  with pytest.raises(ValueError, match="'my_set' is empty"):
    batching.encode_dataset(None, [], max_len=8, name="my_set")


def test_epoch_order_is_a_seeded_permutation():
  a = batching.epoch_order(50, seed=3, epoch=1)
  assert sorted(a.tolist()) == list(range(50))
  assert np.array_equal(a, batching.epoch_order(50, seed=3, epoch=1))
  assert not np.array_equal(a, batching.epoch_order(50, seed=3, epoch=2))
  assert not np.array_equal(a, batching.epoch_order(50, seed=4, epoch=1))
  assert batching.epoch_order(5, seed=3, epoch=1, shuffle=False).tolist() == list(range(5))


def _run(data, **kw):
  return [(e, s, b) for e, s, b in batching.iterate_train_batches(
      data, batch_size=3, seed=7, pad_id=0, multiple=4, **kw)]


def test_resume_reproduces_the_batch_sequence_exactly():
  data = _dataset(10)  # 3 steps per epoch, last example of each epoch dropped
  full = _run(data, num_epochs=3)
  assert [(e, s) for e, s, _ in full] == [(e, s) for e in range(3) for s in range(3)]
  for k in range(len(full)):
    e, s, _ = full[k]
    resumed = _run(data, num_epochs=3, start_epoch=e, start_step=s)
    assert len(resumed) == len(full) - k
    for (e1, s1, b1), (e2, s2, b2) in zip(full[k:], resumed):
      assert (e1, s1) == (e2, s2)
      assert all(np.array_equal(b1[key], b2[key]) for key in b1)
    direct = batching.train_batch_at(data, epoch=e, step=s, batch_size=3, seed=7, pad_id=0,
                                     multiple=4)
    assert all(np.array_equal(direct[key], full[k][2][key]) for key in direct)
  # A step past the end of an epoch rolls over to the next epoch.
  assert [(e, s) for e, s, _ in _run(data, num_epochs=3, start_epoch=0, start_step=4)][:2] == [
      (1, 1), (1, 2)]


def test_epoch_batches_have_distinct_examples_and_seed_matters():
  data = _dataset(12)
  first_tokens = [int(b["input_ids"][r, 0]) for _, _, b in _run(data, num_epochs=1)
                  for r in range(3)]
  assert len(set(first_tokens)) == 12
  other = [(e, s, b) for e, s, b in batching.iterate_train_batches(
      data, batch_size=3, seed=8, pad_id=0, num_epochs=1, multiple=4)]
  assert any(not np.array_equal(b1["input_ids"], b2["input_ids"])
             for (_, _, b1), (_, _, b2) in zip(_run(data, num_epochs=1), other))


def test_too_few_examples_for_a_batch():
  with pytest.raises(ValueError, match="no full batch"):
    _run(_dataset(2), num_epochs=1)
  assert len(_run(_dataset(2), num_epochs=1, drop_last=False)) == 1
