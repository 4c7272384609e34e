"""Functional sensitivity of CAST section 3.3: the single-head zero-ablation sweep.

H_gen(h) = |Acc(ablated h) - Acc(base)| on D_util (letter-restricted MCQ, the logits of the last
prompt position only) and H_safe(h) = |Ref(ablated h) - Ref(base)| on D_safe (refusal rate of
greedy generations, judged by a pluggable `eval.refusal.Judge`). Head masks are jit inputs, so
a block of masks runs as one vmapped program and each shape compiles once.

Layer skipping (MCQ half): the residual stream entering layer l is the same under every mask
that only zeroes heads of layers >= l, so it is computed once per prompt chunk and layer
(`models.layer_skip.hidden_at_layer`) and the masks of layer l's heads run layers [l, L) only
(`forward_from_any_layer`): on average half the layers of a full forward, in one compiled
program for every layer and the base (the layer is traced), the last layer for the scored last
position only.

Safety half (`method`): step-by-step decoding cannot skip layers (every step below l reads
tokens the ablation above changed), so the default "divergence" method decodes the base once,
checks each (mask, prompt) pair against that continuation with one teacher-forced, layer-skipped
forward and decodes only the pairs that part from it, from where they part
(`divergence_decode`; equal to the step-by-step "decode" method up to float ties, see there).

Ablation units (`group`): unit u of layer l zeroes query heads [u * group, (u + 1) * group)
(`head_ablation.unit_masks`); results are [L, H // group, ...]. Resume: both sweeps take the
blocks an earlier run finished (`done`) and report each new one (`on_block`): blocks of layers
for the MCQ sweep (`layer_sweep`), blocks of `mask_block` masks for the safety sweep. With
several devices each block of masks is split over them (`mask_sharding`); with one, the
program is the plain vmapped one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax import generate as gen
from cast_jax.diagnosis import divergence_decode as dd
from cast_jax.diagnosis import layer_sweep
from cast_jax.diagnosis.calibration import MCQSet
from cast_jax.diagnosis.head_ablation import num_units, unit_masks
from cast_jax.diagnosis.mask_sharding import map_over_masks, mask_mesh
from cast_jax.eval import batching, mcq
from cast_jax.eval.refusal import Judge, Verdict, score_refusals
from cast_jax.models import ModelConfig
from cast_jax.models.decoder import Params
from cast_jax.models.layer_skip import forward_from_any_layer, hidden_at_layer


def layer_head_masks(config: ModelConfig, layer: int, group: int = 1) -> jnp.ndarray:
  """float32 [U, L - layer, H], U = H // group: mask u zeroes unit u of `layer` (query heads
  [u * group, (u + 1) * group)), over the layers [layer, L)."""
  L, H, U = config.num_layers, config.num_heads, num_units(config, group)
  if not 0 <= layer < L:
    raise ValueError(f"layer_head_masks: layer={layer} outside [0, {L})")
  masks = np.ones((U, L - layer, H), np.float32)
  for u in range(U):
    masks[u, 0, u * group:(u + 1) * group] = 0.0
  return jnp.asarray(masks)


def layer_unit_masks(config: ModelConfig, layer: int, group: int = 1) -> np.ndarray:
  """float32 [U, L, H]: mask u zeroes unit u of `layer` only (every layer's row present, the
  form `forward_from_any_layer` takes)."""
  L, U = config.num_layers, num_units(config, group)
  if not 0 <= layer < L:
    raise ValueError(f"layer_unit_masks: layer={layer} outside [0, {L})")
  return unit_masks(config, group)[layer * U:(layer + 1) * U]


@functools.partial(jax.jit, static_argnames=("config", "mask_block", "mesh"))
def _layer_pass(params, config, input_ids, layer, attention_mask, choice_ids, masks, *,
                mask_block, mesh):
  """Letter predictions [U, B] under masks [U, L, H] of units of `layer` (int32 scalar, traced:
  one program for every layer, and the base model with all-ones masks): the residual entering
  `layer` once (`hidden_at_layer`), then layers [layer, L) per mask, the last layer for the last
  position only (`forward_from_any_layer`)."""
  hidden = hidden_at_layer(params, config, input_ids, layer, attention_mask=attention_mask)

  def one(hm, params, hidden, layer, attention_mask, choice_ids):
    logits = forward_from_any_layer(params, config, hidden, layer, attention_mask=attention_mask,
                                    head_mask=hm, logits_at=[-1])
    return mcq.restricted_argmax(logits[:, 0], choice_ids)

  return map_over_masks(one, masks, (params, hidden, layer, attention_mask, choice_ids),
                        batch_size=mask_block, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class MCQSweep:
  """base_predictions [N], predictions [L, U, N] (unit (l, u) zeroed), answers [N]: int32."""
  base_predictions: np.ndarray
  predictions: np.ndarray
  answers: np.ndarray

  @property
  def base_accuracy(self) -> float:
    return float((self.base_predictions == self.answers).mean())

  @property
  def accuracy(self) -> np.ndarray:
    """float64 [L, U]."""
    return (self.predictions == self.answers).mean(axis=-1)

  @property
  def h_gen(self) -> np.ndarray:
    """|Acc(ablated) - Acc(base)|, Eq. 3: float64 [L, U]."""
    return np.abs(self.accuracy - self.base_accuracy)


def mcq_sweep(params: Params, config: ModelConfig, mcq_set: MCQSet, *, pad_id: int,
              batch_size: int = 16, mask_block: int | None = None, group: int = 1,
              layer_block: int | None = None, done: Mapping[str, np.ndarray] | None = None,
              on_block: Callable[[str, np.ndarray], None] | None = None,
              progress: Callable[[float], None] | None = None, devices: Any = None) -> MCQSweep:
  """Letter predictions on D_util under every unit ablation, with layer skipping.

  Args:
    mcq_set: from `calibration.util_calibration`.
    pad_id: id used for left padding (masked out).
    batch_size: prompts per chunk (chunks are length-sorted, fixed-shape: `eval.batching`).
    mask_block: masks vmapped at once within a layer (default: all U units of the layer).
    group: query heads per ablation unit (must divide H); U = H // group.
    layer_block, done, on_block, progress: resumable blocks of layers (`layer_sweep.run`):
      done {key: int32 [b - a, U, N]}, on_block(key, predictions [b - a, U, N]).
    devices: the devices each layer's masks are split over (default all; one: unsharded).
  Returns:
    MCQSweep; predictions[l, u] equals scoring with head_mask zero on unit (l, u) only.
  """
  U = num_units(config, group)
  block = U if mask_block is None else int(mask_block)
  mesh = mask_mesh(devices)
  chunks = layer_sweep.prompt_chunks(mcq_set.prompt_ids, batch_size, pad_id)
  for chunk in chunks:
    chunk.extra["choice"] = jnp.asarray(mcq_set.choice_ids[layer_sweep.rows(chunk)])

  def layer_fn(chunk, layer, masks):
    return _layer_pass(params, config, chunk.input_ids, jnp.int32(layer), chunk.attention_mask,
                       chunk.extra["choice"], masks, mask_block=block, mesh=mesh)

  ones = jnp.ones((U, config.num_layers, config.num_heads), jnp.float32)

  def base_fn(chunk):  # the same program: all-ones masks from the last layer
    return layer_fn(chunk, config.num_layers - 1, ones)[0]

  base, preds = layer_sweep.run(
      params, config, chunks, len(mcq_set.prompt_ids), base_fn=base_fn, layer_fn=layer_fn,
      layer_masks=lambda layer: jnp.asarray(layer_unit_masks(config, layer, group)), group=group,
      dtype=np.int32, layer_block=layer_block, done=done, on_block=on_block, progress=progress)
  return MCQSweep(base, preds, np.asarray(mcq_set.answers, np.int32))


def _eos_ids(config: ModelConfig, tokenizer: Any) -> list[int]:
  eos = set(config.eos_token_ids)
  if getattr(tokenizer, "eos_token_id", None) is not None:
    eos.add(int(tokenizer.eos_token_id))
  return sorted(eos)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos", "pad", "mesh"))
def _sharded_greedy(params, input_ids, attention_mask, masks, *, config, max_new_tokens, eos, pad,
                    mesh):
  """Greedy tokens [M, B, N] and lengths [M, B] under masks [M, L, H], the masks split over
  `mesh` and each device decoding its share as one vmapped loop (`generate`'s own program)."""

  def one(hm, params, input_ids, attention_mask):
    return gen._generate_impl(params, input_ids, attention_mask, jax.random.PRNGKey(0), hm, None,
                              config=config, max_new_tokens=max_new_tokens, eos=eos, pad=pad,
                              temperature=0.0, top_p=1.0, adapter_fn=None, cache_sharding=None)

  return map_over_masks(one, masks, (params, input_ids, attention_mask),
                        batch_size=masks.shape[0], mesh=mesh)


def _greedy_under_masks(params, config, chunk, block, *, max_new_tokens, eos, pad, mesh):
  """(tokens [M, B, N], lengths [M, B]) numpy: greedy decoding of one chunk under M masks."""
  if mesh is None:
    out = gen.generate(params, config, chunk.input_ids, chunk.attention_mask,
                       max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pad,
                       head_mask=jnp.asarray(block), prompt_bucket=1)
    return out.tokens, out.lengths
  # Same checks as the unsharded path (ids, mask shapes, pad id); then the sharded program.
  gen.generate(params, config, chunk.input_ids, chunk.attention_mask, max_new_tokens=0,
               eos_token_ids=eos, pad_token_id=pad, head_mask=jnp.asarray(block[0]))
  tokens, lengths = _sharded_greedy(
      params, jnp.asarray(chunk.input_ids, jnp.int32), jnp.asarray(chunk.attention_mask,
                                                                   jnp.int32),
      jnp.asarray(block), config=config, max_new_tokens=int(max_new_tokens), eos=tuple(eos),
      pad=int(pad), mesh=mesh)
  return np.asarray(tokens), np.asarray(lengths)


METHODS = ("divergence", "decode")
# The safety sweep's divergence path switches to step-by-step decoding for the rest of the sweep
# once a block leaves more than this fraction of the decoding steps to its parted pairs (the
# teacher-forced pass costs about a third of a decode of the same tokens on the testbed and
# the 135M shape, so past about a half the plain path is faster). Results are the same.
AUTO_PLAIN = 0.5


def _check_decode_args(masks, config, mask_block, max_new_tokens, method, where):
  L, H = config.num_layers, config.num_heads
  if masks.ndim != 3 or masks.shape[1:] != (L, H):
    raise ValueError(f"{where}: head_masks must be [M, L={L}, H={H}], got {masks.shape}")
  if int(mask_block) < 1:
    raise ValueError(f"{where}: mask_block={mask_block} must be >= 1")
  if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
      or max_new_tokens < 0):
    raise ValueError(f"{where}: max_new_tokens={max_new_tokens!r}; use an integer >= 0 (0 gives "
                     "empty responses)")
  if method not in METHODS:
    raise ValueError(f"{where}: method={method!r}; use one of {METHODS}")


