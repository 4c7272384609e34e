"""The training loop: data position = step, JSONL metrics, NaN stop, orbax checkpoints, resume.

Data contract: the loop takes `batches_fn(start_step) -> iterator of batches` whose k-th item is
the batch for step `start_step + k`, a pure function of (seed, epoch, step). Resuming from a
checkpoint at step s calls `batches_fn(s)`, so the consumed batches are skipped exactly and a
resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
import tqdm
from absl import logging

from cast_jax import workdir as wd
from cast_jax.train import fingerprint as fp
from cast_jax.train.checkpoint import Checkpointer
from cast_jax.train.state import TrainState

PyTree = Any
BatchesFn = Callable[[int], Iterable[Any]]


class NonFiniteLossError(FloatingPointError):
  """Training hit a NaN / inf loss or gradient. `.state` holds the last good TrainState."""

  def __init__(self, message: str, state: TrainState | None = None):
    super().__init__(message)
    self.state = state


def indexed_batches(batch_at: Callable[[int], Any]) -> BatchesFn:
  """`batches_fn` from a pure `batch_at(step) -> batch` (infinite)."""
  return lambda start_step: (batch_at(s) for s in itertools.count(start_step))


def epoch_batches(epoch_fn: Callable[[int], Iterable[Any]], steps_per_epoch: int) -> BatchesFn:
  """`batches_fn` over epochs: `epoch_fn(epoch)` yields that epoch's batches in a fixed order
  (e.g. shuffled with a key derived from (seed, epoch)); step s is batch s % steps_per_epoch of
  epoch s // steps_per_epoch. Infinite; an epoch shorter than steps_per_epoch is an error."""
  if steps_per_epoch < 1:
    raise ValueError(f"epoch_batches: steps_per_epoch={steps_per_epoch}; the dataset gives no "
                     "full batch. Use more examples or a smaller batch size.")

  def batches_fn(start_step: int) -> Iterator[Any]:
    epoch, offset = divmod(int(start_step), steps_per_epoch)
    while True:
      n = offset
      for batch in itertools.islice(epoch_fn(epoch), offset, steps_per_epoch):
        n += 1
        yield batch
      if n < steps_per_epoch:
        raise ValueError(f"epoch_fn({epoch}) gave {n} batches, fewer than steps_per_epoch="
                         f"{steps_per_epoch}; the step -> batch map would drift.")
      epoch, offset = epoch + 1, 0

  return batches_fn


