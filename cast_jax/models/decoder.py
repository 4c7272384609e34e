"""The one functional decoder for Llama / Mistral / Qwen2 / Qwen3.

Parameters are a plain dict (layout in docs/design.md) with layer weights stacked on a leading
axis and run by `lax.scan`, so compile time does not grow with depth (small float32 models
unroll it: `MAX_UNROLLED_LAYERS`). Query heads are an axis of `wq` / `wo`, which makes a head an
index everywhere above this module. Ablation (`head_mask`), weight transforms (`adapter_fn`:
LoRA, gated deltas) and soft prompts (`input_embeds`) all enter through arguments of the same
forward; there is no second code path for them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.models.config import ModelConfig
from cast_jax.models.inputs import check_cached_inputs, check_forward_inputs
from cast_jax.models.rope import apply_rope, rope_tables

Params = dict[str, Any]
AdapterFn = Callable[[Params, Any], Params]
COLLECTABLE = ("residual", "attn_write", "mlp_write", "head_out", "final_hidden")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
# Up to this depth a float32 layer loop is unrolled: XLA:CPU ran the 4-layer testbed train step
# ~5% faster unrolled (no zero-filled stacked residual buffers, no while loop) and compile time
# stays small. bf16 keeps the scan: unrolled, XLA fuses across layers and drops bf16 roundings
# between them, so results would drift from the per-layer rounding HF's bf16 reference has.
MAX_UNROLLED_LAYERS = 8


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


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, allowed: jnp.ndarray,
           impl: str = "einsum", causal: bool = False) -> jnp.ndarray:
  """Grouped-query attention. q [B, T, H, Dh], k/v [B, S, K, Dh], allowed [B, T, S] -> [B, T, H, Dh].

  Scores and softmax are float32 whatever the param dtype. `impl` (see `resolve_attention`):
    "einsum": two einsums; a row with no allowed key (a pad query) gets a uniform distribution
      instead of NaN.
    "xla": `jax.nn.dot_product_attention`'s XLA path: the same math and the same pad-row rule.
    "cudnn": cuDNN flash attention (GPU, bf16 / fp16): no [B, H, T, S] scores in memory; a pad
      query row comes out 0 (it is never read). `causal=True` promises `allowed` is causal with
      query t at key slot t (S == T), so cuDNN skips the masked blocks.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention={impl!r}; choose from {ATTENTION_IMPLS} or None (auto).")
  if impl != "einsum":
    mask = allowed[:, None]
    if impl == "cudnn":
      # One mask row per head: cuDNN attention's vmap rule (JAX 0.10-0.11) reshapes a batched
      # mask to [B, H, T, S], so a [B, 1, T, S] one fails under vmap (head-mask sweeps,
      # per-example gradients). The bias cuDNN reads is H times larger for it; still half of
      # the einsum path's fp32 scores.
      mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2]) + allowed.shape[1:])
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                       is_causal=causal and impl == "cudnn")
    if impl == "cudnn":
      # cuDNN applies the mask as a -large bias; zeroing pad rows keeps them finite regardless.
      out = jnp.where(jnp.any(allowed, axis=-1)[:, :, None, None], out, 0).astype(out.dtype)
    return out
  B, T, H, Dh = q.shape
  K = k.shape[2]
  G = H // K
  # The G query heads sharing a kv head are folded into the query axis, [B, K, T*G, S]: with
  # 5-D scores [B, K, G, T, S] XLA:CPU ran this function 2x slower forward and 3x slower with
  # its backward (alone, at the testbed shape; ~3% of the whole train step).
  qg = q.reshape(B, T, K, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, Dh)
  scores = jnp.einsum("bkqd,bskd->bkqs", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (Dh ** -0.5)
  allowed = jnp.broadcast_to(allowed[:, None, :, None], (B, 1, T, G, allowed.shape[-1]))
  scores = jnp.where(allowed.reshape(B, 1, T * G, -1), scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bskd->bkqd", probs, v)
  return out.reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)


@functools.lru_cache(maxsize=64)
def _cudnn_supports(shapes: tuple, dtype: str) -> bool:
  """Whether cuDNN flash attention accepts these (q, k, allowed) shapes, forward and backward.

  Its checks (GPU, cuDNN version, compute capability, head_dim, even lengths with a mask) run
  while tracing, so an abstract trace answers without compiling or running anything.
  """
  q, k, allowed = (jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, (dtype, dtype, bool)))

  def loss(q, k, allowed):
    return attend(q, k, k, allowed, impl="cudnn", causal=True).astype(jnp.float32).sum()

  try:
    jax.eval_shape(jax.grad(loss, argnums=(0, 1)), q, k, allowed)
  except Exception:  # any refusal (NotImplementedError, RuntimeError, ...) means "not here"
    return False
  return True


