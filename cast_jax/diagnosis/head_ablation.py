"""Batched ablation units: which query heads one ablation zeroes, and one compiled program that
evaluates a metric under every unit's mask.

A unit is `group` consecutive query heads of one layer: unit u of layer l zeroes heads
[u * group, (u + 1) * group). group=1 is the paper's single-head ablation; group =
num_heads // num_kv_heads ablates everything one KV head feeds (the K / V targets).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.models.config import ModelConfig


def num_units(config: ModelConfig, group: int = 1) -> int:
  """Units per layer, H // group; ValueError when group does not divide num_heads."""
  H = config.num_heads
  if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1 or H % group:
    raise ValueError(f"ablation group={group!r} must be an integer >= 1 dividing num_heads={H} "
                     f"(e.g. 1 per query head, or num_heads // num_kv_heads="
                     f"{H // max(config.num_kv_heads, 1)} per KV head).")
  return H // int(group)


def unit_masks(config: ModelConfig, group: int = 1) -> np.ndarray:
  """float32 [L * U, L, H], U = H // group: mask l * U + u zeroes unit u of layer l only."""
  L, U = config.num_layers, num_units(config, group)
  units = 1.0 - np.eye(L * U, dtype=np.float32).reshape(L * U, L, U)
  return np.repeat(units, group, axis=-1)


def single_head_masks(config: ModelConfig) -> jnp.ndarray:
  """float32 [L*H, L, H]: mask i is all ones except a zero at head (i // H, i % H)."""
  return jnp.asarray(unit_masks(config, 1))


def ablate_each_head(metric_fn: Callable[[jnp.ndarray], jnp.ndarray], config: ModelConfig,
                     chunk: int = 8, group: int = 1) -> jnp.ndarray:
  """metric_fn(head_mask [L, H]) -> scalar, evaluated for every unit ablation.

  The masks are vmapped `chunk` at a time (lax.map with batch_size), so memory is bounded by
  `chunk` forwards while XLA still compiles one program. Returns float32 [L, H // group].
  """
  masks = jnp.asarray(unit_masks(config, group))
  values = jax.lax.map(metric_fn, masks, batch_size=chunk)
  return values.reshape(config.num_layers, num_units(config, group))
