"""C_write (lcdd-sft-eraser.md Eq. 5): the residual-stream channels a carrier writes to, and the
write activations there.

C_write of layer l is the set of active output-gate channels of the attention path
(`attn_write`, columns of wo) and of the FFN path (`ffn_write`, columns of w_down). Channels
are fixed 0/1 masks {"attn_write": [L, D], "mlp_write": [L, D]} (keys named like the decoder's
`collect` outputs) rather than ragged index lists, so every function here jits with one shape
per model. The activations come from the decoder's own `collect=("attn_write", "mlp_write")`
(what each attention / MLP block adds to the residual stream): no second forward.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from cast_jax.models import ModelConfig, forward

PATHS = ("attn_write", "mlp_write")
# decoder collect name -> carrier gate group of that path's output channels.
GATE_OF_PATH = {"attn_write": "attn_write", "mlp_write": "ffn_write"}


def carrier_channels(carrier: dict) -> dict[str, np.ndarray]:
  """C_write of a carrier: {"attn_write": float32 [L, D], "mlp_write": [L, D]}, 1 where the
  path's output gate is on (gate logit > 0, the Heaviside forward of `carrier_jax.gates`)."""
  gates = carrier["gates"]
  return {p: (np.asarray(gates[g]) > 0).astype(np.float32) for p, g in GATE_OF_PATH.items()}


def all_channels(config: ModelConfig) -> dict[str, np.ndarray]:
  """Every channel of both paths ([L, D] ones): C_write of a dense model."""
  ones = np.ones((config.num_layers, config.hidden_size), np.float32)
  return {p: ones for p in PATHS}


def channels_from_json(path: str | os.PathLike, config: ModelConfig) -> dict[str, np.ndarray]:
  """C_write from an LCDD run's active_channels.json ({group: [indices per layer]})."""
  with open(path) as f:
    active = json.load(f)
  out = {}
  for p, g in GATE_OF_PATH.items():
    if g not in active or len(active[g]) != config.num_layers:
      raise ValueError(f"{path}: needs {g!r} with {config.num_layers} layers of channel indices "
                       "(the active_channels.json launch/lcdd.py writes).")
    m = np.zeros((config.num_layers, config.hidden_size), np.float32)
    for layer, idx in enumerate(active[g]):
      m[layer, np.asarray(idx, np.int64)] = 1.0
    out[p] = m
  return out


def channel_counts(channels: dict[str, Any]) -> dict[str, list[int]]:
  """Active channels per layer of each path (host ints, for reports)."""
  return {p: np.asarray(m).sum(axis=1).astype(int).tolist() for p, m in channels.items()}


def write_activations(params: dict, config: ModelConfig, embeds: jnp.ndarray, mask: jnp.ndarray,
                      channels: dict[str, jnp.ndarray], *, adapter_fn=None, adapter_params=None,
                      head_mask=None, logits_at: Any = None
                      ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """One forward on embeddings; logits and the write activations at C_write.

  Args:
    embeds [B, T, D]; mask [B, T] (1 real); channels {"attn_write", "mlp_write"}: [L, D] 0/1.
    adapter_fn / adapter_params / head_mask: as in `forward` (the carrier's gated deltas).
    logits_at: as in `forward` (e.g. the tail positions a KL reads).

  Returns:
    (logits float32 [B, T, V] or [B, N, V], {path: [L, B, T, D] float32, zero off C_write}).
  """
  logits, got = forward(params, config, input_embeds=embeds, attention_mask=mask,
                        adapter_fn=adapter_fn, adapter_params=adapter_params, head_mask=head_mask,
                        collect=PATHS, logits_at=logits_at)
  writes = {p: got[p].astype(jnp.float32) * jnp.asarray(channels[p])[:, None, None, :]
            for p in PATHS}
  return logits, writes