def _plain_tokens(params, config, prompt_ids, masks, *, max_new_tokens, eos, pad_id, batch_size,
                  mask_block, mesh):
  """tokens [M, N, G], lengths [M, N]: every (mask, prompt) pair decoded step by step."""
  M, N = masks.shape[0], len(prompt_ids)
  tokens = np.full((M, N, max_new_tokens), pad_id, np.int32)
  lengths = np.zeros((M, N), np.int32)
  for chunk in batching.prompt_chunks(prompt_ids, batch_size, pad_id, multiple=dd.MULTIPLE):
    real = len(chunk.indices)
    for start in range(0, M, mask_block):
      block = masks[start:start + mask_block]
      m = len(block)
      block = np.concatenate([block, np.repeat(block[:1], mask_block - m, axis=0)])
      t, n = _greedy_under_masks(params, config, chunk, block, max_new_tokens=max_new_tokens,
                                 eos=eos, pad=pad_id, mesh=mesh)
      tokens[start:start + m, chunk.indices] = t[:m, :real]
      lengths[start:start + m, chunk.indices] = n[:m, :real]
  return tokens, lengths


def _block_tokens(params, config, prompt_ids, masks, blocks, *, max_new_tokens, eos, pad_id,
                  batch_size, mask_block, mesh, method):
  """Yields (key, start, end, tokens [end - start, N, G], lengths [end - start, N]) for each
  block (key, start, end) of masks [M, L, H], in order, by `method`.

  "divergence": the base is decoded once; parted pairs of consecutive blocks decode together
  in whole groups (a block is yielded once all of its pairs are done); once a block would leave
  more than AUTO_PLAIN of its decoding steps to parted pairs, it and the rest decode step by
  step (cheaper then; the same outputs).
  """
  kw = dict(max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id, batch_size=batch_size,
            mask_block=mask_block, mesh=mesh)
  group_size = mask_block * batch_size
  plain = method == "decode"
  runs, pending = None, []  # pending: (key, start, end, dd.Pending) not yet yielded
  for i, (key, s, e) in enumerate(blocks):
    if not plain:
      if runs is None:
        runs = dd.base_runs(params, config, prompt_ids, max_new_tokens=max_new_tokens, eos=eos,
                            pad_id=pad_id, batch_size=batch_size, group_size=group_size)
      p = dd.find_divergence(params, config, runs, prompt_ids, masks[s:e], eos=eos,
                             pad_id=pad_id, mask_block=mask_block, mesh=mesh)
      plain = p.resume_fraction > AUTO_PLAIN
      if not plain:
        pending.append((key, s, e, p))
      dd.finish(params, config, [q for *_, q in pending], group_size=group_size, eos=eos,
                pad_id=pad_id, whole_groups=not plain and i < len(blocks) - 1)
      while pending and not pending[0][3].rows:
        k, a, b, q = pending.pop(0)
        yield k, a, b, q.tokens, q.lengths
    if plain:
      yield (key, s, e, *_plain_tokens(params, config, prompt_ids, masks[s:e], **kw))


