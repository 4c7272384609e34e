"""Batched KV-cache generation (greedy or temperature / top-p sampling), one jit per shape bucket.

Prompts are left padded so every row's next token is written to the same cache slot; the
prompt length is rounded up to a bucket so a stream of prompts compiles only a few programs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.models.config import ModelConfig
from cast_jax.models.decoder import AdapterFn, Params, forward_cached, init_cache
from cast_jax.models.inputs import InputError, check_forward_inputs, check_token_ids


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """tokens int32 [B, N]: generated ids, pad after a row's first EOS (kept); lengths int32 [B].

  Under a stack of M head masks both gain a leading [M] axis (`trimmed` is for [B, N] only).
  """

  tokens: np.ndarray
  lengths: np.ndarray

  def trimmed(self) -> list[list[int]]:
    """Per-row generated ids up to and including the first EOS."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def _argmax(logits: jnp.ndarray) -> jnp.ndarray:
  """jnp.argmax over the last axis (first maximum wins) as two plain reductions, int32.

  XLA:CPU lowers argmax to a variadic (value, index) reduction that ran ~6x slower than a max
  followed by a min over the indices holding it ([64, 4096]: 1.2 ms vs 0.2 ms a decoding step).
  A row without a maximum (NaN) gets the last id instead of the NaN's position.
  """
  V = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(logits == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first, V - 1)


def _select(logits: jnp.ndarray, key: jax.Array, temperature: float, top_p: float) -> jnp.ndarray:
  """Next token [B] from float32 logits [B, V]: argmax if temperature == 0, else nucleus sample."""
  if temperature == 0.0:
    return _argmax(logits)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is below top_p; the first token is always kept.
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


_STATIC = ("config", "max_new_tokens", "eos", "pad", "temperature", "top_p", "adapter_fn",
           "cache_sharding")


def _generate_impl(params, input_ids, attention_mask, key, head_mask, adapter_params,
                   input_embeds=None, *,
                   config: ModelConfig, max_new_tokens: int, eos: tuple[int, ...], pad: int,
                   temperature: float, top_p: float, adapter_fn: AdapterFn | None,
                   cache_sharding: Any):
  """The decoding program: (tokens [*M, B, N], lengths [*M, B]) for head_mask None, [L, H] or a
  stack [M, L, H] (the same prompts decoded under each of M masks). With a stack, input_ids and
  attention_mask may be [M, B, P]: mask m then decodes its own prompts (the divergence sweep's
  resumed pairs, `diagnosis.divergence_decode`). With `input_embeds` [B, P, D] the prefill reads
  those embeddings instead of embedding input_ids (soft prompts / triggers); decoding then
  embeds the generated tokens as usual.

  Under a stack only the model calls are vmapped over the masks; the decoding loop stays one
  unbatched `while_loop` over all M * B rows. Vmapping the whole loop instead makes its stop
  condition a batched predicate, and JAX then guards every carried array (the whole KV cache
  included) with a select on every step: that copy cost more than the decoding step itself on
  the testbed model. Sampling draws the same numbers for every mask (one key per step), as a
  vmap of the single-mask program does.
  """
  stacked = head_mask is not None and jnp.ndim(head_mask) == 3
  own = input_ids.ndim == 3  # [M, B, P]: each mask its own prompts
  B, P = input_ids.shape[-2:]
  N = max_new_tokens
  kv_valid = jnp.concatenate(
      [attention_mask, jnp.zeros((*attention_mask.shape[:-1], N), attention_mask.dtype)], axis=-1)
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
  extra = dict(adapter_fn=adapter_fn, adapter_params=adapter_params)

  def prefill(hm, input_ids, positions, kv_valid):
    cache = init_cache(config, B, P + N, params["embed"].dtype)
    if cache_sharding is not None:
      cache = jax.lax.with_sharding_constraint(cache, {"k": cache_sharding, "v": cache_sharding})
    # The prefill's only logits read are the last position's (the first generated token).
    logits, cache = forward_cached(params, config, None if input_embeds is not None else input_ids,
                                   positions, kv_valid, cache, 0, logits_at=[-1], head_mask=hm,
                                   input_embeds=input_embeds, **extra)
    return logits[:, 0], cache

  def step(tok, cache, kv_valid, i, hm, positions):
    pos = (positions[:, -1] + 1 + i)[:, None]
    logits, cache = forward_cached(params, config, tok[:, None], pos, kv_valid, cache, P + i,
                                   head_mask=hm, **extra)
    return logits[:, 0], cache

  def select(logits, k):
    return _select(logits, k, temperature, top_p)

  lead = ()
  if stacked:
    lead = (head_mask.shape[0],)
    p_ax = 0 if own else None
    prefill = jax.vmap(prefill, in_axes=(0, p_ax, p_ax, p_ax))
    select = jax.vmap(select, in_axes=(0, None))
    step = jax.vmap(step, in_axes=(0, 0, p_ax, None, 0, p_ax))
  logits, cache = prefill(head_mask, input_ids, positions, kv_valid)
  eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

  def cond(state):
    i, _, _, _, done, *_ = state
    return (i < N) & ~jnp.all(done)

  def body(state):
    i, next_logits, cache, kv_valid, done, tokens, lengths = state
    tok = select(next_logits, jax.random.fold_in(key, i))
    tok = jnp.where(done, pad, tok)
    tokens = tokens.at[..., i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos_arr)
    kv_valid = kv_valid.at[..., P + i].set(1)
    step_logits, cache = step(tok, cache, kv_valid, i, head_mask, positions)
    return i + 1, step_logits, cache, kv_valid, done, tokens, lengths

  state = (jnp.int32(0), logits, cache, kv_valid, jnp.zeros((*lead, B), bool),
           jnp.full((*lead, B, N), pad, jnp.int32), jnp.zeros((*lead, B), jnp.int32))
  *_, tokens, lengths = jax.lax.while_loop(cond, body, state)
  return tokens, lengths