def _to_host(metrics: dict) -> dict:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = v.item() if v.ndim == 0 else v.tolist()
  return out


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Drops lines logged after `last_step` (a killed run logs past its last checkpoint)."""
  if not os.path.exists(path):
    return
  lines = []
  with open(path) as f:
    for ln in f:
      try:
        if json.loads(ln).get("step", 0) <= last_step:
          lines.append(ln)
      except json.JSONDecodeError:  # a line cut short by the kill
        continue
  wd.atomic_write_bytes(path, "".join(lines).encode())


def _batch_tokens(batch: Any) -> int:
  if isinstance(batch, dict) and "attention_mask" in batch:
    return int(np.asarray(batch["attention_mask"]).sum())
  if isinstance(batch, dict) and "input_ids" in batch:
    return int(np.asarray(batch["input_ids"]).size)
  return 0


def train(train_step: Callable, state: TrainState, frozen: PyTree, batches_fn: BatchesFn, *,
          num_steps: int, workdir: str | os.PathLike | None = None, log_every: int = 10,
          checkpoint_every: int | None = None, max_to_keep: int | None = 3,
          async_checkpoint: bool = False, resume: bool = True, progress: bool = True,
          lr_fn: Callable[[int], float] | None = None,
          check_batch: Callable[[Any, int], None] | None = None,
          stop_fn: Callable[[int, dict], str | None] | None = None,
          fingerprint: dict | None = None, extend: bool = False, overwrite: bool = False
          ) -> tuple[TrainState, dict]:
  """Runs `train_step` from `state.step` (or the latest checkpoint) up to `num_steps`.

  Args:
    train_step: from `make_train_step`; `(state, frozen, batch) -> (state, metrics)`. It may
      donate `state`: do not reuse the `state` you pass in.
    state: the step-0 (or current) TrainState; also the template checkpoints restore into.
    frozen: pytree passed through to every step, never modified.
    batches_fn: `batches_fn(start_step)` -> iterator of batches for steps start_step, ...
    num_steps: total train-step calls (micro-steps when accumulating).
    workdir: where `metrics.jsonl`, `checkpoints/` and `fingerprint.json` go: a dedicated dir
      (an empty string, a file or the current directory is refused); None: no files at all.
    log_every: write a metrics line every this many steps (and at the last step).
    checkpoint_every: save every this many steps; a final checkpoint is always written when
      `workdir` is set. None: only the final one.
    max_to_keep, async_checkpoint: passed to `Checkpointer`.
    resume: continue from the latest checkpoint in workdir. False with existing checkpoints is
      an error (it would interleave two runs).
    progress: show a tqdm bar.
    lr_fn: `lr_fn(step) -> float` for the "lr" metric (from `build_optimizer`).
    check_batch: host-side `check_batch(batch, step)` raising on bad input (e.g.
      `losses.check_sft_batch`).
    stop_fn: at log steps, `stop_fn(step, metrics) -> reason or None`; a reason ends training
      early (with a final checkpoint), e.g. LCDD's sparsity-stall criterion.
    fingerprint: `{field: value}` of what else determines the result (data, seed, optimizer
      and model config, ...; see `fingerprint.make_fingerprint`). With the initial state, the
      frozen params and num_steps it is recorded in `workdir/fingerprint.json`; a workdir whose
      record differs is refused, naming the fields (a workdir resumes only its own run).
    extend: allow num_steps larger than the recorded run's (continue a finished run).
    overwrite: discard the workdir's previous run (checkpoints/, metrics.jsonl, fingerprint)
      and start over; nothing else in the workdir is touched.

  Returns:
    (final state, summary dict: start_step, final_step, steps_run, loss (last logged), tokens
    (attention_mask tokens seen since step 0, carried across resumes), time_s, steps_per_s,
    stop_reason, last_checkpoint).

  Raises:
    NonFiniteLossError: a step's loss or gradient norm was NaN / inf. Nothing is saved for that
      step; the last checkpoint stays the newest one; `.state` is the last good state.
    ValueError: bad arguments or data (empty batches_fn, bad batch via check_batch); an empty
      or file workdir (`workdir.WorkdirError`).
    fingerprint.FingerprintMismatchError: the workdir holds a different run, or a shorter one
      than asked for without extend=True.
  """
  for name, value in (("num_steps", num_steps), ("log_every", log_every)):
    if int(value) != value or value < 1:
      raise ValueError(f"train: {name}={value!r}; use an integer >= 1.")
  if checkpoint_every is not None and (int(checkpoint_every) != checkpoint_every or
                                       checkpoint_every < 1):
    raise ValueError(f"train: checkpoint_every={checkpoint_every!r}; use an integer >= 1 or None.")

  ckpt, metrics_path, last_ckpt, tokens = None, None, None, 0
  if workdir is not None:
    workdir = wd.prepare_workdir(workdir, what="train: workdir")
    if overwrite:
      fp.discard_run(workdir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=max_to_keep,
                        async_save=async_checkpoint)
  try:
    latest = None if ckpt is None else ckpt.latest_step()
    if latest is not None and not resume:
      raise ValueError(f"train: {ckpt.directory} already has checkpoints {ckpt.all_steps()} "
                       "and resume=False; pass resume=True to continue it, overwrite=True to "
                       "start over, or use a fresh workdir.")
    if ckpt is not None:
      # Before anything is restored or trained: a workdir resumes only the run that made it.
      fp.claim_workdir(workdir, fp.run_fingerprint(state, frozen, num_steps, fingerprint),
                       resumed_step=latest, extend=extend)
    if latest is not None:
      state, meta = ckpt.restore(state)
      last_ckpt, tokens = meta["step"], int(meta.get("tokens", 0))
      logging.info("resumed from %s at step %d", ckpt.directory, last_ckpt)
    start = int(jax.device_get(state.step))
    if metrics_path is not None:
      _truncate_jsonl(metrics_path, start)
    summary = {"start_step": start, "final_step": start, "steps_run": 0, "loss": None,
               "tokens": tokens, "time_s": 0.0, "steps_per_s": 0.0, "stop_reason": None,
               "last_checkpoint": last_ckpt}
    if start >= num_steps:
      logging.info("train: state is at step %d >= num_steps=%d; nothing to do.", start, num_steps)
      summary["stop_reason"] = "already_done"
      return state, summary

    state, summary = _run(train_step, state, frozen, batches_fn, start, num_steps, ckpt,
                          metrics_path, log_every, checkpoint_every, progress, lr_fn,
                          check_batch, stop_fn, summary)
  finally:
    if ckpt is not None:
      ckpt.close()
  return state, summary


def _prepare(batches: Iterator[Any], check_batch, step: int) -> tuple[Any, int, Exception | None]:
  """(batch for `step`, its token count, None), or (None, 0, the error fetching / checking it)
  to be raised when the loop reaches that step (StopIteration: the data ran out)."""
  try:
    batch = next(batches)
    if check_batch is not None:
      check_batch(batch, step)
    return batch, _batch_tokens(batch), None
  except Exception as e:  # noqa: BLE001 -- re-raised in order by the loop
    return None, 0, e


def _run(train_step, state, frozen, batches_fn, start, num_steps, ckpt, metrics_path, log_every,
         checkpoint_every, progress, lr_fn, check_batch, stop_fn, summary):
  batches = iter(batches_fn(start))
  t0 = t_window = time.perf_counter()
  tokens, window_start, step, host = summary["tokens"], start, start, {}
  metrics_file = open(metrics_path, "a") if metrics_path is not None else None
  bar = tqdm.tqdm(total=num_steps, initial=start, disable=not progress, desc="train",
                  dynamic_ncols=True)
  try:
    pending = _prepare(batches, check_batch, step)
    while step < num_steps:
      batch, n_tokens, error = pending
      if isinstance(error, StopIteration):
        if step == start:
          raise ValueError(f"batches_fn({start}) yielded no batch; the dataset is empty or "
                           "exhausted. Check the data source and batch size.") from None
        logging.warning("batches_fn ran out at step %d < num_steps=%d; stopping.", step,
                        num_steps)
        summary["stop_reason"] = "data_exhausted"
        break
      if error is not None:
        raise error
      tokens += n_tokens
      state, metrics = train_step(state, frozen, batch)
      step += 1
      bar.update(1)
      # The next batch is built and checked while the device runs this step (dispatch is
      # async); its errors surface only after this step is checked, logged and saved.
      if step < num_steps:
        pending = _prepare(batches, check_batch, step)
      # One scalar sync per step: a bad step must be caught before anything after it is saved
      # and before the next step consumes (donates) the last good state.
      finite = bool(jax.device_get(metrics["finite"]))
      is_log = not finite or step % log_every == 0 or step == num_steps
      if is_log:
        now = time.perf_counter()
        host = {"step": step, **_to_host(metrics), "tokens": tokens, "time": now - t0,
                "step_time": (now - t_window) / max(step - window_start, 1)}
        if lr_fn is not None:
          host["lr"] = lr_fn(step - 1)
        t_window, window_start = now, step
        if metrics_file is not None:
          metrics_file.write(json.dumps(host, allow_nan=True) + "\n")
          metrics_file.flush()
        bar.set_postfix(loss=f"{host['loss']:.4g}")
        logging.info("step %d: %s", step, {k: v for k, v in host.items()
                                             if isinstance(v, (int, float))})
      if not finite:
        where = (f"the last good checkpoint is step {summary['last_checkpoint']} in "
                 f"{ckpt.directory}" if ckpt is not None and summary["last_checkpoint"] is not None
                 else "no checkpoint was written before it")
        raise NonFiniteLossError(
            f"non-finite training step {step} (data position {step - 1}): loss={host['loss']}, "
            f"grad_norm={host['grad_norm']}. Nothing was saved for this step; {where}. Lower "
            "the learning rate, set grad_clip_norm, use fp32 compute, or inspect that batch.",
            state)
      if ckpt is not None and checkpoint_every is not None and step % checkpoint_every == 0:
        summary["last_checkpoint"] = ckpt.save(state, {"tokens": tokens})
      reason = stop_fn(step, host) if (stop_fn is not None and is_log) else None
      if reason:
        logging.info("stop_fn stopped training at step %d: %s", step, reason)
        summary["stop_reason"] = reason
        break
    if ckpt is not None and summary["last_checkpoint"] != step:
      summary["last_checkpoint"] = ckpt.save(state, {"tokens": tokens})
  finally:
    bar.close()
    if metrics_file is not None:
      metrics_file.close()
  elapsed = time.perf_counter() - t0
  loss = host.get("loss")
  summary.update(final_step=step, steps_run=step - start, tokens=tokens, time_s=elapsed,
                 steps_per_s=(step - start) / max(elapsed, 1e-9),
                 loss=None if loss is None or not math.isfinite(loss) else loss)
  summary["stop_reason"] = summary["stop_reason"] or "num_steps"
  return state, summary