def _masked_tokens(params, config, prompt_ids, masks, *, max_new_tokens, eos, pad_id, batch_size,
                   mask_block, mesh, method):
  """(tokens [M, N, G], lengths [M, N]) by `method`, in blocks of `mask_block` masks."""
  M, N = masks.shape[0], len(prompt_ids)
  tokens = np.full((M, N, max_new_tokens), pad_id, np.int32)
  lengths = np.zeros((M, N), np.int32)
  blocks = [(None, s, min(s + mask_block, M)) for s in range(0, M, mask_block)]
  for _, s, e, t, n in _block_tokens(params, config, prompt_ids, masks, blocks,
                                     max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
                                     batch_size=batch_size, mask_block=mask_block, mesh=mesh,
                                     method=method):
    tokens[s:e], lengths[s:e] = t, n
  return tokens, lengths


def _texts(tokenizer, tokens, lengths, eos) -> list[list[str]]:
  """[M][N] strings of tokens [M, N, G] up to lengths [M, N], a final EOS stripped."""
  texts = []
  for m in range(tokens.shape[0]):
    row = []
    for n in range(tokens.shape[1]):
      ids = tokens[m, n, :lengths[m, n]].tolist()
      if ids and ids[-1] in eos:
        ids = ids[:-1]
      row.append(tokenizer.decode(ids, skip_special_tokens=True))
    texts.append(row)
  return texts