def resolve_attention(attention: str | None, q_shape: Sequence[int], k_shape: Sequence[int],
                      dtype: Any) -> str:
  """The attention implementation a full-sequence forward uses (see `attend`).

  `attention` given: used as is. None (auto): "cudnn" on a GPU backend for bf16 / fp16
  activations whenever cuDNN accepts the shapes (flash attention, causal blocks skipped);
  otherwise "einsum". On XLA:CPU "xla" (same math, 5-D scores) ran attention's forward and
  backward ~3x slower than "einsum" at the testbed shape, so the CPU default is einsum. Cached
  decoding (`forward_cached`) always uses "einsum": keys in a partly filled cache.

  Args: q_shape [B, T, H, Dh]; k_shape [B, S, K, Dh]; dtype of the activations.
  """
  if attention is not None:
    return attention
  dtype = jnp.dtype(dtype)
  if jax.default_backend() != "gpu" or dtype not in (jnp.bfloat16, jnp.float16):
    return "einsum"
  allowed = (q_shape[0], q_shape[1], k_shape[1])
  ok = _cudnn_supports((tuple(q_shape), tuple(k_shape), allowed), dtype.name)
  return "cudnn" if ok else "einsum"


def _matmul(x: jnp.ndarray, w: jnp.ndarray, in_dims: int = 1) -> jnp.ndarray:
  """x [B, T, *in] @ w [*in, *out] -> [B, T, *out] as one 2-D matmul.

  XLA:CPU runs a [B*T, in] @ [in, out] dot (and, above all, its two backward dots) ~1.8x faster
  than the same contraction written as a 3-D/4-D einsum; both reshapes are free because the
  stored layouts are contiguous, so the param layout keeps a head as an index.
  """
  lead, inner = x.shape[:x.ndim - in_dims], w.shape[:in_dims]
  out = w.shape[in_dims:]
  y = jnp.dot(x.reshape(-1, int(np.prod(inner))), w.reshape(int(np.prod(inner)), -1))
  return y.reshape(*lead, *out)


def _project(x: jnp.ndarray, lp: Params, name: str, in_dims: int = 1) -> jnp.ndarray:
  """x @ lp[name], plus the low-rank term (x @ lp[name + "_lora_a"]) @ lp[name + "_lora_b"] when
  the layer params carry one (an `adapter_fn` adds the two keys, any scale folded into B).

  The activation-side seam: the backward then forms r-wide products only, never the full-size
  gradient of the merged weight that a weight-side transform (wq + A @ B) costs.
  a: [*in, r]; b: [r, *out].
  """
  y = _matmul(x, lp[name], in_dims)
  if name + "_lora_a" in lp:
    y = y + _matmul(_matmul(x, lp[name + "_lora_a"], in_dims), lp[name + "_lora_b"])
  return y


