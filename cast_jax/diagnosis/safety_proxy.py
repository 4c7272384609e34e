"""A teacher-forced proxy for H_safe (issue 9 item 6): the log-probability of refusal openings
given each harmful prompt, under every single-head ablation, instead of generating.

H_safe_proxy(h) = |lp(ablated h) - lp(base)|, lp = the mean log-probability per target token
over the whole set (sum of every target token's log-prob / number of target tokens), i.e. the
change of -L_safe when the targets are the calibration refusals. One forward per chunk and
mask, no decoding loop, so it costs about what the MCQ sweep costs.

It runs like `sensitivity.mcq_sweep`: the residual stream entering each layer is computed once
per chunk and layer (the targets are teacher-forced, so the tokens below layer l do not depend on masks
of layers >= l, unlike generation), layer l's H masks run layers [l, L) only, vmapped, and only
the K positions that predict target tokens are unembedded (`logits_at`).

Sequences (prompt + opening tokens) are left padded, so the k_n targets of row n are its last
k_n tokens, predicted by the logits at [-k_n - 1, -1); a chunk reads the last K_c + 1 positions,
K_c = min(max k over all rows, chunk length - 1), and weights the ones beyond a row's k_n by 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax import data
from cast_jax.data.chat import special_token_ids
from cast_jax.diagnosis import layer_sweep
from cast_jax.diagnosis.head_ablation import num_units
from cast_jax.diagnosis.mask_sharding import map_over_masks, mask_mesh
from cast_jax.diagnosis.sensitivity import layer_unit_masks
from cast_jax.models import ModelConfig
from cast_jax.models.decoder import Params
from cast_jax.models.layer_skip import forward_from_any_layer, hidden_at_layer

DEFAULT_OPENINGS = ("I'm sorry", "I can't")


def proxy_examples(tokenizer: Any, prompts: Sequence[str], openings: Sequence[str], *,
                   per_prompt: bool = False, system: str | None = None,
                   template_kwargs: Mapping[str, Any] | None = None
                   ) -> tuple[list[list[int]], np.ndarray]:
  """Token lists of every (prompt, opening) pair, and how many trailing tokens are scored.

  Args:
    prompts: P raw harmful requests (rendered with the chat template here).
    openings: R openings scored after every prompt (e.g. DEFAULT_OPENINGS), or with
      `per_prompt` P responses, one per prompt (e.g. D_safe's calibration refusals).
  Returns:
    (N token lists, each prompt + opening; int32 [N] target counts k_n >= 1), N = P * R
    (prompt-major) or P (`per_prompt`). The end-of-turn token SFT trains after a response is
    not a target: an opening is the start of a reply, not a whole one.
  """
  if not prompts or not openings:
    raise ValueError("proxy_examples: need at least one prompt and one opening")
  if per_prompt and len(openings) != len(prompts):
    raise ValueError(f"proxy_examples: per_prompt needs one opening per prompt, got "
                     f"{len(openings)} for {len(prompts)}")
  pairs = (list(zip(prompts, openings)) if per_prompt
           else [(p, o) for p in prompts for o in openings])
  specials = special_token_ids(tokenizer)
  seqs, counts = [], []
  for p, o in pairs:
    ids, mask = data.encode_example(tokenizer, p, o, system=system,
                                    template_kwargs=template_kwargs)
    ids, mask = list(map(int, ids)), np.asarray(mask)
    end = len(ids)
    while end > 0 and mask[end - 1] and ids[end - 1] in specials:
      end -= 1
    k = int(mask[:end].sum())
    if k < 1:
      raise ValueError(f"proxy_examples: opening {o!r} encodes to no scorable token")
    seqs.append(ids[:end])
    counts.append(k)
  return seqs, np.asarray(counts, np.int32)


def _target_logprobs(logits, input_ids, weights):
  """Weighted sum [B] of log p(token t | < t) over the last K tokens; logits [B, K, V] predict
  input_ids[:, -K:], weights [B, K]."""
  k = logits.shape[1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  got = jnp.take_along_axis(logp, input_ids[:, -k:, None], axis=-1)[..., 0]
  return (got * weights).sum(-1)


@functools.partial(jax.jit, static_argnames=("config", "mask_block", "k", "mesh"))
def _layer_pass(params, config, layer, input_ids, attention_mask, weights, masks, *,
                mask_block, k, mesh):
  """Target log-prob sums [M, B] under each of M masks [M, L, H] of units of `layer` (int32
  scalar, traced: one program for every layer, and the base with all-ones masks): the residual
  entering `layer` once (`hidden_at_layer`), then layers [layer, L) per mask, the last layer for
  the scored positions only (`forward_from_any_layer`)."""
  at = list(range(-k - 1, -1))
  hidden = hidden_at_layer(params, config, input_ids, layer, attention_mask=attention_mask)

  def one(hm, params, hidden, layer, input_ids, attention_mask, weights):
    logits = forward_from_any_layer(params, config, hidden, layer, attention_mask=attention_mask,
                                    head_mask=hm, logits_at=at)
    return _target_logprobs(logits, input_ids, weights)

  return map_over_masks(one, masks, (params, hidden, layer, input_ids, attention_mask, weights),
                        batch_size=mask_block, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class ProxySweep:
  """base_logprob float64 [N] and logprob [L, U, N] (unit (l, u) zeroed): each row's summed
  target-token log-probs; n_targets int [N] target tokens per row."""
  base_logprob: np.ndarray
  logprob: np.ndarray
  n_targets: np.ndarray

  @property
  def base_mean(self) -> float:
    """Mean log-prob per target token of the unablated model over the set."""
    return float(self.base_logprob.sum() / self.n_targets.sum())

  @property
  def mean(self) -> np.ndarray:
    """float64 [L, U]: the same under each unit ablation."""
    return self.logprob.sum(-1) / self.n_targets.sum()

  @property
  def h_safe(self) -> np.ndarray:
    """|lp(ablated) - lp(base)|, the teacher-forced H_safe proxy: float64 [L, U]."""
    return np.abs(self.mean - self.base_mean)


def proxy_safety_sweep(params: Params, config: ModelConfig, sequences: Sequence[Sequence[int]],
                       n_targets, *, pad_id: int, batch_size: int = 16,
                       mask_block: int | None = None, group: int = 1,
                       layer_block: int | None = None,
                       done: Mapping[str, np.ndarray] | None = None,
                       on_block: Callable[[str, np.ndarray], None] | None = None,
                       progress: Callable[[float], None] | None = None,
                       devices: Any = None) -> ProxySweep:
  """Teacher-forced refusal log-probs on D_safe under every unit ablation.

  Args:
    sequences: N token lists, prompt + refusal opening (`proxy_examples`).
    n_targets: int [N], k_n >= 1: the last k_n tokens of row n are the scored targets.
    pad_id: id used for left padding (masked out).
    batch_size: rows per chunk (length-sorted, fixed-shape: `eval.batching.prompt_chunks`).
    mask_block: masks vmapped at once within a layer (default: all U units of the layer).
    group: query heads per ablation unit (must divide H); U = H // group.
    layer_block, done, on_block, progress: resumable blocks of layers (`layer_sweep.run`):
      done {key: float64 [b - a, U, N]}, on_block(key, logprob [b - a, U, N]).
    devices: the devices each layer's masks are split over (default all; one: unsharded).
  Returns:
    ProxySweep; logprob[l, u] equals teacher forcing with head_mask zero on unit (l, u) only.
  """
  U = num_units(config, group)
  n_targets = np.asarray(n_targets, np.int64)
  N = len(sequences)
  if n_targets.shape != (N,) or (n_targets < 1).any():
    raise ValueError(f"proxy_safety_sweep: n_targets must be [N={N}] of ints >= 1")
  if any(len(s) <= k for s, k in zip(sequences, n_targets)):
    raise ValueError("proxy_safety_sweep: every row needs >= 1 prompt token before its targets")
  block = U if mask_block is None else int(mask_block)
  mesh = mask_mesh(devices)
  k_max = int(n_targets.max())
  chunks = layer_sweep.prompt_chunks(sequences, batch_size, pad_id)
  for chunk in chunks:
    k = min(k_max, chunk.input_ids.shape[1] - 1)  # every row here is longer than its own k_n
    ks = n_targets[layer_sweep.rows(chunk)]
    chunk.extra.update(k=k, weights=jnp.asarray(
        (np.arange(k)[None] >= k - ks[:, None]).astype(np.float32)))

  def layer_fn(c, layer, masks):
    return _layer_pass(params, config, jnp.int32(layer), c.input_ids, c.attention_mask,
                       c.extra["weights"], masks, mask_block=block, k=c.extra["k"], mesh=mesh)

  ones = jnp.ones((U, config.num_layers, config.num_heads), jnp.float32)

  def base_fn(c):  # the same program: all-ones masks from the last layer
    return layer_fn(c, config.num_layers - 1, ones)[0]

  base, out = layer_sweep.run(
      params, config, chunks, N, base_fn=base_fn, layer_fn=layer_fn,
      layer_masks=lambda layer: jnp.asarray(layer_unit_masks(config, layer, group)), group=group,
      dtype=np.float64, layer_block=layer_block, done=done, on_block=on_block, progress=progress)
  return ProxySweep(base, out, n_targets)
