"""Greedy decoding under many head masks by "divergence first": decode the base once, check every
(mask, prompt) pair against it with one teacher-forced forward, decode only the pairs that differ.

Greedy decoding is a deterministic function of the prefix, so a masked model that picks the base
token at every step of the base continuation reproduces it exactly. For each pair, one forward
under the mask over prompt + base continuation (all positions in parallel) gives the masked
argmax at every step; the first step where it differs from the base token (before the base's
EOS) is where the two outputs part. Pairs that never differ return the base output without
decoding; the others resume from prompt + base prefix + their own differing token, batched over
pairs (each its own mask and prompt: `generate._generate_impl` with [K, 1, T] prompts), to the
same total length. On the aligned testbed (100 prompts, 64 tokens, 33 masks) 89% of the pairs
never part, so most decoding steps are replaced by one parallel forward (safety sweep warm
3.1 s vs 4.8 s step by step). On random weights almost every ablation changes the response at
its first token; then this path costs more, and `sensitivity` falls back to step-by-step
decoding after the first block of masks shows it (`AUTO_PLAIN`).

Layer skipping: the forward of a block of masks starts from the residual stream entering the
first layer any of them touches (computed once per block and chunk, shared by its masks), as
the MCQ sweep does; the start layer is a traced input (`forward_from_any_layer`), so one program
serves every block, and the last layer runs only for the continuation's positions.

Programs: the base and the resumed pairs share one decoding program per prompt bucket
(`greedy_rows`: [K, 1, T] prompts, K = mask_block * batch_size rows); the teacher-forced pass
compiles once per (sequence length, window length) bucket.

Exactness caveat: the teacher-forced forward and the cached decode compute the same logits in a
different order, so they can differ in the last float bits; at a near-tie between the two top
tokens the argmax could then flip, and this path would report a different continuation than the
step-by-step decode. The plain path (`method="decode"`) stays available; the tests check that
both give identical tokens on random tiny models and identical refusal decisions on the testbed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax import generate as gen
from cast_jax.data.batching import collate_prompts
from cast_jax.diagnosis.mask_sharding import map_over_masks
from cast_jax.eval import batching
from cast_jax.models import ModelConfig
from cast_jax.models.decoder import Params
from cast_jax.models.layer_skip import forward_from_any_layer, hidden_at_layer

# Sequence lengths are padded to a multiple of MULTIPLE (prompts, teacher-forced sequences,
# compared windows) so the programs compile once per few lengths.
MULTIPLE = 16


def _up(n: int, multiple: int = MULTIPLE) -> int:
  return max(multiple, -(-int(n) // multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class BaseRun:
  """A chunk of B prompt + base greedy continuation sequences, regrouped by total length.

  indices int [R] (source rows of the first R chunk rows; the rest are filler copies);
  full int32 [B, G] and lengths int32 [B]: the base continuation (pad after EOS, EOS
  counted); window int32 [B, W] (its first W >= max(lengths) tokens), at int32 [B, W] (the
  sequence position whose logits predict window token t); seq_ids, seq_mask int32 [B, T]
  (prompt + continuation, left padded).
  """
  indices: np.ndarray
  full: np.ndarray
  lengths: np.ndarray
  window: Any
  at: Any
  seq_mask: Any
  seq_ids: Any


def base_runs(params: Params, config: ModelConfig, prompt_ids: Sequence[Sequence[int]], *,
              max_new_tokens: int, eos: Sequence[int], pad_id: int, batch_size: int,
              group_size: int) -> list[BaseRun]:
  """Base greedy continuations (G = max_new_tokens tokens) of N prompts, decoded `group_size`
  at a time by the resumed pairs' program (`greedy_rows`: one program for both), then
  regrouped in chunks of `batch_size` by prompt + continuation length (a response that stops
  early needs a short teacher-forced sequence)."""
  G, N = int(max_new_tokens), len(prompt_ids)
  ones = np.ones((config.num_layers, config.num_heads), np.float32)
  got = greedy_rows(params, config, [(list(p), ones, G) for p in prompt_ids],
                    group_size=group_size, max_new_tokens=G, eos=eos, pad_id=pad_id)
  full = np.full((N, G), pad_id, np.int32)
  lengths = np.asarray([len(t) for t in got], np.int32)
  for n, t in enumerate(got):
    full[n, :len(t)] = t
  seqs = [list(prompt_ids[n]) + full[n, :lengths[n]].tolist() for n in range(N)]
  runs = []
  for chunk in batching.prompt_chunks(seqs, batch_size, pad_id, multiple=MULTIPLE):
    rows = np.concatenate([chunk.indices,
                           np.repeat(chunk.indices[:1], batch_size - len(chunk.indices))])
    T, W = chunk.input_ids.shape[1], _up(lengths[rows].max())
    W = min(W, G)
    at = np.minimum(T - 1 - lengths[rows, None] + np.arange(W)[None], T - 1).astype(np.int32)
    mask = jnp.asarray(chunk.attention_mask, jnp.int32)
    runs.append(BaseRun(chunk.indices, full[rows], lengths[rows], jnp.asarray(full[rows, :W]),
                        jnp.asarray(at), mask, jnp.asarray(chunk.input_ids, jnp.int32)))
  return runs


@functools.partial(jax.jit, static_argnames=("config", "mask_block", "mesh"))
def _divergence_pass(params, config, seq_ids, start, seq_mask, window, at, lengths, masks, *,
                     mask_block, mesh):
  """(first [M, B], token [M, B]) int32: the first window step where the argmax under mask m
  differs from the base token (W if none before the base's end) and the masked argmax there.
  The residual entering `start` (int32 scalar, traced: one program serves every start layer)
  is computed once for all masks; the last layer runs for the last W + 1 positions only (`at`
  reads no earlier one)."""
  T, W = seq_mask.shape[1], window.shape[1]
  hidden = hidden_at_layer(params, config, seq_ids, start, attention_mask=seq_mask)

  def one(hm, params, hidden, start, seq_mask, window, at, lengths):
    logits = forward_from_any_layer(params, config, hidden, start, attention_mask=seq_mask,
                                    head_mask=hm, logits_at=at, last_positions=min(W + 1, T))
    pred = gen._argmax(logits)  # [B, W], the same tie rule as decoding
    differ = (pred != window) & (jnp.arange(W)[None] < lengths[:, None])
    first = jnp.where(differ.any(-1), jnp.argmax(differ, axis=-1), W).astype(jnp.int32)
    tok = jnp.take_along_axis(pred, jnp.minimum(first, W - 1)[:, None], axis=1)[:, 0]
    return first, tok

  return map_over_masks(one, masks, (params, hidden, start, seq_mask, window, at, lengths),
                        batch_size=mask_block, mesh=mesh)


def first_touched_layer(masks: np.ndarray) -> int:
  """The lowest layer where any of masks [M, L, H] is not 1 (L if none): the residual entering
  it is the base model's for every mask."""
  touched = np.flatnonzero((np.asarray(masks) != 1.0).any(axis=(0, 2)))
  return int(touched[0]) if len(touched) else masks.shape[1]


def greedy_rows(params, config, rows, *, group_size, max_new_tokens, eos, pad_id):
  """Greedy continuations of rows [(prompt ids, mask [L, H], r)], each its own prompt and mask
  -> [token lists of length <= r, stopping after EOS], decoded `group_size` rows at a time (a
  short last group filled with copies of its first row, to group_size or, if under half full,
  a power of two) in the given order. Prompts are left padded to a multiple of 4 * MULTIPLE
  and every group decodes up to max_new_tokens (the loop stops once all rows hit EOS; tokens
  past r are dropped), so one program serves each prompt bucket. (One bucket for the whole
  sweep, room for prompt + G tokens, would save a compile but doubled the decoding time on
  the testbed: each step's cost grows with the cache length.)"""
  out: list[list[int]] = [[] for _ in rows]
  order = list(range(len(rows)))
  for s in range(0, len(order), group_size):
    idx = order[s:s + group_size]
    # A group under half full is cut to a power of two rows (e.g. a few prompts' base run).
    k = (group_size if 2 * len(idx) > group_size
         else min(group_size, max(8, 1 << (len(idx) - 1).bit_length())))
    members = idx + [idx[0]] * (k - len(idx))
    length = _up(max(len(rows[i][0]) for i in idx), 4 * MULTIPLE)
    batch = collate_prompts([rows[i][0] for i in members], pad_id=pad_id, buckets=(length,))
    ids = np.asarray(batch["input_ids"], np.int32)[:, None]
    mask = np.asarray(batch["attention_mask"], np.int32)[:, None]
    masks = np.stack([rows[i][1] for i in members]).astype(np.float32)
    tokens, lengths = gen._generate(
        params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), jnp.asarray(masks),
        None, config=config, max_new_tokens=int(max_new_tokens), eos=tuple(eos),
        pad=int(pad_id), temperature=0.0, top_p=1.0, adapter_fn=None, cache_sharding=None)
    tokens, lengths = np.asarray(tokens)[:, 0], np.asarray(lengths)[:, 0]
    for j, i in enumerate(idx):
      out[i] = tokens[j, :min(int(lengths[j]), rows[i][2])].tolist()
  return out


