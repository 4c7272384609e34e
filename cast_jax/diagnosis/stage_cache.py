"""Resumable diagnosis workdirs: each expensive stage's arrays are stored once, atomically, under
`<workdir>/stages/<name>.npz`, and the workdir records the fingerprint of the run that made them
(`cast_jax.train.fingerprint`), so a killed run restarts from the stages already done and a
different run (other model, data or settings) is refused, naming the differing fields.

A stage file is written whole or not at all (`io_atomic.atomic_write_bytes`), so a kill mid-stage
leaves that stage absent, never half-written: it is recomputed on the next run.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any, Callable, Mapping

import numpy as np

from cast_jax import io_atomic
from cast_jax.train import fingerprint as fp

STAGES_DIR = "stages"
SECONDS_KEY = "stage_seconds"


def claim(workdir: str, current: Mapping[str, Any]) -> bool:
  """Records `current` in a fresh workdir, or checks that the workdir holds the same run.

  Args: current: `fingerprint.make_fingerprint(...)` of this run's inputs and settings.
  Returns: True when the workdir already held this run (its stages may be reused).
  Raises: fingerprint.FingerprintMismatchError naming each differing field and both values.
  """
  record = fp.read_fingerprint(workdir)
  if record is None:
    fp.write_fingerprint(workdir, current)
    return False
  recorded = record["fingerprint"]
  differ = fp.differing_fields(recorded, current)
  if differ:
    raise fp.FingerprintMismatchError(
        f"{workdir} holds a different diagnosis run; differing: "
        f"{fp.describe_difference(recorded, current, differ)}. Use a new workdir for this run.")
  return True


def stage_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, STAGES_DIR, f"{name}.npz")


def save_stage(workdir: str, name: str, arrays: Mapping[str, Any]) -> str:
  """Writes {key: array} to stages/<name>.npz atomically; returns the path."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return io_atomic.atomic_write_bytes(stage_path(workdir, name), buf.getvalue())


def load_stage(workdir: str, name: str) -> dict[str, np.ndarray] | None:
  """The arrays of a finished stage, or None when it was never completed."""
  path = stage_path(workdir, name)
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def cached_stage(workdir: str, name: str, compute: Callable[[], Mapping[str, Any]]
                 ) -> tuple[dict[str, np.ndarray], bool, float]:
  """Loads stage `name` if a previous run finished it, else runs `compute()` and saves it.

  The caller must have `claim`ed the workdir first, so a stored stage belongs to this run. The
  seconds the computation took are stored beside the arrays (key SECONDS_KEY), so a resumed
  run still reports what each stage cost.
  Returns: (arrays, whether they came from the cache, seconds the computation took).
  """
  got = load_stage(workdir, name)
  if got is not None:
    return got, True, float(got.pop(SECONDS_KEY, np.nan))
  t = time.time()
  arrays = {k: np.asarray(v) for k, v in compute().items()}
  if SECONDS_KEY in arrays:
    raise ValueError(f"cached_stage: {SECONDS_KEY!r} is reserved")
  seconds = time.time() - t
  save_stage(workdir, name, {**arrays, SECONDS_KEY: seconds})
  return arrays, False, seconds