def decode_under_masks(params: Params, config: ModelConfig, tokenizer: Any,
                       prompt_ids: Sequence[Sequence[int]], head_masks, *, max_new_tokens: int,
                       pad_id: int, batch_size: int = 16, mask_block: int = 8,
                       devices: Any = None, method: str = "divergence") -> list[list[str]]:
  """Greedy responses to N prompts under each of M head masks, decoded to text.

  Args:
    prompt_ids: N token lists of rendered prompts.
    head_masks: [M, L, H]; `mask_block` of them run together (one vmapped program; a short
      last block is filled with copies so every block compiles once per prompt shape).
    max_new_tokens: greedy tokens per response (stops at the config's / tokenizer's EOS).
    pad_id: id used for left padding and after EOS.
    batch_size: prompts per chunk (length-sorted, fixed-shape: `eval.batching.prompt_chunks`,
      lengths padded to a multiple of 32 so few programs compile).
    devices: each block's masks are split over these (default all; one device: `generate`).
    method: "divergence" (default): decode the base once, find each pair's first differing
      step with one teacher-forced forward per mask, decode only the pairs that differ
      (`divergence_decode`; equal to "decode" up to float ties, see its caveat), switching
      to step-by-step decoding once a block of masks shows it would not pay (`AUTO_PLAIN`);
      "decode": every pair decoded step by step.
  Returns:
    [M][N] response strings, the EOS token stripped, special tokens skipped.
  """
  masks = np.asarray(head_masks, np.float32)
  _check_decode_args(masks, config, mask_block, max_new_tokens, method, "decode_under_masks")
  M, N = masks.shape[0], len(prompt_ids)
  if max_new_tokens == 0:
    return [[""] * N for _ in range(M)]
  eos = _eos_ids(config, tokenizer)
  tokens, lengths = _masked_tokens(
      params, config, prompt_ids, masks, max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
      batch_size=batch_size, mask_block=int(mask_block), mesh=mask_mesh(devices), method=method)
  return _texts(tokenizer, tokens, lengths, eos)