@dataclasses.dataclass
class Pending:
  """Outputs under a block of M masks before the parted pairs are resumed: tokens int32
  [M, N, G], lengths int32 [M, N], first int32 [M, N] (the step where the output leaves the
  base continuation; G: it does not); rows / slots: the pairs still to decode (`greedy_rows`
  rows and their (m, n, tokens so far))."""
  tokens: np.ndarray
  lengths: np.ndarray
  first: np.ndarray
  rows: list
  slots: list

  @property
  def resume_fraction(self) -> float:
    """The decoding steps left to the parted pairs over M * N * G, what step-by-step decoding
    would run: above about 1 minus the teacher-forced pass's relative cost this path is slower
    (a model whose ablations change almost every response from the first token)."""
    return sum(r for *_, r in self.rows) / max(self.tokens.size, 1)


def find_divergence(params: Params, config: ModelConfig, runs: Sequence[BaseRun],
                    prompt_ids: Sequence[Sequence[int]], masks, *, eos: Sequence[int],
                    pad_id: int, mask_block: int, mesh: Any = None) -> Pending:
  """Where each (mask, prompt) pair parts from the base (`base_runs`, same prompts): one
  teacher-forced pass per run, `mask_block` of masks [M, L, H] vmapped at a time (split over
  `mesh` when given), from the residual entering `first_touched_layer(masks)`."""
  masks = np.asarray(masks, np.float32)
  M, N, G = masks.shape[0], len(prompt_ids), runs[0].full.shape[1]
  p = Pending(np.full((M, N, G), pad_id, np.int32), np.zeros((M, N), np.int32),
              np.full((M, N), G, np.int32), [], [])
  start = first_touched_layer(masks)
  # A short block is filled with copies of its first mask: one program per block size.
  padded = np.concatenate([masks, np.repeat(masks[:1], -M % mask_block, axis=0)])
  for run in runs:
    real = len(run.indices)
    p.tokens[:, run.indices] = run.full[:real]
    p.lengths[:, run.indices] = run.lengths[:real]
    if start == config.num_layers:  # every mask is all ones: the base model itself
      continue
    f, t = _divergence_pass(params, config, run.seq_ids, jnp.int32(start), run.seq_mask,
                            run.window, run.at, jnp.asarray(run.lengths), jnp.asarray(padded),
                            mask_block=mask_block, mesh=mesh)
    f, t = np.asarray(f)[:M, :real], np.asarray(t)[:M, :real]
    for m, r in zip(*np.nonzero(f < run.window.shape[1])):
      n, j = int(run.indices[r]), int(f[m, r])
      p.first[m, n] = j
      prefix = run.full[r, :j].tolist() + [int(t[m, r])]
      p.tokens[m, n] = pad_id
      p.tokens[m, n, :j + 1] = prefix
      p.lengths[m, n] = j + 1
      if prefix[-1] not in eos and j + 1 < G:
        p.rows.append((list(prompt_ids[n]) + prefix, masks[m], G - j - 1))
        p.slots.append((m, n, j + 1))
  return p


