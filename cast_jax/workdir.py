"""Atomic artifact writing for launch scripts: resolved config, metrics JSON, PNG plots.

Every file appears whole or not at all (written under a temp name, then renamed), so a run
killed mid-write never leaves a half-written artifact behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
  """Writes `data` to `path` atomically; creates parent dirs. Returns the path."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


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
