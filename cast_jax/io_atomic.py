"""Atomic, non-destructive writes of files and directories: the one module every writer uses
(HF checkpoints, orbax pytrees, adapters, carriers, reports).

The rules:
* A dir is written complete under a temp name in the target's parent, then renamed into place.
  An existing target is first renamed aside and removed only after the new one is in place, so
  whenever a write fails, `path` holds the old artifact or the new one, whole.
* Replacing needs `overwrite=True` and a target the writer recognises as its own kind (no
  foreign entries such as a user's notes); an empty dir holds nothing to lose and is always
  replaceable. The current directory and its ancestors are never replaced.
* Overwrite defaults to False across the library: a refused write costs a re-run with a flag,
  a wrong overwrite costs data that cannot be recomputed.
* Temp and aside names carry the writer's host and pid (`.cast_jax-tmp-<host>-<pid>-...`), so
  the next write into the same parent removes those whose writer died (a kill -9 mid-write) and
  restores an aside copy whose target went missing. Other names are never touched.
* Files and dirs are created with mode 0o666 / 0o777 minus the user's umask (not 0600), so
  collaborators on a shared filesystem can read them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
from typing import Callable, Iterator

from absl import logging

_PREFIX = ".cast_jax-"
_OURS = re.compile(r"^\.cast_jax-(tmp|old)-([0-9a-f]{8})-(\d+)-[0-9a-f]{6}-(.*)$")
# An aside name must fit in NAME_MAX (255) with the target's basename inside it, so restoring
# can find the target; longer basenames are cut and such an aside is only ever deleted.
_MAX_BASENAME = 160

# recognise(path) -> names of entries in the dir `path` that a writer of this kind did not
# make; empty: the dir is ours to replace.
Recogniser = Callable[[str], list]


class UnsafeWriteError(FileExistsError):
  """A write refused because it would destroy something the writer does not own."""


def _host_tag() -> str:
  return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _our_name(kind: str, basename: str) -> str:
  return (f"{_PREFIX}{kind}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(3)}-"
          f"{basename[:_MAX_BASENAME]}")


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  try:  # a killed but unreaped child is a zombie: its write is over
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def _umask() -> int:
  try:  # read, not set: os.umask would change it process-wide for a moment
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _default_modes(root: str) -> None:
  """Gives every file / dir under `root` mode 0o666 / 0o777 minus the umask: some writers
  (safetensors, tempfile) create them 0600 / 0700, unreadable to collaborators."""
  mask = _umask()
  os.chmod(root, 0o777 & ~mask)
  for parent, dirs, files in os.walk(root):
    for d in dirs:
      os.chmod(os.path.join(parent, d), 0o777 & ~mask)
    for f in files:
      path = os.path.join(parent, f)
      if not os.path.islink(path):
        os.chmod(path, 0o666 & ~mask)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


def clean_stale(parent: str | os.PathLike) -> list[str]:
  """Removes this library's leftovers of dead writers on this host from `parent`.

  A temp entry (an unfinished write) is deleted. An aside entry (the previous version of a
  target) is renamed back when its target is missing (the writer died between the two renames),
  else deleted. Entries of live writers, of other hosts, and every other name are left alone.

  Returns:
    the paths removed or restored.
  """
  parent = os.fspath(parent)
  try:
    names = os.listdir(parent)
  except OSError:
    return []
  host, done = _host_tag(), []
  for name in names:
    m = _OURS.match(name)
    if m is None or m.group(2) != host or _pid_alive(int(m.group(3))):
      continue
    entry = os.path.join(parent, name)
    target = os.path.join(parent, m.group(4))
    try:
      if m.group(1) == "old" and not os.path.lexists(target):
        if len(m.group(4)) >= _MAX_BASENAME:  # the target's name may be cut: keep, never lose
          logging.warning("%s holds the previous version of a target whose name it cannot "
                          "hold in full; rename it back by hand.", entry)
          continue
        os.rename(entry, target)
        logging.warning("restored %s from %s (its writer died mid-swap)", target, entry)
      else:
        _remove(entry)
      done.append(entry)
    except OSError as e:  # e.g. a read-only leftover: report, never fail the new write for it
      logging.warning("could not clean up stale %s: %s", entry, e)
  return done


def is_cwd_or_ancestor(path: str | os.PathLike) -> bool:
  """Whether `path` is the current directory or one of its ancestors (symlinks resolved)."""
  real, cwd = os.path.realpath(path), os.path.realpath(os.getcwd())
  return cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)


def _unremovable(path: str) -> str | None:
  """The first dir under `path` whose entries this user could not delete, else None."""
  for root, _, _ in os.walk(path):
    if not os.access(root, os.W_OK | os.X_OK):
      return root
  return None


def check_target(path: str | os.PathLike, *, kind: str, overwrite: bool = False,
                 recognise: Recogniser | None = None) -> str:
  """Checks that writing the dir `path` destroys nothing the writer does not own.

  Args:
    path: the dir to create or replace.
    kind: what is written, for messages ("HF checkpoint", "orbax pytree", ...).
    overwrite: allow replacing an existing (recognised) `path`.
    recognise: lists the entries of an existing dir that this kind of writer did not make;
      None: no existing non-empty dir is replaceable.

  Returns:
    the absolute path.

  Raises:
    ValueError: empty path. FileExistsError: `path` exists and overwrite is False.
    UnsafeWriteError: `path` is the cwd or its ancestor, a file, a symlink, holds foreign
      entries, or holds a dir this user cannot delete from.
  """
  raw = os.fspath(path)
  if not raw:
    raise ValueError(f"empty path for the {kind}; pass a dir to write it to.")
  path = os.path.abspath(raw)
  if is_cwd_or_ancestor(path):
    raise UnsafeWriteError(
        f"refusing to write the {kind} to {raw!r}: it is the current directory or one of its "
        f"ancestors, which holds files that are not this {kind}'s. Pass a dedicated subdir, "
        f"e.g. {os.path.join(raw, 'out')!r}.")
  if not os.path.lexists(path):
    return path
  if os.path.islink(path):
    raise UnsafeWriteError(f"refusing to replace {path}: it is a symlink (to "
                           f"{os.path.realpath(path)}). Pass the real path or a new one.")
  if not os.path.isdir(path):
    raise UnsafeWriteError(f"refusing to replace {path}: it is a file, not a {kind} dir. "
                           "Pass a dir path (new or holding this kind of artifact).")
  if not os.listdir(path):
    return path
  foreign = sorted(os.listdir(path)) if recognise is None else sorted(recognise(path))
  if foreign:
    shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
    raise UnsafeWriteError(
        f"refusing to replace {path}: it holds {shown}, which a {kind} does not. Move those "
        "out first, or write to a new path.")
  if not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it (only a {kind} "
                          "is ever replaced), or write to a new path.")
  stuck = _unremovable(path)
  if stuck is not None:
    raise UnsafeWriteError(
        f"refusing to replace {path}: {stuck} is not writable, so the old {kind} could not be "
        f"removed afterwards. Make it writable (chmod -R u+w {path}) or write to a new path.")
  return path


def _install(tmp: str, path: str, kind: str) -> None:
  """Swaps `tmp` into `path`: old aside, new in, old removed (a failure leaves the old whole)."""
  parent = os.path.dirname(path)
  if not os.path.lexists(path):
    os.rename(tmp, path)
    return
  aside = os.path.join(parent, _our_name("old", os.path.basename(path)))
  os.rename(path, aside)
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(aside, path)
    raise
  try:
    _remove(aside)
  except OSError as e:
    # The new one is in place; the old one is whole or partly deleted under `aside`, removed
    # by the next write into this parent once this process has exited.
    logging.warning("wrote the %s to %s, but could not remove its previous version, moved to "
                    "%s: %s", kind, path, aside, e)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, kind: str, overwrite: bool = False,
               recognise: Recogniser | None = None, create: bool = True) -> Iterator[str]:
  """Context manager yielding a temp dir to fill; on a clean exit it replaces `path`.

  Everything `check_target` refuses is refused before anything is written. Stale leftovers of
  dead writers in the parent are cleaned first. On an exception the temp dir is removed and
  `path` is untouched.

  Args:
    path, kind, overwrite, recognise: see `check_target`.
    create: make the (empty) temp dir; False yields only its name, for writers that must
      create the dir themselves (orbax).

  Yields:
    the temp dir's path, in the same parent as `path` (so the final rename is atomic).
  """
  path = check_target(path, kind=kind, overwrite=overwrite, recognise=recognise)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  clean_stale(parent)
  tmp = os.path.join(parent, _our_name("tmp", os.path.basename(path)))
  if create:
    os.mkdir(tmp, 0o777)
  try:
    yield tmp
    if not os.path.isdir(tmp):
      raise FileNotFoundError(f"the {kind} writer left nothing at {tmp}.")
    _default_modes(tmp)
    # Re-checked: the target may have changed while the (long) write ran.
    check_target(path, kind=kind, overwrite=overwrite, recognise=recognise)
    _install(tmp, path, kind)
  except BaseException:
    for leftover in [tmp] + [os.path.join(parent, n) for n in os.listdir(parent)
                             if n.startswith(os.path.basename(tmp))]:
      if os.path.lexists(leftover):
        shutil.rmtree(leftover, ignore_errors=True)
    raise


def discard_dir(path: str | os.PathLike) -> None:
  """Removes a dir this library owns; renamed to a temp name first, so a kill mid-delete leaves
  a stale temp entry (cleaned later), never a half-deleted dir under the real name."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.lexists(path):
    return
  if is_cwd_or_ancestor(path):
    raise UnsafeWriteError(f"refusing to delete {path}: the current directory or an ancestor.")
  doomed = os.path.join(os.path.dirname(path), _our_name("tmp", os.path.basename(path)))
  os.rename(path, doomed)
  _remove(doomed)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
  """Writes `data` to the file `path` atomically (temp file + rename); creates parent dirs.

  An existing file is replaced; a dir or symlink at `path` is refused (UnsafeWriteError).
  Returns the path.
  """
  raw = os.fspath(path)
  if not raw:
    raise ValueError("empty file path; pass a file to write.")
  full = os.path.abspath(raw)
  if os.path.islink(full) or os.path.isdir(full):
    raise UnsafeWriteError(f"refusing to replace {full} with a file: it is a "
                           f"{'symlink' if os.path.islink(full) else 'directory'}. Pass a new "
                           "file path.")
  parent = os.path.dirname(full)
  os.makedirs(parent, exist_ok=True)
  clean_stale(parent)
  tmp = os.path.join(parent, _our_name("tmp", os.path.basename(full)))
  # os.open applies the umask to 0o666; mkstemp would force 0600.
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, full)
  except BaseException:
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise
  return raw
