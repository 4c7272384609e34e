"""SFT loss against independent torch and per-token numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cast_jax.train import check_sft_batch, sft_loss, sft_token_nll


def _case(seed=0, B=3, T=7, V=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
  mask = np.zeros((B, T), np.int32)
  mask[0, 3:6] = 1      # response in the middle, right padding after
  mask[1, 1:] = 1       # everything after the first token
  mask[2, 0] = 1        # only position 0: never a target (nothing predicts it)
  mask[2, 5] = 1
  return logits, ids, mask


def test_sft_loss_matches_torch_cross_entropy():
  logits, ids, mask = _case()
  loss, metrics = sft_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
  lt = torch.from_numpy(logits)[:, :-1].reshape(-1, logits.shape[-1])
  tt = torch.from_numpy(ids)[:, 1:].reshape(-1).long()
  wt = torch.from_numpy(mask)[:, 1:].reshape(-1).float()
  per = torch.nn.functional.cross_entropy(lt, tt, reduction="none")
  ref = (per * wt).sum() / wt.sum()
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6, atol=1e-6)
  assert float(metrics["target_tokens"]) == wt.sum().item() == 3 + 6 + 1


def test_sft_loss_matches_per_token_loop():
  logits, ids, mask = _case(seed=1)
  total, n, correct = 0.0, 0, 0
  for b in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):   # token t is predicted from position t - 1
      if mask[b, t]:
        row = logits[b, t - 1].astype(np.float64)
        logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        total -= logp[ids[b, t]]
        n += 1
        correct += int(np.argmax(row) == ids[b, t])
  loss, metrics = sft_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), total / n, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["accuracy"]), correct / n, rtol=1e-6)


def test_token_nll_shift_and_mask_position_zero_ignored():
  logits, ids, mask = _case(seed=2)
  nll = np.asarray(sft_token_nll(jnp.asarray(logits), jnp.asarray(ids)))
  assert nll.shape == (3, 6)
  # (Single logits are bumped: a whole-row shift would leave log_softmax unchanged.)
  # Changing the last position's logits (predicts nothing) or a masked-out target's logits must
  # not change the loss; changing a target's predicting row must.
  base = float(sft_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))[0])
  l2 = logits.copy()
  l2[:, -1, 0] += 100.0
  l2[2, 0, 1] += 50.0     # predicts token 1 of row 2, which is not a response token
  assert float(sft_loss(jnp.asarray(l2), jnp.asarray(ids), jnp.asarray(mask))[0]) == base
  l3 = logits.copy()
  l3[2, 4, 1] += 5.0      # predicts token 5 of row 2, a response token
  assert float(sft_loss(jnp.asarray(l3), jnp.asarray(ids), jnp.asarray(mask))[0]) != base


def test_check_sft_batch_errors():
  ids = np.ones((2, 5), np.int32)
  good = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
  check_sft_batch(good, 0)
  with pytest.raises(ValueError, match="lacks"):
    check_sft_batch({"input_ids": ids}, 3)
  empty = dict(good, loss_mask=np.eye(2, 5, dtype=np.int32) * 0 + np.array([[1, 0, 0, 0, 0]] * 2))
  with pytest.raises(ValueError, match="step 4 has no response token"):
    check_sft_batch(empty, 4)
  with pytest.raises(ValueError, match="same"):
    check_sft_batch(dict(good, loss_mask=ids[:, :4]), 0)


def test_per_sequence_loss_is_mean_of_row_means():
  logits, ids, mask = _case(seed=2)
  mask[2, :] = 0  # a row without targets is left out of the mean
  loss, _ = sft_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), per_sequence=True)
  lt = torch.from_numpy(logits)[:, :-1]
  per = torch.nn.functional.cross_entropy(lt.reshape(-1, lt.shape[-1]),
                                          torch.from_numpy(ids)[:, 1:].reshape(-1).long(),
                                          reduction="none").reshape(ids.shape[0], -1).numpy()
  rows = [per[b][mask[b, 1:] == 1].mean() for b in range(2)]
  np.testing.assert_allclose(float(loss), np.mean(rows), rtol=1e-6)