_generate = jax.jit(_generate_impl, static_argnames=_STATIC)


def _bucket(n: int, bucket: int) -> int:
  return max(bucket, -(-n // bucket) * bucket)


def generate(params: Params, config: ModelConfig, input_ids=None, attention_mask=None, *,
             max_new_tokens: int, input_embeds: Any = None,
             eos_token_ids: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None, head_mask: jnp.ndarray | None = None,
             adapter_fn: AdapterFn | None = None, adapter_params: Any = None,
             prompt_bucket: int = 32, cache_sharding: Any = None) -> GenerateOutput:
  """Generates up to `max_new_tokens` per row.

  Args:
    input_ids: int [B, P] left-padded prompts; attention_mask [B, P] (1 real, 0 pad).
    input_embeds: float [B, P, D] left-padded prompt embeddings used instead of input_ids (a
      soft trigger inserted into embedded prompts, `carrier_jax.trigger`): the prefill reads
      them, decoding embeds the generated tokens; pass input_ids=None. Not with a mask stack.
    eos_token_ids: stop ids (default: the config's); a row stops after emitting one.
    pad_token_id: filler after a row stops (default: config's pad, else 0).
    temperature: 0 for greedy; > 0 samples with `key` (required then), restricted to top_p mass.
    head_mask [L, H], adapter_fn / adapter_params: as in `forward`. A stack of masks
      [M, L, H] decodes the same prompts under each mask in one vmapped program (batched
      ablation); tokens are then [M, B, max_new_tokens] and lengths [M, B].
    prompt_bucket: P is left-padded up to a multiple of this to bound recompilation.
    cache_sharding: optional sharding of the KV cache (`sharding.cache_sharding`); params and
      prompts keep whatever sharding they arrive with.

  Returns:
    GenerateOutput with tokens [B, max_new_tokens] and lengths [B] (max_new_tokens=0: tokens
    [B, 0], lengths all 0); with a mask stack, [M, B, max_new_tokens] and [M, B].

  Raises:
    InputError (a ValueError): ids outside [0, vocab_size), mismatched mask / head_mask shapes,
      max_new_tokens not an integer >= 0, pad id outside the vocabulary.
  """
  if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
      or max_new_tokens < 0):
    raise InputError(f"generate: max_new_tokens={max_new_tokens!r}; use an integer >= 0 (0 "
                     "returns tokens of shape [B, 0]).")
  if input_embeds is not None:
    if input_ids is not None:
      raise ValueError("generate: pass input_ids or input_embeds, not both.")
    if np.ndim(input_embeds) != 3 or np.shape(input_embeds)[-1] != config.hidden_size:
      raise ValueError(f"input_embeds must be [batch, prompt_len, hidden_size="
                       f"{config.hidden_size}]; got {np.shape(input_embeds)}.")
    if head_mask is not None and np.ndim(head_mask) == 3:
      raise ValueError("generate: input_embeds with a stack of head masks is not supported; "
                       "decode one [L, H] mask at a time.")
    # Only the shape of the ids is read below (checks, bucketing); the prefill reads the embeds.
    input_ids = np.zeros(np.shape(input_embeds)[:2], np.int32)
  elif input_ids is None:
    raise ValueError("generate: pass input_ids [B, P] (or input_embeds [B, P, D]).")
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2 or input_ids.shape[1] == 0:
    raise ValueError(f"input_ids must be [batch, prompt_len] with prompt_len > 0; got {input_ids.shape}.")
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask {mask.shape} must match input_ids {input_ids.shape}.")
  head_masks = None
  if head_mask is not None and np.ndim(head_mask) == 3:
    # Each mask of the stack is checked as the [L, H] it will be inside the vmap.
    head_masks, head_mask = head_mask, head_mask[0]
  check_forward_inputs(config, input_ids, attention_mask=mask, head_mask=head_mask,
                       where="generate")
  input_ids = input_ids.astype(np.int32)
  if np.any(mask[:, -1] == 0):
    raise ValueError("prompts must be left padded (attention_mask[:, -1] must be 1 for every row).")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}.")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs an explicit PRNG key.")
  if eos_token_ids is None:
    eos_token_ids = config.eos_token_ids
  eos = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(int(e) for e in eos_token_ids)
  pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
  # The pad id is embedded too (prompt padding, rows after EOS): out of range it would be NaN.
  check_token_ids(np.asarray(pad), config.vocab_size, name="pad_token_id", where="generate")
  B, P = input_ids.shape
  lead = () if head_masks is None else (int(np.shape(head_masks)[0]),)
  if max_new_tokens == 0:
    return GenerateOutput(np.zeros((*lead, B, 0), np.int32), np.zeros((*lead, B), np.int32))
  extra_pad = _bucket(P, prompt_bucket) - P
  input_ids = np.pad(input_ids, ((0, 0), (extra_pad, 0)), constant_values=pad)
  mask = np.pad(mask, ((0, 0), (extra_pad, 0)))
  if input_embeds is not None:
    # Bucket padding as zero embeddings: masked out like pad tokens.
    input_embeds = jnp.pad(jnp.asarray(input_embeds), ((0, 0), (extra_pad, 0), (0, 0)))
  tokens, lengths = _generate(
      params, jnp.asarray(input_ids), jnp.asarray(mask),
      jax.random.PRNGKey(0) if key is None else key,
      head_mask if head_masks is None else head_masks, adapter_params, input_embeds,
      config=config, max_new_tokens=int(max_new_tokens), eos=eos, pad=int(pad),
      temperature=float(temperature), top_p=float(top_p), adapter_fn=adapter_fn,
      cache_sharding=cache_sharding)
  return GenerateOutput(np.asarray(tokens), np.asarray(lengths))