def _judged(texts, judge, judge_prompts, N) -> np.ndarray:
  judged = list(judge_prompts) if judge_prompts is not None else [""] * N
  if len(judged) != N:
    raise ValueError(f"refusals_under_masks: {len(judged)} judge_prompts for {N} prompts")
  refused = np.zeros((len(texts), N), bool)
  for m, responses in enumerate(texts):
    verdicts, _ = score_refusals(judged, responses, judge)
    refused[m] = [v is Verdict.REFUSED for v in verdicts]
  return refused


def refusals_under_masks(params: Params, config: ModelConfig, tokenizer: Any,
                         prompt_ids: Sequence[Sequence[int]], head_masks, *,
                         max_new_tokens: int = 64, pad_id: int, batch_size: int = 16,
                         mask_block: int = 8, judge: Judge | None = None,
                         judge_prompts: Sequence[str] | None = None,
                         devices: Any = None, method: str = "divergence") -> np.ndarray:
  """Refusal decisions of greedy generations under each of M head masks.

  Args:
    prompt_ids, head_masks [M, L, H], max_new_tokens, pad_id, batch_size, mask_block, devices,
      method: as in `decode_under_masks`.
    judge: refusal rule (default keyword `KeywordJudge`); an empty response is no refusal.
    judge_prompts: the raw requests the judge sees (default "" each; keyword rules ignore them).
  Returns:
    bool [M, N]: response n under mask m was judged a refusal.
  """
  texts = decode_under_masks(params, config, tokenizer, prompt_ids, head_masks,
                             max_new_tokens=max_new_tokens, pad_id=pad_id, batch_size=batch_size,
                             mask_block=mask_block, devices=devices, method=method)
  return _judged(texts, judge, judge_prompts, len(prompt_ids))