def _layer(lp: Params, config: ModelConfig, h, cos, sin, window, head_mask, kv_valid, q_index,
           cache_kv, collect, attention):
  """One decoder layer. Returns (h, collected dict, updated (k, v) cache or None).

  cache_kv: None, or (k [L, B, S, K, Dh], v, this layer's index): the whole cache is carried
  and this layer's slots are written in place.
  """
  c = config
  x = rms_norm(h, lp["attn_norm"], c.rms_norm_eps)
  # Separate q / k / v dots: fusing them into one [D, (H + 2K) Dh] dot measured no faster.
  q = _project(x, lp, "wq")
  k = _project(x, lp, "wk")
  v = _project(x, lp, "wv")
  if c.attention_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  if c.qk_norm:
    q = rms_norm(q, lp["q_norm"], c.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], c.rms_norm_eps)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  if cache_kv is not None:
    # Written into the carried [L, ...] buffer in place: a per-layer slice in and out of the
    # scan would copy the whole cache (and re-stack it) on every decoding step.
    ck, cv, index = cache_kv
    start = (index, 0, q_index[0], 0, 0)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], start)
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], start)
    k_all, v_all = ck[index], cv[index]
    new_cache = (ck, cv)
  else:
    k_all, v_all, new_cache = k, v, None
  z = attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
             attention_mask_bias(q_index, kv_valid, window), impl=attention,
             causal=cache_kv is None)
  if head_mask is not None:
    # Scaling z (not o_proj's output) removes exactly this head's contribution, biases included.
    z = z * head_mask[None, None, :, None].astype(z.dtype)
  attn_write = _project(z, lp, "wo", in_dims=2)
  h_mid = h + attn_write
  x = rms_norm(h_mid, lp["mlp_norm"], c.rms_norm_eps)
  gate = _activation(c.hidden_act, _project(x, lp, "w_gate"))
  mlp_write = _project(gate * _project(x, lp, "w_up"), lp, "w_down")
  out = h_mid + mlp_write
  available = {"residual": h, "attn_write": attn_write, "mlp_write": mlp_write, "head_out": z}
  return out, {n: available[n] for n in collect if n in available}, new_cache


def _positions_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def _stack(params, config, x, positions, kv_valid, q_index, cache, head_mask, adapter_fn,
           adapter_params, collect, remat, attention="einsum"):
  """Runs the layer scan and the final norm. Returns (final hidden, collected, new cache)."""
  cos, sin = rope_tables(config, positions)
  windows = jnp.asarray(np.array(config.sliding_windows, np.int32))
  layer_collect = tuple(n for n in collect if n != "final_hidden")

  def body(carry, xs):
    h, ckv = carry
    lp, window, hm, ap, index = xs
    if adapter_fn is not None:
      lp = adapter_fn(lp, ap)
    h, got, ckv = _layer(lp, config, h, cos, sin, window, hm, kv_valid, q_index,
                         None if ckv is None else (*ckv, index), layer_collect, attention)
    return (h, ckv), got

  if remat:
    # remat=True saves nothing inside a layer; a policy (jax.checkpoint_policies) chooses, e.g.
    # LCDD recomputes only its masked weights (`carrier_jax.delta.CARRIER_WEIGHT`).
    policy = None if remat is True else remat
    body = jax.checkpoint(body, prevent_cse=False, policy=policy)
  ckv = None if cache is None else (cache["k"], cache["v"])
  (h, ckv), got = jax.lax.scan(
      body, (x, ckv),
      (params["layers"], windows, head_mask, adapter_params, jnp.arange(config.num_layers)),
      unroll=config.num_layers <= MAX_UNROLLED_LAYERS and x.dtype == jnp.float32)
  h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
  if "final_hidden" in collect:
    got = dict(got, final_hidden=h)
  return h, got, None if ckv is None else {"k": ckv[0], "v": ckv[1]}


def unembed(params: Params, config: ModelConfig, h: jnp.ndarray) -> jnp.ndarray:
  """Final hidden [..., D] (e.g. [B, T, D]) -> float32 logits [..., V] (tied or separate head).

  One [N, D] @ [D, V] dot: as a 3-D einsum the unembedding and its gradients ran ~2.7x slower
  on XLA:CPU, and at the testbed shape they are the largest matmuls of a train step.
  """
  lead, D = h.shape[:-1], h.shape[-1]
  h2 = h.reshape(-1, D)
  if config.tie_word_embeddings:
    logits = jax.lax.dot_general(h2, params["embed"], (((1,), (1,)), ((), ())))
  else:
    logits = jnp.dot(h2, params["lm_head"])
  return logits.reshape(*lead, -1).astype(jnp.float32)


