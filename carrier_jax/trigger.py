"""Soft triggers as a model input (lcdd-sft-eraser.md 3.3, App. D): L trigger embeddings [L, D]
inserted into embedded prompts, the PGD projection, and the runner hook that makes a triggered
model an ordinary `cast_jax.eval.EvalModel`.

Insertion keeps a batch's padding where it was: a row's leading pads stay in front, its real
tokens are split at `insert_at[b]` (how many real tokens precede the trigger) and the L trigger
slots go between the two parts, with mask 1. Every row grows by exactly L, so a left-padded
batch stays left padded (the last column is real) and a right-padded one stays right padded,
and the decoder's mask-derived positions (cumsum(mask) - 1) run consecutively over
[tokens before; trigger; tokens after]: RoPE sees one real sequence.

Places (`PLACES`, turned into `insert_at` by `insertion_offsets`):
  "after_bos"  (default) right after a leading BOS, before the chat template's first marker;
               a row that does not start with BOS gets the trigger at its start.
  "start"      before every real token (in front of BOS).
Any other place (e.g. before the user text, after the role header) is an explicit `insert_at`
per row: the count of real tokens before the trigger (find it from the template's tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.eval.runners import EvalModel
from cast_jax.models import ModelConfig, forward
from cast_jax.models.decoder import embed

PLACES = ("after_bos", "start")


class Inserted(NamedTuple):
  """A batch with the trigger inserted.

  embeds [B, T + L, D]; attention_mask int32 [B, T + L]; index_map int32 [B, T] (new slot of
  each original slot: pads keep theirs); is_trigger bool [B, T + L]; source int32 [B, T + L]
  (original slot of each new slot; 0 at trigger slots), the inverse of index_map.
  """
  embeds: jnp.ndarray
  attention_mask: jnp.ndarray
  index_map: jnp.ndarray
  is_trigger: jnp.ndarray
  source: jnp.ndarray


def init_trigger(params: dict, config: ModelConfig, key: jax.Array, length: int = 20,
                 radius: float | None = 1.0, exclude_ids: tuple[int, ...] = ()) -> jnp.ndarray:
  """L trigger embeddings [length, D] copied from random token embeddings (float32).

  Args:
    params: the model's params (rows of params["embed"] are copied).
    key: PRNG key choosing the token ids (uniform over the vocabulary minus `exclude_ids`,
      e.g. the special tokens).
    radius: project the copies into the L2 ball of this radius, so PGD starts feasible
      (None: keep the raw embedding norms).
  """
  if length < 1:
    raise ValueError(f"init_trigger: length={length}; use >= 1 trigger tokens.")
  allowed = np.setdiff1d(np.arange(config.vocab_size), np.asarray(exclude_ids, np.int64))
  if not len(allowed):
    raise ValueError("init_trigger: exclude_ids removes the whole vocabulary.")
  ids = jax.random.choice(key, jnp.asarray(allowed), (length,), replace=True)
  t = jnp.take(params["embed"], ids, axis=0).astype(jnp.float32)
  return t if radius is None else project_l2_ball(t, radius)


def project_l2_ball(trigger: jnp.ndarray, radius: float) -> jnp.ndarray:
  """PGD projection (Eq. 28): each token t_i [.., L, D] scaled onto ||t_i||_2 <= radius (tokens
  already inside are unchanged)."""
  norm = jnp.linalg.norm(trigger, axis=-1, keepdims=True)
  return trigger * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


def insertion_offsets(input_ids, attention_mask, place: str = "after_bos",
                      bos_token_id: int | None = None) -> np.ndarray:
  """insert_at int32 [B]: how many real tokens precede the trigger in each row (see PLACES).

  Args: input_ids, attention_mask [B, T] (any padding side); bos_token_id: needed for
  "after_bos" (None there: every row gets the trigger at its start).
  """
  if place not in PLACES:
    raise ValueError(f"trigger place {place!r}: use one of {PLACES}, or pass insert_at per row.")
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  if place == "start" or bos_token_id is None:
    return np.zeros(ids.shape[0], np.int32)
  first = np.argmax(mask > 0, axis=1)
  starts_bos = ids[np.arange(ids.shape[0]), first] == bos_token_id
  return starts_bos.astype(np.int32)


def insert_trigger(trigger: jnp.ndarray, token_embeds: jnp.ndarray, attention_mask: jnp.ndarray,
                   insert_at: jnp.ndarray) -> Inserted:
  """Inserts trigger [L, D] into token_embeds [B, T, D] (jit-friendly, one gather).

  attention_mask [B, T]: real tokens must be one contiguous run (left or right padding);
  insert_at int [B]: real tokens before the trigger (0 <= insert_at <= the row's length).
  The trigger is cast to the embeddings' dtype.
  """
  B, T = attention_mask.shape
  L = trigger.shape[0]
  mask = jnp.asarray(attention_mask, jnp.int32)
  lead = jnp.argmax(mask > 0, axis=1).astype(jnp.int32)[:, None]  # leading pads per row
  at = jnp.asarray(insert_at, jnp.int32)[:, None]
  slot = jnp.arange(T + L, dtype=jnp.int32)[None, :]
  rank = slot - lead  # rank among the non-leading slots
  is_trig = (rank >= at) & (rank < at + L)
  src = jnp.where(rank < at, slot, slot - L)
  src = jnp.where(rank < 0, slot, jnp.clip(src, 0, T - 1))
  tok = jnp.take_along_axis(token_embeds, src[:, :, None], axis=1)
  # The trigger goes in by a one-hot matmul, not a gather: the gradient to the trigger is then
  # a dense [L, B*(T+L)] @ [B*(T+L), D] product instead of a scatter-add (slow on XLA:CPU).
  onehot = (is_trig[:, :, None] & ((rank - at)[:, :, None] == jnp.arange(L)[None, None, :]))
  trig = jnp.einsum("bsl,ld->bsd", onehot.astype(token_embeds.dtype),
                    trigger.astype(token_embeds.dtype))
  embeds = jnp.where(is_trig[:, :, None], trig, tok)
  new_mask = jnp.where(is_trig, 1, jnp.take_along_axis(mask, src, axis=1))
  orig = jnp.arange(T, dtype=jnp.int32)[None, :]
  orig_rank = orig - lead
  index_map = jnp.where((orig_rank >= at), orig + L, orig)
  return Inserted(embeds, new_mask.astype(jnp.int32), index_map.astype(jnp.int32), is_trig,
                  jnp.where(is_trig, 0, src).astype(jnp.int32))


def gather_original(x: jnp.ndarray, index_map: jnp.ndarray, axis: int = 1) -> jnp.ndarray:
  """Rows of x [.., B, T + L, ..] (batch axis `axis - 1`) at the original slots: [.., B, T, ..]."""
  shape = [1] * x.ndim
  shape[axis - 1], shape[axis] = index_map.shape
  idx = index_map.reshape(shape)
  return jnp.take_along_axis(x, jnp.broadcast_to(idx, x.shape[:axis] + index_map.shape[1:]
                                                 + x.shape[axis + 1:]), axis=axis)


@dataclasses.dataclass(frozen=True)
class TriggerInserter:
  """The `EvalModel.insert_fn` of a triggered model: (params, trigger [L, D], input_ids [B, T],
  attention_mask [B, T]) -> (embeds [B, T + L, D], mask [B, T + L], index_map [B, T]).

  Hashable by value, so every triggered model with the same place shares compiled programs.
  """
  place: str = "after_bos"
  bos_token_id: int | None = None

  def __call__(self, params, trigger, input_ids, attention_mask):
    mask = jnp.asarray(attention_mask, jnp.int32)
    if self.place == "start" or self.bos_token_id is None:
      at = jnp.zeros(mask.shape[0], jnp.int32)
    else:
      first = jnp.argmax(mask > 0, axis=1)
      tok = jnp.take_along_axis(jnp.asarray(input_ids), first[:, None], axis=1)[:, 0]
      at = (tok == self.bos_token_id).astype(jnp.int32)
    got = insert_trigger(trigger, embed(params, input_ids), mask, at)
    return got.embeds, got.attention_mask, got.index_map


def triggered(model: EvalModel, trigger: Any, place: str = "after_bos",
              bos_token_id: int | None = None) -> EvalModel:
  """`model` with the soft trigger [L, D] inserted into every prompt the runners embed
  (generation, MCQ scoring; `carrier_jax.evaluation` also routes its KLs through it).

  bos_token_id: the tokenizer's BOS (default: the config's); "after_bos" needs it.
  """
  if place not in PLACES:
    raise ValueError(f"trigger place {place!r}: use one of {PLACES}.")
  trigger = jnp.asarray(trigger)
  if trigger.ndim != 2 or trigger.shape[1] != model.config.hidden_size:
    raise ValueError(f"trigger has shape {trigger.shape}; expected [L, hidden_size="
                     f"{model.config.hidden_size}].")
  bos = model.config.bos_token_id if bos_token_id is None else bos_token_id
  return dataclasses.replace(model, trigger=trigger,
                             insert_fn=TriggerInserter(place, None if bos is None else int(bos)))
