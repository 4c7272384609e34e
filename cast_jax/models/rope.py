"""Rotary position embeddings with the scaling rules HF uses (default, linear, llama3)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from cast_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """Per-pair rotation frequencies, float32 [head_dim // 2], after the config's scaling rule."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  s = config.rope_scaling
  if s.rope_type == "linear":
    return (inv / s.factor).astype(np.float32)
  if s.rope_type == "llama3":
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)
  return inv


def rope_tables(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin tables float32 [B, T, head_dim] for integer positions [B, T]."""
  inv = jnp.asarray(inverse_frequencies(config))
  angles = positions.astype(jnp.float32)[..., None] * inv
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, N, Dh] by cos/sin [B, T, Dh] (HF's rotate-half pairing: i with i + Dh/2)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