def take_positions(h: jnp.ndarray, at: jnp.ndarray) -> jnp.ndarray:
  """Rows of h [B, T, ...] at token indices `at` int [B, N] (or [N] / a scalar, the same for
  every row) -> [B, N, ...]. Negative indices count from the end (-1: the last token)."""
  B, T = h.shape[:2]
  at = jnp.atleast_1d(jnp.asarray(at, jnp.int32))
  at = jnp.broadcast_to(at, (B, at.shape[-1])) % T
  return jnp.take_along_axis(h, at.reshape(B, -1, *([1] * (h.ndim - 2))), axis=1)


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
            collect: Sequence[str] = (), remat: bool | Callable = False, logits_at: Any = None,
            attention: str | None = None):
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
    remat: rematerialise each layer in the backward pass: True recomputes everything, a
      `jax.checkpoint` policy (e.g. `jax.checkpoint_policies.save_anything_except_these_names`)
      recomputes only what it does not save.
    logits_at: int [B, N] (or [N]) token indices; logits are computed only there, [B, N, V]
      (negative: from the end, so -1 is the next-token prediction). Scoring that reads one
      position then never builds the [B, T, V] float32 logits.
    attention: "einsum", "xla" or "cudnn" (see `attend`); None picks by backend
      (`resolve_attention`).

  Returns:
    logits float32 [B, T, V] ([B, N, V] with `logits_at`), or (logits, {name: array}) when
    `collect` is non-empty.
  """
  check_forward_inputs(config, input_ids, attention_mask=attention_mask, positions=positions,
                       head_mask=head_mask, input_embeds=input_embeds)
  collect = _check_collect(collect)
  x = embed(params, input_ids) if input_embeds is None else input_embeds
  B, T = x.shape[:2]
  mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask
  if positions is None:
    positions = _positions_from_mask(mask)
  c = config
  attention = resolve_attention(attention, (B, T, c.num_heads, c.head_dim),
                                (B, T, c.num_kv_heads, c.head_dim), x.dtype)
  h, got, _ = _stack(params, config, x, positions, mask, jnp.arange(T), None, head_mask,
                     adapter_fn, adapter_params, collect, remat, attention)
  logits = unembed(params, config, h if logits_at is None else take_positions(h, logits_at))
  return (logits, got) if collect else logits


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Params:
  """Empty KV cache {"k", "v"}: each [L, B, max_len, K, Dh]."""
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward_cached(params: Params, config: ModelConfig, input_ids: jnp.ndarray,
                   positions: jnp.ndarray, kv_valid: jnp.ndarray, cache: Params,
                   cache_index: jnp.ndarray, *, head_mask=None, adapter_fn=None,
                   adapter_params=None, input_embeds=None, logits_at=None):
  """Forward for T new tokens written into the cache at slots [cache_index, cache_index + T).

  Args:
    input_ids: int [B, T] (or `input_embeds` [B, T, D]).
    positions: int [B, T] rope positions of the new tokens.
    kv_valid: [B, S] validity of every cache slot after this write (S = cache length).
    cache: from `init_cache` or a previous call.
    cache_index: int scalar, first slot to write.
    logits_at: as in `forward` (a prefill that only needs the next token: -1).

  Returns:
    (logits float32 [B, T, V] ([B, N, V] with `logits_at`), updated cache).
  """
  check_cached_inputs(config, input_ids, positions, kv_valid, cache, head_mask=head_mask,
                      input_embeds=input_embeds)
  x = embed(params, input_ids) if input_embeds is None else input_embeds
  q_index = cache_index + jnp.arange(x.shape[1])
  h, _, cache = _stack(params, config, x, positions, kv_valid, q_index, cache, head_mask,
                       adapter_fn, adapter_params, (), False)
  h = h if logits_at is None else take_positions(h, logits_at)
  return unembed(params, config, h), cache
