"""Device mesh and partition rules: FSDP over `data`, tensor parallel over heads / MLP hidden.

Everything is expressed as shardings on arrays; jit + GSPMD insert the collectives, so the same
forward runs on one CPU, one GPU, or a multi-host slice.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cast_jax.models.config import ModelConfig
from cast_jax.models.decoder import Params, param_shapes

# Logical spec per param key (leading layer axis included for stacked params).
_RULES = {
    "embed": ("model", "data"),
    "lm_head": ("data", "model"),
    "final_norm": (None,),
    "attn_norm": (None, None), "mlp_norm": (None, None),
    "q_norm": (None, None), "k_norm": (None, None),
    "wq": (None, "data", "model", None), "wk": (None, "data", "model", None),
    "wv": (None, "data", "model", None), "wo": (None, "model", None, "data"),
    "bq": (None, "model", None), "bk": (None, "model", None), "bv": (None, "model", None),
    "w_gate": (None, "data", "model"), "w_up": (None, "data", "model"),
    "w_down": (None, "model", "data"),
}


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when a multi-process launch is detected (env vars)."""
  markers = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_ID")
  # Must run before anything touches a backend (even jax.process_count()).
  if any(os.environ.get(m) for m in markers):
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:  # already initialised or a single-host run
      logging.info("jax.distributed.initialize skipped: %s", e)


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all). data defaults to n_devices // model."""
  devices = jax.devices() if devices is None else list(devices)
  data = len(devices) // model if data is None else data
  if data * model != len(devices):
    raise ValueError(f"mesh data={data} x model={model} != {len(devices)} devices.")
  return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def _fit(spec: tuple, shape: tuple[int, ...], mesh: Mesh, name: str) -> P:
  """Drops mesh axes that do not divide their dim (that dim is then replicated)."""
  out = []
  for axis, dim in zip(spec, shape):
    if axis is not None and dim % mesh.shape[axis]:
      logging.log_first_n(logging.INFO, "%s: dim %d not divisible by mesh %s=%d; replicated",
                          8, name, dim, axis, mesh.shape[axis])
      axis = None
    out.append(axis)
  return P(*out)


def param_specs(config: ModelConfig, mesh: Mesh) -> Params:
  """PartitionSpec pytree matching `param_shapes(config)`."""
  shapes = param_shapes(config)
  specs = {k: _fit(_RULES[k], s, mesh, k) for k, s in shapes.items() if k != "layers"}
  specs["layers"] = {k: _fit(_RULES[k], s, mesh, k) for k, s in shapes["layers"].items()}
  return specs


def param_shardings(config: ModelConfig, mesh: Mesh) -> Params:
  """NamedSharding pytree for the params (pass to `load_pretrained(shardings=...)`)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(config, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, ...] arrays split over `data`."""
  return NamedSharding(mesh, P("data"))


def cache_sharding(config: ModelConfig, mesh: Mesh) -> NamedSharding:
  """KV cache [L, B, S, K, Dh]: batch over `data`, kv heads over `model` when they divide."""
  kv_axis = "model" if config.num_kv_heads % mesh.shape["model"] == 0 else None
  return NamedSharding(mesh, P(None, "data", None, kv_axis, None))


def shard_params(params: Params, shardings: Params) -> Params:
  """Places an existing param pytree onto `shardings`."""
  return jax.device_put(params, shardings)
