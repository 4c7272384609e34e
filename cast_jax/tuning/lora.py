"""Head-restricted LoRA on W_q (cast.md 3.5, 4.2, App. B): the update of a frozen head is zero.

Params (every leaf with the leading L axis, so they ride the decoder's layer scan):

  lora = {"a": A [L, D, r], "b": B [L, r, H, Dh]}     trainable (B head-major, like wq)
  head_mask [L, H] in {0, 1}                           fixed: 1 = this head's W_q is tuned

  delta_Wq[l] = (alpha / r) * A[l] @ (B[l] * head_mask[l])      [D, H, Dh], like wq [L, D, H, Dh]

A frozen head's columns of `B * mask` are exact zeros, so its slice of delta_Wq is an exact
zero for any A and B (the mask is applied in the forward, not by hoping B stays 0), and its
gradient w.r.t. B is exactly zero as well. "Full SFT" in the paper is this with an all-ones mask.

Init follows PEFT's default (`init_lora_weights=True`): A ~ U(-1/sqrt(D), 1/sqrt(D)) (kaiming
uniform with a=sqrt(5) on the [r, D] torch weight), B = 0, from an explicit key.

The seam is activation-side: `apply_lora` (the decoder's `adapter_fn`, via `make_adapter_fn`)
adds `wq_lora_a` = A and `wq_lora_b` = scale * (B * mask) to the layer params, and the decoder
computes q = x @ wq + (x @ A) @ (scale * B * mask), so forward / train / eval / generate take
LoRA through their existing `adapter_fn, adapter_params` arguments. The backward then forms only
r-wide products; the weight-side alternative (wq + A @ B inside the scan) forms the full-size
wq gradient x^T @ dq every step and rebuilds delta_Wq at every decoded token
(benchmarks/bench_tuning.py measures both). `merge_lora` gives plain params for export.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.models.config import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters (paper defaults, Table 3). Scale = alpha / rank (PEFT, no rsLoRA)."""

  rank: int = 32
  alpha: float = 32.0
  dropout: float = 0.0

  def __post_init__(self):
    if int(self.rank) != self.rank or self.rank < 1:
      raise ValueError(f"LoraConfig.rank={self.rank!r}; use an integer >= 1.")
    if not (np.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"LoraConfig.alpha={self.alpha!r}; use a finite value > 0.")
    if self.dropout != 0.0:
      raise ValueError(
          f"LoRA dropout={self.dropout!r}: only 0.0 is supported (the paper's setting); dropout "
          "on the low-rank path's input needs a per-step key in the decoder's forward.")

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)


def check_head_mask(head_mask: Any, config: ModelConfig, where: str = "head_mask") -> np.ndarray:
  """The mask as float32 numpy [L, H]; raises ValueError naming the problem and the fix."""
  m = np.asarray(jax.device_get(head_mask))
  want = (config.num_layers, config.num_heads)
  if m.shape != want:
    raise ValueError(f"{where} has shape {m.shape}; it must be [L, H] = {list(want)} (one entry "
                     "per query head; build it with cast_jax.tuning.head_sets).")
  if not np.isin(m, (0, 1)).all():
    raise ValueError(f"{where} must hold only 0 / 1 (1 = this head's W_q is tuned); got values "
                     f"{np.unique(m)[:6]}.")
  return m.astype(np.float32)


def init_lora(config: ModelConfig, key: jax.Array, lora_config: LoraConfig = LoraConfig(),
              dtype=jnp.float32) -> Params:
  """Fresh LoRA factors {"a": [L, D, r], "b": [L, r, H, Dh]}: A as PEFT inits it, B = 0."""
  c, r = config, int(lora_config.rank)
  bound = 1.0 / np.sqrt(c.hidden_size)
  a = jax.random.uniform(key, (c.num_layers, c.hidden_size, r), jnp.float32, -bound, bound)
  b = jnp.zeros((c.num_layers, r, c.num_heads, c.head_dim), jnp.float32)
  return {"a": a.astype(dtype), "b": b.astype(dtype)}


def _masked_b(b: jnp.ndarray, head_mask: jnp.ndarray) -> jnp.ndarray:
  """B [..., r, H, Dh] * mask [..., H] (the mask broadcast over r and Dh)."""
  return b * head_mask[..., None, :, None].astype(b.dtype)


def lora_delta(lora: Params, head_mask: Any, lora_config: LoraConfig) -> jnp.ndarray:
  """delta_Wq [L, D, H, Dh] = scale * A @ (B * mask), float32 at highest matmul precision."""
  a = jnp.asarray(lora["a"], jnp.float32)
  bm = _masked_b(jnp.asarray(lora["b"], jnp.float32), jnp.asarray(head_mask))
  L, r, H, Dh = bm.shape
  d = jnp.einsum("ldr,lrk->ldk", a, bm.reshape(L, r, H * Dh),
                 precision=jax.lax.Precision.HIGHEST)
  return (lora_config.scale * d).reshape(L, a.shape[1], H, Dh)


def adapter_params(lora: Params, head_mask: Any) -> Params:
  """The decoder's `adapter_params` for `make_adapter_fn`: {"a", "b", "mask" [L, H]}."""
  return {"a": lora["a"], "b": lora["b"], "mask": jnp.asarray(head_mask, jnp.float32)}


def apply_lora(layer_params: Params, layer_adapter: Params, scale: float) -> Params:
  """One layer's params plus the decoder's activation-side LoRA keys for wq (inside the scan).

  layer_adapter: {"a": [D, r], "b": [r, H, Dh], "mask": [H]} (one layer's slice).
  Returns: layer_params with "wq_lora_a" = A [D, r] and "wq_lora_b" = scale * B * mask
  [r, H, Dh], in wq's dtype.
  """
  dtype = layer_params["wq"].dtype
  a, b = layer_adapter["a"], layer_adapter["b"]
  bm = _masked_b(b, layer_adapter["mask"]) * jnp.asarray(scale, b.dtype)
  return {**layer_params, "wq_lora_a": a.astype(dtype), "wq_lora_b": bm.astype(dtype)}


@functools.lru_cache(maxsize=None)
def make_adapter_fn(lora_config: LoraConfig) -> Callable[[Params, Params], Params]:
  """`adapter_fn(layer_params, layer_adapter)` for forward / generate / EvalModel.

  Cached per config: the same function object for equal configs, so jitted callers that take
  adapter_fn as a static argument (the eval runners) compile once for every head set.
  """
  return functools.partial(apply_lora, scale=lora_config.scale)


def merge_lora(params: Params, lora: Params, head_mask: Any, lora_config: LoraConfig) -> Params:
  """Base params with wq replaced by the merged wq + delta_Wq (everything else the same arrays).

  A frozen head's wq slice is the base array's bytes, bit for bit (selected, not added: W + 0
  would turn a stored -0.0 into +0.0).
  """
  wq = params["layers"]["wq"]
  m = jnp.asarray(head_mask, jnp.float32)
  delta = lora_delta(lora, m, lora_config)
  merged = jnp.where(m[:, None, :, None] > 0, (wq.astype(jnp.float32) + delta).astype(wq.dtype),
                     wq)
  return {**params, "layers": {**params["layers"], "wq": merged}}
