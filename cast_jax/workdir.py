"""Workdirs and the artifacts launch scripts write into them: resolved config, metrics JSON, PNG
plots.

Every file appears whole or not at all and with the user's umask (`io_atomic`), so a run killed
mid-write never leaves a half-written artifact behind.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# atomic_write_bytes is re-exported: launch scripts write their files through this module.
from cast_jax.io_atomic import atomic_write_bytes, is_cwd_or_ancestor


class WorkdirError(ValueError):
  """A workdir that cannot hold a run's outputs; the message names it and the fix."""


def prepare_workdir(path: str | os.PathLike | None, *, what: str = "workdir",
                    create: bool = True) -> str:
  """Checks (and with `create`, creates) a run's output dir; returns its absolute path.

  Refused: empty (outputs would land in the current directory), an existing file, the current
  directory or one of its ancestors (outputs would mix with files that are not the run's).
  """
  raw = "" if path is None else os.fspath(path)
  if not raw.strip():
    raise WorkdirError(f"{what} is empty; pass a dir for the run's outputs, e.g. /tmp/run1 "
                       "(an empty value would write into the current directory).")
  full = os.path.abspath(raw)
  if os.path.exists(full) and not os.path.isdir(full):
    raise WorkdirError(f"{what}={raw!r} is a file, not a directory; pass a dir path (new, or "
                       "the workdir of the run to resume).")
  if is_cwd_or_ancestor(full):
    raise WorkdirError(f"{what}={raw!r} is the current directory or one of its ancestors; pass "
                       f"a dedicated subdir such as {os.path.join(raw, 'run1')!r}.")
  if not create:
    return full
  try:
    os.makedirs(full, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"{what}={raw!r}: cannot create it ({e.strerror}); pass a dir you can "
                       "write to.") from e
  return full


def _json_default(x: Any):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
    return np.asarray(x).tolist()
  if hasattr(x, "to_dict"):
    return x.to_dict()
  raise TypeError(f"cannot serialise {type(x).__name__} to JSON")


def write_json(path: str | os.PathLike, obj: Any) -> str:
  """Atomic, indented JSON (numpy scalars/arrays and ConfigDicts allowed)."""
  text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
  return atomic_write_bytes(path, (text + "\n").encode())


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> str:
  """Saves a matplotlib figure as PNG atomically and closes it."""
  import io

  import matplotlib.pyplot as plt

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return atomic_write_bytes(path, buf.getvalue())
