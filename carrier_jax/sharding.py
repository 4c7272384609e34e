"""The LCDD step under the decoder's sharding rules (`cast_jax.models.sharding`).

A delta dW is sharded exactly like the weight it is added to, and a gate vector like the axis
of the weight it gates, so the masked weight `W_base + (m_row (x) m_col) * dW` is formed shard
by shard without moving weights between devices:

  attn_read [L, D]     wq's D axis (data)          q [L, H, Dh]   wq's H, Dh axes (model, -)
  k / v [L, K, Dh]     wk / wv's K, Dh axes        attn_write     wo's output D axis (data)
  ffn_read [L, D]      w_gate's D axis (data)      ffn_hidden     w_gate's F axis (model)
  ffn_write [L, D]     w_down's output D axis (data)

The specs are read off `param_specs`, so an axis the mesh does not divide is replicated for the
gate exactly when it is for its weight. The optimizer state follows its parameters (each
moment found by its path, which ends in the carrier's keys); scalars (the controller, counts)
are replicated; batches split over `data`. jit + GSPMD then insert the collectives, and the
step computes what it computes on one device (up to the order of floating-point sums).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cast_jax.models import ModelConfig
from cast_jax.models import sharding as model_sharding
from cast_jax.train import TrainState

Params = dict[str, Any]
# gate group -> (weight, the weight's axes (after L) that the gate spans)
_GATE_AXES = {
    "attn_read": ("wq", (1,)), "q": ("wq", (2, 3)), "k": ("wk", (2, 3)), "v": ("wv", (2, 3)),
    "attn_write": ("wo", (3,)), "ffn_read": ("w_gate", (1,)), "ffn_hidden": ("w_gate", (2,)),
    "ffn_write": ("w_down", (2,)),
}


def carrier_specs(config: ModelConfig, mesh: Mesh, carrier: Params) -> Params:
  """PartitionSpec pytree for a carrier {"gates", "delta"} (see the module docstring)."""
  layer = model_sharding.param_specs(config, mesh)["layers"]

  def gate_spec(group):
    weight, axes = _GATE_AXES[group]
    spec = tuple(layer[weight]) + (None,) * 4
    return P(spec[0], *(spec[a] for a in axes))

  unknown = sorted(set(carrier["gates"]) - set(_GATE_AXES))
  if unknown:
    raise ValueError(f"carrier_specs: unknown gate groups {unknown}; expected {list(_GATE_AXES)}.")
  return {"gates": {g: gate_spec(g) for g in carrier["gates"]},
          "delta": {n: layer[n] for n in carrier["delta"]}}


def _named(mesh: Mesh, specs: Params) -> Params:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def carrier_shardings(config: ModelConfig, mesh: Mesh, carrier: Params) -> Params:
  """NamedSharding pytree for a carrier (`carrier_specs` on `mesh`)."""
  return _named(mesh, carrier_specs(config, mesh, carrier))


def shard_state(state: TrainState, config: ModelConfig, mesh: Mesh) -> TrainState:
  """Places an LCDD TrainState on `mesh`: carrier and its optimizer moments like the carrier,
  everything else (step, rng, controller, counts) replicated."""
  shardings = carrier_shardings(config, mesh, state.trainable)
  replicated = NamedSharding(mesh, P())

  def opt_sharding(path, leaf):
    # Optimizer moments mirror the carrier, so a moment's path ends in the carrier's
    # ("gates" | "delta", name) keys (multi_transform masks the other group out).
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if jnp.ndim(leaf) == 0:
      return replicated
    if len(keys) < 2 or keys[-2] not in shardings or keys[-1] not in shardings[keys[-2]]:
      raise ValueError(f"shard_state: optimizer leaf {jax.tree_util.keystr(path)} "
                       f"{jnp.shape(leaf)} does not mirror a carrier leaf.")
    if jnp.shape(leaf) != jnp.shape(state.trainable[keys[-2]][keys[-1]]):
      raise ValueError(f"shard_state: optimizer leaf {jax.tree_util.keystr(path)} has shape "
                       f"{jnp.shape(leaf)}, not its carrier leaf's.")
    return shardings[keys[-2]][keys[-1]]

  opt_shardings = jax.tree_util.tree_map_with_path(opt_sharding, state.opt_state)
  return jax.device_put(state, TrainState(
      step=replicated, trainable=shardings, opt_state=opt_shardings,
      extra=jax.tree.map(lambda _: replicated, state.extra), rng=replicated))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Every [B, ...] array of a batch split over `data` (B must divide by the data axis)."""
  data = mesh.shape["data"]
  for name, x in batch.items():
    if x.shape[0] % data:
      raise ValueError(f"shard_batch: {name} has batch size {x.shape[0]}, not divisible by the "
                       f"mesh's data axis {data}; use a batch size that is a multiple of it.")
  return jax.device_put(batch, model_sharding.batch_sharding(mesh))