@dataclasses.dataclass(frozen=True)
class SafetySweep:
  """base_refused bool [N]; refused bool [L, U, N] (unit (l, u) zeroed)."""
  base_refused: np.ndarray
  refused: np.ndarray

  @property
  def base_rate(self) -> float:
    return float(self.base_refused.mean())

  @property
  def rate(self) -> np.ndarray:
    """float64 [L, U] refusal rates."""
    return self.refused.mean(axis=-1)

  @property
  def h_safe(self) -> np.ndarray:
    """|Ref(ablated) - Ref(base)|, Eq. 4: float64 [L, U]."""
    return np.abs(self.rate - self.base_rate)


def safety_blocks(config: ModelConfig, group: int = 1, mask_block: int = 8
                  ) -> list[tuple[str, int, int]]:
  """[(key, start, end)]: the resumable blocks of the safety sweep's 1 + L * U masks (mask 0 is
  the base model, mask 1 + l * U + u zeroes unit (l, u)), `mask_block` masks each."""
  M = 1 + config.num_layers * num_units(config, group)
  return [(f"masks_{s:06d}_{min(s + mask_block, M):06d}", s, min(s + mask_block, M))
          for s in range(0, M, int(mask_block))]


def safety_sweep(params: Params, config: ModelConfig, tokenizer: Any,
                 prompt_ids: Sequence[Sequence[int]], *, group: int = 1, mask_block: int = 8,
                 done: Mapping[str, np.ndarray] | None = None,
                 on_block: Callable[[str, np.ndarray], None] | None = None,
                 progress: Callable[[float], None] | None = None, max_new_tokens: int = 64,
                 pad_id: int, batch_size: int = 16, judge: Judge | None = None,
                 judge_prompts: Sequence[str] | None = None, devices: Any = None,
                 method: str = "divergence") -> SafetySweep:
  """Refusal decisions on D_safe for the base model and every unit ablation.

  max_new_tokens, pad_id, batch_size, judge, judge_prompts, devices, method: as in
  `refusals_under_masks`. The base model runs as one more mask (all ones) in the same
  programs; with method "divergence" its continuations are decoded once for the whole sweep
  and every block is checked against them (`_block_tokens`). The masks run in
  `safety_blocks(config, group, mask_block)` order; done {key: bool [end - start, N]} are
  blocks an earlier run finished (not recomputed), on_block(key, refused [end - start, N]) is called as each remaining block
  finishes, progress(units) with the masks it held.
  """
  L, U = config.num_layers, num_units(config, group)
  masks = np.concatenate([np.ones((1, L, config.num_heads), np.float32),
                          unit_masks(config, group)])
  _check_decode_args(masks, config, mask_block, max_new_tokens, method, "safety_sweep")
  N = len(prompt_ids)
  eos, mesh = _eos_ids(config, tokenizer), mask_mesh(devices)
  mask_block = int(mask_block)
  refused = np.zeros((len(masks), N), bool)
  done = dict(done or {})
  todo = []
  for key, s, e in safety_blocks(config, group, mask_block):
    if key not in done:
      todo.append((key, s, e))
      continue
    got = np.asarray(done[key], bool)
    if got.shape != (e - s, N):
      raise ValueError(f"stored safety block {key} has shape {got.shape}, expected "
                       f"{(e - s, N)}: it belongs to another run; use a new workdir")
    refused[s:e] = got
  if max_new_tokens == 0:
    outputs = ((k, s, e, None, None) for k, s, e in todo)
  else:
    outputs = _block_tokens(params, config, prompt_ids, masks, todo,
                            max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
                            batch_size=batch_size, mask_block=mask_block, mesh=mesh,
                            method=method)
  for key, s, e, tokens, lengths in outputs:
    texts = (_texts(tokenizer, tokens, lengths, eos) if max_new_tokens
             else [[""] * N for _ in range(e - s)])
    got = _judged(texts, judge, judge_prompts, N)
    refused[s:e] = got
    if on_block is not None:
      on_block(key, got)
    if progress is not None:
      progress(e - s)
  return SafetySweep(refused[0], refused[1:].reshape(L, U, N))
