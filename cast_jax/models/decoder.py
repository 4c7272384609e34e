"""The one functional decoder for Llama / Mistral / Qwen2 / Qwen3.

Parameters are a plain dict (layout in docs/design.md) with layer weights stacked on a leading
axis and run by `lax.scan`, so compile time does not grow with depth. Query heads are an axis of
`wq` / `wo`, which makes a head an index everywhere above this module. Ablation (`head_mask`),
weight transforms (`adapter_fn`: LoRA, gated deltas) and soft prompts (`input_embeds`) all enter
through arguments of the same forward; there is no second code path for them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.models.config import ModelConfig
from cast_jax.models.rope import apply_rope, rope_tables

Params = dict[str, Any]
AdapterFn = Callable[[Params, Any], Params]
COLLECTABLE = ("residual", "attn_write", "mlp_write", "head_out", "final_hidden")


def param_shapes(config: ModelConfig) -> Params:
  """The param pytree as shape tuples (no arrays): the single source of the layout."""
  c = config
  L, D, H, K, Dh, F = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                       c.intermediate_size)
  layers = {
      "attn_norm": (L, D), "wq": (L, D, H, Dh), "wk": (L, D, K, Dh), "wv": (L, D, K, Dh),
      "wo": (L, H, Dh, D), "mlp_norm": (L, D),
      "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
  }
  if c.attention_bias:
    layers.update(bq=(L, H, Dh), bk=(L, K, Dh), bv=(L, K, Dh))
  if c.qk_norm:
    layers.update(q_norm=(L, Dh), k_norm=(L, Dh))
  shapes = {"embed": (c.vocab_size, D), "layers": layers, "final_norm": (D,)}
  if not c.tie_word_embeddings:
    shapes["lm_head"] = (D, c.vocab_size)
  return shapes


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random params: norms at 1, biases at 0, every matrix ~ N(0, std^2). Same layout as loading."""
  shapes = param_shapes(config)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
  keys = jax.random.split(key, len(leaves))
  out = []
  for path, shape, k in zip(paths, leaves, keys):
    if "norm" in path:
      out.append(jnp.ones(shape, dtype))
    elif path.startswith("['layers']['b"):
      out.append(jnp.zeros(shape, dtype))
    else:
      out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
  """RMSNorm over the last axis, statistics in float32 then cast back (as HF does)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * x32.astype(x.dtype)


def _activation(name: str, x: jnp.ndarray) -> jnp.ndarray:
  if name == "silu":
    return jax.nn.silu(x)
  if name == "relu":
    return jax.nn.relu(x)
  return jax.nn.gelu(x, approximate=name != "gelu")


def attention_mask_bias(q_index: jnp.ndarray, kv_valid: jnp.ndarray, window: jnp.ndarray
                        ) -> jnp.ndarray:
  """Boolean [B, T, S]: may query slot q_index[t] read key slot s (causal, valid, in window).

  q_index [T] absolute slot of each query; kv_valid [B, S] (1 real, 0 pad/empty); window a
  scalar (0 = unbounded). Slot order equals time order, so this is HF's index-based rule.
  """
  k_index = jnp.arange(kv_valid.shape[1])
  causal = k_index[None, :] <= q_index[:, None]
  in_window = (window <= 0) | (q_index[:, None] - k_index[None, :] < window)
  return (causal & in_window)[None] & (kv_valid[:, None, :] > 0)


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, allowed: jnp.ndarray) -> jnp.ndarray:
  """Grouped-query attention. q [B, T, H, Dh], k/v [B, S, K, Dh], allowed [B, T, S] -> [B, T, H, Dh].

  Scores and softmax are float32 whatever the param dtype; a row with no allowed key (a pad
  query) gets a uniform distribution instead of NaN.
  """
  B, T, H, Dh = q.shape
  K = k.shape[2]
  qg = q.reshape(B, T, K, H // K, Dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (Dh ** -0.5)
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(B, T, H, Dh)


def _layer(lp: Params, config: ModelConfig, h, cos, sin, window, head_mask, kv_valid, q_index,
           cache_kv, collect):
  """One decoder layer. Returns (h, collected dict, updated (k, v) cache or None)."""
  c = config
  x = rms_norm(h, lp["attn_norm"], c.rms_norm_eps)
  q = jnp.einsum("btd,dhk->bthk", x, lp["wq"])
  k = jnp.einsum("btd,dnk->btnk", x, lp["wk"])
  v = jnp.einsum("btd,dnk->btnk", x, lp["wv"])
  if c.attention_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  if c.qk_norm:
    q = rms_norm(q, lp["q_norm"], c.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], c.rms_norm_eps)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  if cache_kv is not None:
    start = (0, q_index[0], 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), start)
    v_all = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), start)
    new_cache = (k_all, v_all)
  else:
    k_all, v_all, new_cache = k, v, None
  z = attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
             attention_mask_bias(q_index, kv_valid, window))
  if head_mask is not None:
    # Scaling z (not o_proj's output) removes exactly this head's contribution, biases included.
    z = z * head_mask[None, None, :, None].astype(z.dtype)
  attn_write = jnp.einsum("bthk,hkd->btd", z, lp["wo"])
  h_mid = h + attn_write
  x = rms_norm(h_mid, lp["mlp_norm"], c.rms_norm_eps)
  gate = _activation(c.hidden_act, jnp.einsum("btd,df->btf", x, lp["w_gate"]))
  mlp_write = jnp.einsum("btf,fd->btd", gate * jnp.einsum("btd,df->btf", x, lp["w_up"]),
                         lp["w_down"])
  out = h_mid + mlp_write
  available = {"residual": h, "attn_write": attn_write, "mlp_write": mlp_write, "head_out": z}
  return out, {n: available[n] for n in collect if n in available}, new_cache


def _positions_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def _stack(params, config, x, positions, kv_valid, q_index, cache, head_mask, adapter_fn,
           adapter_params, collect, remat):
  """Runs the layer scan and the final norm. Returns (final hidden, collected, new cache)."""
  cos, sin = rope_tables(config, positions)
  windows = jnp.asarray(np.array(config.sliding_windows, np.int32))
  layer_collect = tuple(n for n in collect if n != "final_hidden")

  def body(h, xs):
    lp, window, hm, ap, ckv = xs
    if adapter_fn is not None:
      lp = adapter_fn(lp, ap)
    h, got, new_ckv = _layer(lp, config, h, cos, sin, window, hm, kv_valid, q_index, ckv,
                             layer_collect)
    return h, (got, new_ckv)

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)
  cache_kv = None if cache is None else (cache["k"], cache["v"])
  h, (got, new_kv) = jax.lax.scan(
      body, x, (params["layers"], windows, head_mask, adapter_params, cache_kv))
  h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
  if "final_hidden" in collect:
    got = dict(got, final_hidden=h)
  new_cache = None if new_kv is None else {"k": new_kv[0], "v": new_kv[1]}
  return h, got, new_cache


def unembed(params: Params, config: ModelConfig, h: jnp.ndarray) -> jnp.ndarray:
  """Final hidden [B, T, D] -> float32 logits [B, T, V] (tied or separate head)."""
  if config.tie_word_embeddings:
    logits = jnp.einsum("btd,vd->btv", h, params["embed"])
  else:
    logits = jnp.einsum("btd,dv->btv", h, params["lm_head"])
  return logits.astype(jnp.float32)


def embed(params: Params, input_ids: jnp.ndarray) -> jnp.ndarray:
  """Token ids [B, T] -> embeddings [B, T, D] in the param dtype."""
  return jnp.take(params["embed"], input_ids, axis=0)


def _check_collect(collect: Sequence[str]) -> tuple[str, ...]:
  unknown = [n for n in collect if n not in COLLECTABLE]
  if unknown:
    raise ValueError(f"collect={unknown} unknown; choose from {COLLECTABLE}.")
  return tuple(collect)


def forward(params: Params, config: ModelConfig, input_ids: jnp.ndarray | None = None, *,
            attention_mask: jnp.ndarray | None = None, positions: jnp.ndarray | None = None,
            head_mask: jnp.ndarray | None = None, input_embeds: jnp.ndarray | None = None,
            adapter_fn: AdapterFn | None = None, adapter_params: Any = None,
            collect: Sequence[str] = (), remat: bool = False):
  """Full-sequence forward pass.

  Args:
    params: param pytree (docs/design.md).
    config: the model's ModelConfig (static under jit).
    input_ids: int [B, T]; ignored when `input_embeds` [B, T, D] is given.
    attention_mask: [B, T], 1 real / 0 pad; left padding is handled (positions come from it).
    positions: int [B, T] to override the mask-derived positions.
    head_mask: [L, H] factor on each query head's attention output before o_proj.
    adapter_fn, adapter_params: per-layer weight transform run inside the scan (see design.md).
    collect: intermediates to return, names from COLLECTABLE.
    remat: rematerialise each layer in the backward pass.

  Returns:
    logits float32 [B, T, V], or (logits, {name: array}) when `collect` is non-empty.
  """
  collect = _check_collect(collect)
  x = embed(params, input_ids) if input_embeds is None else input_embeds
  B, T = x.shape[:2]
  mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask
  if positions is None:
    positions = _positions_from_mask(mask)
  h, got, _ = _stack(params, config, x, positions, mask, jnp.arange(T), None, head_mask,
                     adapter_fn, adapter_params, collect, remat)
  logits = unembed(params, config, h)
  return (logits, got) if collect else logits


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Params:
  """Empty KV cache {"k", "v"}: each [L, B, max_len, K, Dh]."""
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward_cached(params: Params, config: ModelConfig, input_ids: jnp.ndarray,
                   positions: jnp.ndarray, kv_valid: jnp.ndarray, cache: Params,
                   cache_index: jnp.ndarray, *, head_mask=None, adapter_fn=None,
                   adapter_params=None, input_embeds=None):
  """Forward for T new tokens written into the cache at slots [cache_index, cache_index + T).

  Args:
    input_ids: int [B, T] (or `input_embeds` [B, T, D]).
    positions: int [B, T] rope positions of the new tokens.
    kv_valid: [B, S] validity of every cache slot after this write (S = cache length).
    cache: from `init_cache` or a previous call.
    cache_index: int scalar, first slot to write.

  Returns:
    (logits float32 [B, T, V], updated cache).
  """
  x = embed(params, input_ids) if input_embeds is None else input_embeds
  q_index = cache_index + jnp.arange(x.shape[1])
  h, _, cache = _stack(params, config, x, positions, kv_valid, q_index, cache, head_mask,
                       adapter_fn, adapter_params, (), False)
  return unembed(params, config, h), cache
