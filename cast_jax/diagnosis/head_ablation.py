"""Batched single-head ablation: one compiled program evaluates a metric under every head mask."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cast_jax.models.config import ModelConfig


def single_head_masks(config: ModelConfig) -> jnp.ndarray:
  """float32 [L*H, L, H]: mask i is all ones except a zero at head (i // H, i % H)."""
  L, H = config.num_layers, config.num_heads
  return 1.0 - jnp.eye(L * H, dtype=jnp.float32).reshape(L * H, L, H)


def ablate_each_head(metric_fn: Callable[[jnp.ndarray], jnp.ndarray], config: ModelConfig,
                     chunk: int = 8) -> jnp.ndarray:
  """metric_fn(head_mask [L, H]) -> scalar, evaluated for every single-head ablation.

  The masks are vmapped `chunk` at a time (lax.map with batch_size), so memory is bounded by
  `chunk` forwards while XLA still compiles one program. Returns float32 [L, H].
  """
  masks = single_head_masks(config)
  values = jax.lax.map(metric_fn, masks, batch_size=chunk)
  return values.reshape(config.num_layers, config.num_heads)
