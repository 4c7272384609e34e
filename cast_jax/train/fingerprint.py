"""Run fingerprints: what determines a training run's result, recorded in its workdir so that a
workdir resumes only the run that made it.

A fingerprint is a flat dict `{field: value}`. Small scalars (seed, num_steps, a batch size) are
kept as they are, so a mismatch message can show both values; anything else (params, datasets,
config dataclasses) becomes a short content digest. Callers build their fields with
`make_fingerprint(data=examples, seed=seed, optimizer=opt_config, ...)`; `train` adds the
initial state, the frozen params and num_steps, and compares against `fingerprint.json`.
Later stages (diagnosis, LCDD, triggers) reuse the same functions for their own workdirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from cast_jax import io_atomic
from cast_jax import workdir as wd

FILENAME = "fingerprint.json"
_SCALARS = (type(None), bool, int, float, str)


class FingerprintMismatchError(ValueError):
  """A workdir holds a different run than the one asked for; the message names the fields."""


def _feed_array(h, x: Any) -> None:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Multi-host: hash what this host holds, with where it sits in the global array.
    h.update(f"A{x.dtype}{x.shape}".encode())
    for shard in sorted(x.addressable_shards, key=lambda s: str(s.index)):
      h.update(str(shard.index).encode())
      _feed_array(h, shard.data)
    return
  a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  h.update(f"A{a.dtype}{a.shape}".encode())
  h.update(a.reshape(-1).view(np.uint8).data)


def _feed(h, x: Any) -> None:
  """Streams a type-tagged, order-stable encoding of `x` into the hash `h`."""
  if x is None or isinstance(x, (bool, np.bool_)):
    h.update(f"N{x}".encode() if x is None else f"B{bool(x)}".encode())
  elif isinstance(x, (int, np.integer)):
    h.update(f"I{int(x)};".encode())
  elif isinstance(x, (float, np.floating)):
    h.update(f"F{float(x)!r};".encode())
  elif isinstance(x, str):
    b = x.encode()
    h.update(f"S{len(b)}:".encode() + b)
  elif isinstance(x, bytes):
    h.update(f"Y{len(x)}:".encode() + x)
  elif hasattr(x, "shape") and hasattr(x, "dtype"):
    _feed_array(h, x)
  elif dataclasses.is_dataclass(x) and not isinstance(x, type):
    h.update(f"D{type(x).__name__}".encode())
    _feed(h, {f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
  elif isinstance(x, Mapping):
    h.update(f"M{len(x)}:".encode())
    for k in sorted(x, key=str):
      _feed(h, str(k))
      _feed(h, x[k])
  elif hasattr(x, "to_dict"):  # ml_collections.ConfigDict
    _feed(h, x.to_dict())
  elif isinstance(x, (list, tuple)):  # one tag: a tuple and its JSON round trip agree
    h.update(f"L{len(x)}:".encode())
    for e in x:
      _feed(h, e)
  else:
    leaves, treedef = jax.tree_util.tree_flatten(x)
    if len(leaves) == 1 and leaves[0] is x:
      raise TypeError(f"fingerprint: cannot digest a {type(x).__name__}; pass arrays, "
                      "dataclasses, dicts, lists or scalars (or a digest string you computed).")
    h.update(f"T{treedef.num_leaves}:{type(x).__name__}".encode())
    for leaf in leaves:
      _feed(h, leaf)


def digest(value: Any) -> str:
  """A short content digest of `value`: arrays / pytrees by dtype, shape and bytes; datasets
  (lists of (ids, mask) pairs), dicts and dataclasses (configs) by their contents."""
  h = hashlib.blake2b(digest_size=12)
  _feed(h, value)
  return "blake2b:" + h.hexdigest()


def _describe(value: Any) -> Any:
  if isinstance(value, _SCALARS):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if (isinstance(value, (list, tuple)) and len(value) <= 8 and
      all(isinstance(v, _SCALARS) for v in value)):
    return list(value)
  return digest(value)


def make_fingerprint(**fields: Any) -> dict[str, Any]:
  """`{field: value}` with small scalars / short scalar lists kept and everything else digested.

  Example: `make_fingerprint(data=examples, seed=0, optimizer=opt, model=config)`.
  """
  return {k: _describe(v) for k, v in fields.items()}


def differing_fields(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Fields whose values differ, or that only one side has, sorted."""
  return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def describe_difference(recorded: Mapping[str, Any], current: Mapping[str, Any],
                        fields: list[str]) -> str:
  """One clause per field: `seed (recorded 0, now 1)`."""
  return "; ".join(f"{k} (recorded {recorded.get(k, '<absent>')!r}, now "
                   f"{current.get(k, '<absent>')!r})" for k in fields)


