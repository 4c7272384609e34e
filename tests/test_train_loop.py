"""Loop: exact resume after a kill (with accumulation), NaN stop, metrics JSONL, data contract."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cast_jax.train import (Checkpointer, NonFiniteLossError, OptimizerConfig, epoch_batches,
                            indexed_batches, train, tree_equal)
from test_train_step import setup, toy_batch

CFG = OptimizerConfig(learning_rate=0.05, schedule="cosine", warmup_steps=2, total_steps=8,
                      grad_clip_norm=1.0, weight_decay=0.01, accum_steps=2)


class Killed(Exception):
  pass


def _ema(extra, metrics, step):
  return {"ema": jnp.where(step == 0, metrics["mse"], 0.9 * extra["ema"] + 0.1 * metrics["mse"])}


def _run(workdir, num_steps, batches_fn, **kwargs):
  state, frozen, step, lr_fn = setup(CFG, seed=7, update_extra=_ema)
  state = state.replace(extra={"ema": jnp.float32(0)})
  return train(step, state, frozen, batches_fn, num_steps=num_steps, workdir=workdir,
               progress=False, lr_fn=lr_fn, **kwargs)


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(ln) for ln in f]


def test_kill_and_resume_is_bitwise_identical(tmp_path):
  full, summary = _run(str(tmp_path / "a"), 16, indexed_batches(toy_batch), checkpoint_every=5,
                       log_every=1)
  assert summary["final_step"] == 16 and summary["stop_reason"] == "num_steps"

  def dying(start):  # dies while fetching the batch for step 8, after the checkpoint at 5
    for s in range(start, 10**9):
      if s == 8 and start == 0:
        raise Killed()
      yield toy_batch(s)

  b = str(tmp_path / "b")
  # Async saves: the step-5 arrays must be snapshotted before steps 6, 7 donate their buffers.
  with pytest.raises(Killed):
    _run(b, 16, dying, checkpoint_every=5, log_every=1, async_checkpoint=True)
  assert Checkpointer(os.path.join(b, "checkpoints")).all_steps() == [5]
  assert [ln["step"] for ln in _lines(b)] == list(range(1, 9))
  resumed, summary_b = _run(b, 16, dying, checkpoint_every=5, log_every=1)
  assert summary_b["start_step"] == 5 and summary_b["steps_run"] == 11
  # Step 5 is mid-accumulation (accum_steps=2), so this also covers the MultiSteps buffer.
  assert tree_equal(resumed, full)
  assert int(resumed.step) == 16 and float(resumed.extra["ema"]) != 0.0
  la, lb = _lines(str(tmp_path / "a")), _lines(b)
  assert [ln["step"] for ln in lb] == list(range(1, 17))  # re-run steps 6..8 not duplicated
  for key in ("loss", "tokens", "extra/ema", "grad_norm"):
    assert [ln[key] for ln in la] == [ln[key] for ln in lb], key
  assert lb[-1]["tokens"] == summary_b["tokens"] == 16 * 24
  # Resuming a finished run is a no-op.
  again, summary_c = _run(b, 16, dying)
  assert summary_c["stop_reason"] == "already_done" and tree_equal(again, full)


def test_resume_changes_result_if_data_position_ignored(tmp_path):
  # Guards the test above: restarting the data at 0 after resume must NOT match.
  full, _ = _run(str(tmp_path / "a"), 10, indexed_batches(toy_batch), checkpoint_every=4)
  b = str(tmp_path / "b")
  _run(b, 4, indexed_batches(toy_batch))
  wrong, _ = _run(b, 10, lambda start: indexed_batches(toy_batch)(0), extend=True)
  assert not tree_equal(wrong, full)


def test_nan_stops_without_checkpoint_and_last_good_restores(tmp_path):
  wd = str(tmp_path / "nan")
  batches = indexed_batches(functools.partial(toy_batch, nan_at=6))  # 7th step goes NaN
  with pytest.raises(NonFiniteLossError) as err:
    _run(wd, 20, batches, checkpoint_every=3, log_every=5)
  msg = str(err.value)
  assert "step 7" in msg and "loss=nan" in msg and "last good checkpoint is step 6" in msg
  ckpt = Checkpointer(os.path.join(wd, "checkpoints"))
  assert ckpt.all_steps() == [3, 6]
  template, _, _, _ = setup(CFG, seed=7)
  template = template.replace(extra={"ema": jnp.float32(0)})
  restored, meta = ckpt.restore(template)
  assert meta["step"] == 6 and meta["data_position"] == 6
  clean, _ = _run(None, 6, indexed_batches(toy_batch))
  assert tree_equal(restored, clean) and tree_equal(err.value.state, clean)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.trainable))
  last = _lines(wd)[-1]
  assert last["step"] == 7 and last["finite"] is False


def test_metrics_jsonl_fields_and_summary(tmp_path):
  wd = str(tmp_path / "m")
  _, summary = _run(wd, 7, indexed_batches(toy_batch), log_every=3)
  lines = _lines(wd)
  assert [ln["step"] for ln in lines] == [3, 6, 7]
  for key in ("loss", "lr", "grad_norm", "tokens", "time", "mse", "finite"):
    assert key in lines[0], key
  # Micro-step 2 belongs to update 1 of the 2 warmup updates.
  assert lines[0]["lr"] == pytest.approx(CFG.learning_rate * 0.5)
  assert summary["loss"] == lines[-1]["loss"] and summary["last_checkpoint"] == 7


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="yielded no batch"):
    _run(None, 3, lambda start: iter([]))
  with pytest.raises(ValueError, match="num_steps=0"):
    _run(None, 0, indexed_batches(toy_batch))
  wd = str(tmp_path / "x")
  _run(wd, 2, indexed_batches(toy_batch))
  with pytest.raises(ValueError, match="resume=False"):
    _run(wd, 4, indexed_batches(toy_batch), resume=False)

  def check(batch, step):
    if step == 1:
      raise ValueError(f"bad batch at step {step}")

  with pytest.raises(ValueError, match="bad batch at step 1"):
    _run(None, 4, indexed_batches(toy_batch), check_batch=check)


def test_stop_fn_ends_early_with_checkpoint(tmp_path):
  wd = str(tmp_path / "s")
  state, summary = _run(wd, 50, indexed_batches(toy_batch), log_every=2,
                        stop_fn=lambda step, m: "stalled" if step >= 6 else None)
  assert summary["stop_reason"] == "stalled" and int(state.step) == 6
  assert Checkpointer(os.path.join(wd, "checkpoints")).latest_step() == 6


def test_epoch_batches_contract():
  def epoch_fn(epoch):
    order = np.random.default_rng([123, epoch]).permutation(6)
    return ({"i": int(i), "epoch": epoch} for i in order[:4])  # 4 batches per epoch

  fn = epoch_batches(epoch_fn, 4)
  first = [b for _, b in zip(range(12), fn(0))]
  for start in (0, 3, 4, 9):
    got = [b for _, b in zip(range(12 - start), fn(start))]
    assert got == first[start:]
  assert [b["epoch"] for b in first] == [0] * 4 + [1] * 4 + [2] * 4
  with pytest.raises(ValueError, match="fewer than steps_per_epoch"):
    list(zip(range(10), epoch_batches(epoch_fn, 5)(0)))


def test_bad_batch_surfaces_after_the_previous_step_is_logged_and_saved(tmp_path):
  # The loop builds and checks batch s + 1 while step s runs; its error must still come after
  # step s's metrics line and checkpoint, as if the batch had been fetched afterwards.
  def check(batch, step):
    if step == 3:
      raise ValueError(f"bad batch at step {step}")

  wd = str(tmp_path / "order")
  with pytest.raises(ValueError, match="bad batch at step 3"):
    _run(wd, 10, indexed_batches(toy_batch), check_batch=check, log_every=1, checkpoint_every=1)
  assert [ln["step"] for ln in _lines(wd)] == [1, 2, 3]
  assert Checkpointer(os.path.join(wd, "checkpoints")).latest_step() == 3