def finish(params: Params, config: ModelConfig, pending: Sequence[Pending], *, group_size: int,
           eos: Sequence[int], pad_id: int, whole_groups: bool = False) -> None:
  """Decodes the parted pairs of the `Pending`s together (`greedy_rows`), in place, first in
  first out. whole_groups: only as many as fill whole groups of `group_size` (the rest stay
  pending, so no group is padded while more blocks are to come)."""
  rows = [r for p in pending for r in p.rows]
  n = len(rows) - len(rows) % group_size if whole_groups else len(rows)
  if n == 0:
    return
  more = iter(greedy_rows(params, config, rows[:n], group_size=group_size,
                          max_new_tokens=pending[0].tokens.shape[-1], eos=eos, pad_id=pad_id))
  for p in pending:
    k = 0
    for (m, i, j), extra in zip(p.slots, more):
      p.tokens[m, i, j:j + len(extra)] = extra
      p.lengths[m, i] = j + len(extra)
      k += 1
    p.rows, p.slots = p.rows[k:], p.slots[k:]


def decode_with_base(params: Params, config: ModelConfig, runs: Sequence[BaseRun],
                     prompt_ids: Sequence[Sequence[int]], masks, *, eos: Sequence[int],
                     pad_id: int, mask_block: int, group_size: int, mesh: Any = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Greedy tokens under each of M masks [M, L, H]: `find_divergence`, then `finish`.

  Returns:
    tokens int32 [M, N, G] (pad after EOS), lengths int32 [M, N] (EOS counted), first int32
    [M, N]: the step where the output leaves the base continuation (G: it does not).
  """
  p = find_divergence(params, config, runs, prompt_ids, masks, eos=eos, pad_id=pad_id,
                      mask_block=mask_block, mesh=mesh)
  finish(params, config, [p], group_size=group_size, eos=eos, pad_id=pad_id)
  return p.tokens, p.lengths, p.first
