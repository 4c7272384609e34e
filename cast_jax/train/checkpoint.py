"""Orbax checkpoints of the TrainState (keep-N, atomic) and HF export of trained params.

Orbax writes each step under a temporary name and renames it when complete, so a crash mid-save
leaves only finished checkpoints visible to `latest_step` / `restore`. Standalone writes
(`save_pytree`, `export_hf`) go through `cast_jax.io_atomic`: they appear whole, replace only
their own kind of dir, and only with overwrite=True.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from cast_jax import io_atomic, models
from cast_jax.train.state import TrainState

PyTree = Any


class CheckpointMismatchError(ValueError):
  """A stored checkpoint does not fit the state template it is restored into."""


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Keep-N manager of TrainState checkpoints in `directory/<step>/`.

  Each checkpoint holds the full TrainState (step, trainable, opt_state, extra, rng) and a JSON
  `meta` dict with at least `step` and `data_position` (batches consumed). `frozen` params are
  not stored: they are the caller's input (base model) and are never modified.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               async_save: bool = False):
    """Args: directory (created if absent); max_to_keep (None keeps all); async_save (overlap
    writing with training; `wait()` / `close()` block until writes are final)."""
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"Checkpointer: max_to_keep={max_to_keep}; use >= 1, or None to keep all.")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints, ascending."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None if there is none."""
    return self._mgr.latest_step()

  def save(self, state: TrainState, meta: dict | None = None) -> int:
    """Saves `state` under its own step; returns that step.

    `meta` (JSON-serialisable) is stored alongside; `step` and `data_position` are filled in.
    Saving a step that already exists is an error (orbax never overwrites a finished step).
    """
    step = int(jax.device_get(state.step))
    meta = {"data_position": step, **(meta or {}), "step": step}
    self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)))
    logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return step

  def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """Restores the checkpoint at `step` (default: latest) into `template`'s structure.

    Args:
      template: a TrainState with the same tree structure, shapes and dtypes (e.g. a fresh
        `TrainState.create(...)`); only its shapes / dtypes / shardings are used.
      step: which checkpoint; None for the latest.

    Returns:
      (state, meta).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {self.directory}.")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}.")
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not match the state template (different "
          f"trainable mask, model config, optimizer or accum_steps?). Restore with the config "
          f"that wrote it, or use a fresh directory. Orbax said: {e}") from e
    return out.state, dict(out.meta)

  def wait(self) -> None:
    """Blocks until pending async saves are final."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# What orbax's StandardCheckpointer writes into a pytree dir (ocdbt layout).
_ORBAX_ENTRIES = {"_CHECKPOINT_METADATA", "_METADATA", "_sharding", "commit_success.txt",
                  "manifest.ocdbt", "descriptor", "array_metadatas", "d"}


def foreign_to_orbax_pytree(path: str | os.PathLike) -> list[str]:
  """Entries of the dir `path` that an orbax pytree dir would not hold (all of them when it has
  no _CHECKPOINT_METADATA): what `save_pytree` refuses to delete."""
  names = sorted(os.listdir(path))
  if "_CHECKPOINT_METADATA" not in names:
    return names
  return [n for n in names if n not in _ORBAX_ENTRIES and not n.startswith("ocdbt.process_")]


def save_pytree(path: str | os.PathLike, tree: PyTree, *, overwrite: bool = False) -> str:
  """Writes any array pytree (e.g. trained LoRA factors) to an orbax dir `path`, atomically.

  Args:
    path: the dir; its parent is created.
    tree: a pytree of arrays.
    overwrite: replace an existing orbax pytree dir at `path` (a dir holding anything else is
      always refused; see `cast_jax.io_atomic`).

  Returns:
    the absolute path.
  """
  path = os.path.abspath(os.fspath(path))
  # orbax creates the dir itself (and refuses an existing one), so only the temp name is taken.
  with io_atomic.atomic_dir(path, kind="orbax pytree", overwrite=overwrite,
                            recognise=foreign_to_orbax_pytree, create=False) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp, tree)
  return path


def load_pytree(path: str | os.PathLike, template: PyTree | None = None) -> PyTree:
  """Reads a pytree written by `save_pytree`; `template` fixes structure / dtypes / shardings."""
  path = os.path.abspath(os.fspath(path))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, None if template is None else _abstract(template))


def export_hf(params: PyTree, config: models.ModelConfig, path: str | os.PathLike, *,
              dtype: Any = None, tokenizer: Any = None, overwrite: bool = False) -> str:
  """Writes trained decoder params as an HF checkpoint dir via `models.save_pretrained`.

  The dir appears atomically and replaces only an HF checkpoint dir (done by save_pretrained).
  Non-finite weights are refused, so a diverged run never produces a loadable-looking export.

  Args:
    params: full decoder params (`merge(state.trainable, frozen)` for a masked fine-tune).
    config: its ModelConfig.
    path: output dir.
    dtype: optional storage dtype (e.g. jnp.bfloat16).
    tokenizer: optional HF tokenizer saved alongside.
    overwrite: replace an existing checkpoint dir (otherwise FileExistsError); a dir holding
      anything else is refused either way.

  Returns:
    path.
  """
  # Reduced on device: one bool per leaf crosses to the host, not the weights.
  bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(params)
         if not bool(jnp.all(jnp.isfinite(v)))]
  if bad:
    raise FloatingPointError(f"export_hf: non-finite values in {bad}; export a checkpoint from "
                             "before the divergence instead.")
  return models.save_pretrained(params, config, path, dtype=dtype, tokenizer=tokenizer,
                                overwrite=overwrite)