def read_fingerprint(workdir: str | os.PathLike) -> dict | None:
  """The record in `workdir/fingerprint.json` ({"fingerprint": {...}, "extended_from": [...]}),
  or None when the workdir has none (a run from before fingerprints)."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    if not isinstance(record.get("fingerprint"), dict):
      raise ValueError("no 'fingerprint' object")
  except (ValueError, AttributeError) as e:
    raise FingerprintMismatchError(
        f"{path} is unreadable ({e}); the workdir's run cannot be identified. Use a new workdir, "
        "or pass overwrite=True to discard the recorded run.") from e
  return record


def write_fingerprint(workdir: str | os.PathLike, fingerprint: Mapping[str, Any], *,
                      extended_from: list[int] | None = None) -> str:
  """Atomically records `fingerprint` in `workdir/fingerprint.json`; returns the path."""
  return wd.write_json(os.path.join(workdir, FILENAME),
                       {"fingerprint": dict(fingerprint), "extended_from": extended_from or []})


def run_fingerprint(state: Any, frozen: Any, num_steps: int,
                    fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The fingerprint `train` records: the caller's `fields` plus the initial state (trainable
  bytes, rng, step, extra; the optimizer state by structure only, as it is a function of the
  trainable params and the optimizer config, which the caller records), the frozen params and
  num_steps."""
  own = {"initial_state": digest({"trainable": state.trainable, "rng": state.rng,
                                  "step": state.step, "extra": state.extra}),
         "opt_state_layout": digest(jax.tree.map(lambda a: (str(np.dtype(a.dtype)),
                                                            list(np.shape(a))),
                                                 state.opt_state)),
         "frozen": digest(frozen), "num_steps": int(num_steps)}
  clash = sorted(set(own) & set(fields or {}))
  if clash:
    raise ValueError(f"train: fingerprint fields {clash} are recorded by train itself; rename "
                     "them.")
  return {**make_fingerprint(**(fields or {})), **own}


def claim_workdir(workdir: str, current: Mapping[str, Any], *, resumed_step: int | None,
                  extend: bool = False) -> None:
  """Records `current` for a fresh run, or checks that the run in `workdir` is the same one.

  Args:
    workdir: the training workdir.
    current: `run_fingerprint(...)` of this call.
    resumed_step: the latest checkpoint's step, None when there is none (a fresh run).
    extend: allow a larger num_steps than recorded (continuing a run is an explicit choice).

  Raises:
    FingerprintMismatchError: a field other than num_steps differs; num_steps is smaller than
      recorded; or larger without extend=True. Each names the fields, both values and the fix.
  """
  if resumed_step is None:
    write_fingerprint(workdir, current)
    return
  record = read_fingerprint(workdir)
  if record is None:
    logging.warning("%s has checkpoints but no %s (written before run fingerprints); resuming "
                    "it unchecked and recording this run's fingerprint.", workdir, FILENAME)
    write_fingerprint(workdir, current)
    return
  recorded = record["fingerprint"]
  fix = ("Use a new workdir, or pass overwrite=True to discard the recorded run (its checkpoints "
         "and metrics) and start over.")
  differ = [k for k in differing_fields(recorded, current) if k != "num_steps"]
  if differ:
    raise FingerprintMismatchError(
        f"train: {workdir} holds a different run (latest checkpoint: step {resumed_step}); "
        f"differing: {describe_difference(recorded, current, differ)}. {fix}")
  old, new = recorded.get("num_steps"), current["num_steps"]
  if old == new:
    return
  if not isinstance(old, int) or new < old:
    raise FingerprintMismatchError(
        f"train: {workdir} holds a run of num_steps={old!r} (latest checkpoint: step "
        f"{resumed_step}); this call asks for num_steps={new}. A shorter run is a different run: "
        f"{fix} (An earlier checkpoint can be read with Checkpointer.restore(step=...).)")
  if not extend:
    raise FingerprintMismatchError(
        f"train: {workdir} holds a run of num_steps={old} (latest checkpoint: step "
        f"{resumed_step}); this call asks for num_steps={new}. Continuing a run past its "
        f"recorded length is an explicit choice: pass extend=True. Or: {fix}")
  write_fingerprint(workdir, current, extended_from=record.get("extended_from", []) + [old])
  logging.info("train: extending the run in %s from %d to %d steps", workdir, old, new)


def discard_run(workdir: str) -> None:
  """Removes a training run's own files from `workdir` (checkpoints/, metrics.jsonl, the
  fingerprint), nothing else; the checkpoints go through a temp name, so a kill mid-delete
  never leaves a half-deleted run that looks resumable."""
  io_atomic.discard_dir(os.path.join(workdir, "checkpoints"))
  for name in ("metrics.jsonl", FILENAME):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)
