"""Resumable diagnosis workdirs: each expensive stage's arrays are stored once, atomically, under
`<workdir>/stages/<name>.npz`, and the workdir records the fingerprint of the run that made them
(`cast_jax.train.fingerprint`), so a killed run restarts from the stages already done and a
different run (other model, data or settings) is refused, naming the differing fields.

A stage file is written whole or not at all (`io_atomic.atomic_write_bytes`), so a kill mid-stage
leaves that stage absent, never half-written. A long stage (an ablation sweep) also stores its
finished blocks of heads as it goes (`cached_blocks`: `<workdir>/stages/<name>/<block>.npz`,
each written atomically), so the next run recomputes only the blocks the kill interrupted.
"""

from __future__ import annotations

import io
import os
import re
import time
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import tqdm

from cast_jax import io_atomic
from cast_jax.train import fingerprint as fp

STAGES_DIR = "stages"
SECONDS_KEY = "stage_seconds"
BLOCK_KEY = "block"
_BLOCK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # temporaries start with "."
R = TypeVar("R")


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
  return save_arrays(stage_path(workdir, name), arrays)


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


def _block_path(workdir: str, name: str, key: str) -> str:
  if not _BLOCK_NAME.match(key):
    raise ValueError(f"block key {key!r}: start with a letter or digit; then letters, digits, "
                     "'_', '.', '-' only")
  return os.path.join(workdir, STAGES_DIR, name, f"{key}.npz")


def save_block(workdir: str, name: str, key: str, array: Any) -> str:
  """Writes one finished block of stage `name` to stages/<name>/<key>.npz atomically."""
  return save_arrays(_block_path(workdir, name, key), {BLOCK_KEY: array})


def save_arrays(path: str, arrays: Mapping[str, Any]) -> str:
  """Writes {key: array} as one .npz at `path`, whole or not at all; returns the path."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return io_atomic.atomic_write_bytes(path, buf.getvalue())


def load_blocks(workdir: str, name: str) -> dict[str, np.ndarray]:
  """{key: array} of every block of stage `name` an earlier run finished ({} if none)."""
  folder = os.path.join(workdir, STAGES_DIR, name)
  if not os.path.isdir(folder):
    return {}
  out = {}
  for f in sorted(os.listdir(folder)):
    key, ext = os.path.splitext(f)
    if ext == ".npz" and _BLOCK_NAME.match(key):  # atomic-write temporaries are skipped
      with np.load(os.path.join(folder, f)) as z:
        out[key] = z[BLOCK_KEY]
  return out


def cached_blocks(workdir: str, name: str,
                  compute: Callable[[dict[str, np.ndarray], Callable[[str, Any], None]], R]
                  ) -> tuple[R, list[str]]:
  """Runs a blockwise computation that resumes from the blocks an earlier run stored.

  compute(done, save): `done` is {key: array} of the blocks already stored for stage `name`;
  `save(key, array)` stores a newly finished block (call it as each block finishes, e.g. as a
  sweep's `on_block`). The caller must have `claim`ed the workdir, so stored blocks belong to
  this run. Returns (compute's result, the keys that came from the store).
  """
  done = load_blocks(workdir, name)
  result = compute(dict(done), lambda key, array: save_block(workdir, name, key, array))
  return result, sorted(done)


def resumable_sweep(workdir: str, name: str, sweep: Callable[..., R], *, total_units: int,
                    desc: str, unit: str = "head", progress: bool = True) -> R:
  """Runs `sweep(done=..., on_block=..., progress=...)` (the sweeps' resume protocol) with its
  blocks stored under stages/<name>/ and a tqdm bar of units (`unit`s, e.g. heads) per second
  and the time left.

  A stored block of shape [..., N] holds prod(shape[:-1]) units (e.g. [layers, U, N] or
  [masks, N]); they count as done on the bar. Returns the sweep's result.
  """
  def compute(done, save):
    initial = sum(int(np.prod(a.shape[:-1])) for a in done.values())
    # The sweeps report fractions of units (a chunk of prompts done for a layer's heads).
    fmt = "{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}]"
    with tqdm.tqdm(total=total_units, initial=initial, unit=unit, desc=desc, bar_format=fmt,
                   dynamic_ncols=True, disable=not progress) as bar:
      return sweep(done=done, on_block=save, progress=bar.update)

  return cached_blocks(workdir, name, compute)[0]
