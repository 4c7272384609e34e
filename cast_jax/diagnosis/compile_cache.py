"""JAX's persistent compilation cache for diagnosis runs: a second run on the same model shape
(another checkpoint of it, other calibration data of the same lengths, a resumed run) loads its
programs from disk instead of compiling them again.

On a small model compilation, not arithmetic, is most of a cold diagnosis: on the 2-core CPU
the testbed's first run spent ~14 s of ~25 s in XLA compiles (gradient programs, one MCQ
program per start layer, the decoding and teacher-forced programs of the safety sweep). A
cached program still costs its tracing and the load from disk, but no compile.

Every program is cached (minimum compile time 0): the sweeps also run many small programs whose
compiles add up. Entries are keyed by JAX on the program, its shapes, the backend and the
compiler version, so a cache shared by different models or JAX versions never serves a wrong
program (it only grows; delete the folder to reclaim the space).
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = "~/.cache/cast_jax/xla"


def enable_compile_cache(path: str | None = DEFAULT_DIR) -> str | None:
  """Turns on JAX's persistent compilation cache in folder `path` (created if missing).

  Call it before the process compiles anything: JAX decides once, at the first compile,
  whether the cache is used.

  Args:
    path: a folder ("~" expanded); "" or None leaves the cache off.
  Returns:
    the absolute folder, or None when `path` was empty.
  Raises:
    ValueError: `path` exists and is not a folder.
  """
  if not path:
    return None
  folder = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise ValueError(f"compile cache {folder!r} is a file; pass a folder (or '' for no cache)")
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
