"""A batch of head masks split over the devices: each device evaluates its share of the masks
with the params and inputs replicated, so one sweep program runs on one CPU, one GPU or N
devices. Masks are independent, so no collective runs inside the sweep; a device count that
does not divide the mask count is made up with copies of the first mask (results dropped).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

AXIS = "masks"


def mask_mesh(devices: Sequence[Any] | None = None) -> Mesh | None:
  """A 1-D ('masks',) mesh over `devices` (default: all), or None for a single device (then
  the sweeps run the unsharded program)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("mask_mesh: no devices given")
  return None if len(devices) == 1 else Mesh(np.asarray(devices), (AXIS,))


def map_over_masks(fn: Callable[..., Any], masks: jnp.ndarray, args: Any, *, batch_size: int,
                   mesh: Mesh | None) -> Any:
  """fn(mask, *args) for each of M masks: a pytree with a leading [M] axis on every leaf.

  Call inside jit. Without a mesh: `lax.map(..., batch_size)` (batch_size masks vmapped at a
  time, one compiled body). With one: the masks (padded to a multiple of the mesh size) are
  split over AXIS and each device lax.maps its M' = M_padded / n masks, min(batch_size, M')
  at a time; `args` (params, inputs) are replicated.
  """
  M = masks.shape[0]
  if mesh is None:
    return jax.lax.map(lambda m: fn(m, *args), masks, batch_size=min(batch_size, M))
  n = mesh.size
  pad = -M % n
  if pad:
    masks = jnp.concatenate([masks, jnp.repeat(masks[:1], pad, axis=0)])
  local_batch = min(batch_size, masks.shape[0] // n)

  def local(local_masks, local_args):
    return jax.lax.map(lambda m: fn(m, *local_args), local_masks, batch_size=local_batch)

  out = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS),
                      check_vma=False)(masks, tuple(args))
  return jax.tree.map(lambda o: o[:M], out)
