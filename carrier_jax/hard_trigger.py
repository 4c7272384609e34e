"""Discrete hard-token triggers for the SFT-Eraser (lcdd-sft-eraser.md 3.3; its first open
problem): L real tokens, found by a GCG search (Zou et al. 2023, Greedy Coordinate Gradient),
whose embedding rows minimise the SAME `carrier_jax.eraser.trigger_loss` as the soft trigger,
so the reversal works through ordinary text.

One search step on a prompt minibatch:
  1. token gradient G [L, V] = (dL/dt at t = E[ids]) @ E^T: the gradient with respect to a
     one-hot X [L, V] with t = X @ E, so G[i, v] - G[i, ids[i]] is the linearised loss change
     of putting token v at position i;
  2. proposals: per position the top_k tokens of -G (excluded ids and the current token masked
     out); num_candidates single-token substitutions, positions spread evenly over the trigger
     (a random offset per step), a random top-k token each;
  3. exact evaluation: `trigger_loss` of every candidate in one jitted program (candidates
     vmapped in blocks of `candidate_chunk`, blocks scanned: one compiled shape per run); the
     trigger moves to the best candidate (GCG's rule; with move_always=False only when it
     beats the current trigger on the minibatch).
With a tokenizer, a candidate whose decoded text does not encode back to the same ids is
dropped on the host before the choice, so the returned text is the trigger. The best trigger
is chosen on held-out prompts every `eval_every` steps, as the soft trigger's is.

The text route: `insert_text` puts the trigger's text into rendered prompts, `text_prompt_ids`
encodes them and checks the ids are the plain prompt's ids with the trigger ids spliced in at
the trigger's place, and `text_equivalence` measures that a forward on those ordinary ids
gives the logits of a forward on the embedding rows inserted by `insert_trigger`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from carrier_jax.eraser import EraserConfig, base_targets, frozen_arrays, trigger_loss
from carrier_jax.eraser_train import evaluate_trigger
from carrier_jax.trigger import PLACES, insert_trigger
from cast_jax.eval.runners import EvalModel
from cast_jax.models import forward
from cast_jax.models.decoder import embed


@dataclasses.dataclass(frozen=True)
class HardTriggerConfig:
  """GCG search settings (the loss and the trigger length come from `EraserConfig`).

  num_steps: search steps; top_k: proposals per position; num_candidates: substitutions scored
  per step; batch_size: prompts per minibatch (the gradient and the scoring use the same one);
  candidate_chunk: candidates vmapped at once (None: all; lower it when memory is short);
  move_always: move to the best candidate even when it is worse than the current trigger on
    the minibatch (GCG's rule, the default: it leaves local minima that trap the greedy rule,
    False; the held-out selection keeps the best trigger either way);
  eval_every: steps between held-out evaluations; log_every: steps between curve rows;
  seed: the PRNG seed used when no key is given.
  """
  num_steps: int = 100
  top_k: int = 64
  num_candidates: int = 128
  batch_size: int = 16
  candidate_chunk: int | None = None
  move_always: bool = True
  eval_every: int = 10
  log_every: int = 1
  seed: int = 0

  def __post_init__(self):
    for name in ("top_k", "num_candidates", "batch_size", "eval_every", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"HardTriggerConfig.{name}={getattr(self, name)}; use an integer >= 1.")
    if self.num_steps < 0:
      raise ValueError(f"HardTriggerConfig.num_steps={self.num_steps}; use >= 0.")
    if self.candidate_chunk is not None and self.candidate_chunk < 1:
      raise ValueError(f"HardTriggerConfig.candidate_chunk={self.candidate_chunk}; use >= 1 or "
                       "None (all candidates at once).")


@dataclasses.dataclass(frozen=True)
class HardTriggerResult:
  """token_ids int32 [L]: the held-out-best trigger; text: its decoded text (None without a
  tokenizer); embeddings float32 [L, D]: its embedding rows (a soft trigger equal to the text,
  for `carrier_jax.trigger.triggered`); last_token_ids [L]: after the final step;
  trajectory int32 [num_steps + 1, L]: the trigger after every step (row 0: the init);
  best_step / best_heldout: where it was chosen and its held-out terms; rows: curve rows
  {"step", "split": "train" | "heldout", "loss", "mse", "kl", "l2"} (`plot_curves` format)."""
  token_ids: np.ndarray
  text: str | None
  embeddings: np.ndarray
  last_token_ids: np.ndarray
  trajectory: np.ndarray
  best_step: int
  best_heldout: dict[str, float]
  rows: list[dict[str, Any]]


# --- tokens --------------------------------------------------------------------------------


def decode(tokenizer, ids: Sequence[int]) -> str:
  """The text of `ids` exactly as decoded (no clean-up of spaces, special tokens kept)."""
  return tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def roundtrips(tokenizer, rows: np.ndarray) -> np.ndarray:
  """bool [C]: whether each id row [C, L] encodes back to itself from its decoded text (no
  special tokens added); HF tokenizers (batched in Rust when fast)."""
  rows = np.asarray(rows).reshape(len(rows), -1)
  texts = tokenizer.batch_decode(rows.tolist(), clean_up_tokenization_spaces=False)
  enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
  return np.array([list(e) == r for e, r in zip(enc, rows.tolist())], bool)


def allowed_tokens(vocab_size: int, tokenizer=None, exclude_ids: Sequence[int] = ()
                   ) -> np.ndarray:
  """bool [vocab_size]: the ids a hard trigger may use.

  Excluded: `exclude_ids`; with a tokenizer also its special ids (pad / bos / eos / unk / role
  markers), ids past its vocabulary (padded embedding rows) and ids whose text does not encode
  back to the id alone.
  """
  allowed = np.ones(vocab_size, bool)
  bad = np.asarray([int(i) for i in exclude_ids if i is not None and 0 <= int(i) < vocab_size],
                   np.int64)
  allowed[bad] = False
  if tokenizer is not None:
    special = [getattr(tokenizer, a, None) for a in ("pad_token_id", "bos_token_id",
                                                     "eos_token_id", "unk_token_id")]
    special += list(getattr(tokenizer, "all_special_ids", []) or [])
    allowed[[int(i) for i in special if i is not None and 0 <= int(i) < vocab_size]] = False
    n = min(len(tokenizer), vocab_size)
    allowed[n:] = False
    allowed[:n] &= roundtrips(tokenizer, np.arange(n)[:, None])
  if allowed.sum() < 2:
    raise ValueError(f"allowed_tokens: only {int(allowed.sum())} of {vocab_size} ids remain after "
                     "the exclusions; a search needs at least 2. Exclude fewer ids.")
  return allowed


def init_token_ids(key: jax.Array, allowed: np.ndarray, length: int, tokenizer=None,
                   tries: int = 64) -> np.ndarray:
  """int32 [length]: random allowed ids; with a tokenizer built left to right so every prefix
  round-trips (each position retries up to `tries` random ids)."""
  pool = np.flatnonzero(allowed)
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  if tokenizer is None:
    return rng.choice(pool, length).astype(np.int32)
  ids: list[int] = []
  for pos in range(length):
    cands = rng.choice(pool, tries)
    ok = roundtrips(tokenizer, np.asarray([ids + [int(c)] for c in cands]))
    if not ok.any():
      raise ValueError(f"init_token_ids: no random allowed id continues {ids} (position {pos}) "
                       "with text that encodes back to the same ids; pass init ids instead.")
    ids.append(int(cands[np.argmax(ok)]))
  return np.asarray(ids, np.int32)


def trigger_embeddings(params: dict, token_ids) -> jnp.ndarray:
  """The embedding rows float32 [L, D] of token ids [L]: the soft trigger equal to the text."""
  return jnp.take(params["embed"], jnp.asarray(token_ids, jnp.int32), axis=0).astype(jnp.float32)


# --- the search ----------------------------------------------------------------------------


def token_gradients(token_ids: jnp.ndarray, frozen: dict[str, Any], batch: dict[str, Any],
                    targets: dict[str, Any], *, config, adapter_fn=None,
                    cfg: EraserConfig = EraserConfig()) -> tuple[jnp.ndarray, dict]:
  """G float32 [L, V]: the gradient of `trigger_loss` with respect to the one-hot [L, V] of
  token_ids int [L] (computed as dL/dt @ E^T, without the [L, V] x [V, D] product), and the
  loss terms of the current trigger on the batch (scalars)."""
  table = frozen["params"]["embed"]
  trig = jnp.take(table, token_ids, axis=0).astype(jnp.float32)
  (_, terms), g = jax.value_and_grad(trigger_loss, has_aux=True)(
      trig, frozen, batch, targets, config=config, adapter_fn=adapter_fn, cfg=cfg)
  return g @ table.astype(jnp.float32).T, terms


def propose_candidates(key: jax.Array, token_ids: jnp.ndarray, grad: jnp.ndarray,
                       allowed: jnp.ndarray, *, top_k: int, num_candidates: int) -> jnp.ndarray:
  """int32 [num_candidates, L]: single-token substitutions of token_ids [L].

  Candidate c changes position (c * L // C + offset) mod L (offset random per call) to a random
  one of that position's top_k tokens by -grad [L, V] among `allowed` [V] minus the current
  token. Needs top_k <= allowed.sum() - 1 (`optimize_hard_trigger` clips it).
  """
  L = token_ids.shape[0]
  score = jnp.where(allowed[None, :], -grad, -jnp.inf)
  score = score.at[jnp.arange(L), token_ids].set(-jnp.inf)
  _, top = jax.lax.top_k(score, top_k)  # [L, k]
  k_off, k_tok = jax.random.split(key)
  pos = (jnp.arange(num_candidates) * L // num_candidates
         + jax.random.randint(k_off, (), 0, L)) % L
  new = top[pos, jax.random.randint(k_tok, (num_candidates,), 0, top_k)]
  cands = jnp.broadcast_to(token_ids, (num_candidates, L))
  return cands.at[jnp.arange(num_candidates), pos].set(new).astype(jnp.int32)


def candidate_terms(cands: jnp.ndarray, frozen: dict[str, Any], batch: dict[str, Any],
                    targets: dict[str, Any], *, config, adapter_fn=None,
                    cfg: EraserConfig = EraserConfig(), chunk: int | None = None
                    ) -> dict[str, jnp.ndarray]:
  """Exact `trigger_loss` terms of every candidate id row cands [C, L] on one batch:
  {"loss", "mse", "kl", "l2"} each float32 [C]. Candidates are vmapped `chunk` at a time (None:
  all at once) and the chunks scanned, so one program scores them all."""
  table = frozen["params"]["embed"]

  def one(ids):
    _, terms = trigger_loss(jnp.take(table, ids, axis=0).astype(jnp.float32), frozen, batch,
                            targets, config=config, adapter_fn=adapter_fn, cfg=cfg)
    return terms

  return jax.lax.map(one, cands, batch_size=min(chunk or cands.shape[0], cands.shape[0]))


def _take(tree, idx):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


@functools.partial(jax.jit, static_argnames=("config", "adapter_fn", "cfg", "top_k",
                                             "num_candidates"))
def _propose(token_ids, key, allowed, frozen, prompts, targets, idx, *, config, adapter_fn, cfg,
             top_k, num_candidates):
  grad, terms = token_gradients(token_ids, frozen, _take(prompts, idx), _take(targets, idx),
                                config=config, adapter_fn=adapter_fn, cfg=cfg)
  return propose_candidates(key, token_ids, grad, allowed, top_k=top_k,
                            num_candidates=num_candidates), terms


@functools.partial(jax.jit, static_argnames=("config", "adapter_fn", "cfg", "chunk"))
def _score(cands, frozen, prompts, targets, idx, *, config, adapter_fn, cfg, chunk):
  return candidate_terms(cands, frozen, _take(prompts, idx), _take(targets, idx), config=config,
                         adapter_fn=adapter_fn, cfg=cfg, chunk=chunk)


def optimize_hard_trigger(model: EvalModel, base: EvalModel, channels: dict[str, Any],
                          train_prompts: dict[str, np.ndarray],
                          heldout_prompts: dict[str, np.ndarray], *,
                          cfg: EraserConfig = EraserConfig(),
                          search: HardTriggerConfig = HardTriggerConfig(),
                          key: jax.Array | None = None, tokenizer=None,
                          exclude_ids: Sequence[int] = (), init_ids: Any = None,
                          progress: Callable[[int, dict], None] | None = None
                          ) -> HardTriggerResult:
  """GCG search for a cfg.length-token trigger that reverts `model` to `base` (the soft
  trigger's loss, Eqs. 6-8, on the tokens' embedding rows; no PGD: real rows are used as is).

  Args:
    model, base, channels, train_prompts, heldout_prompts: as `eraser_train.optimize_trigger`
      (the first cfg.num_prompts training rows are used; the held-out set only selects).
    cfg: the loss (length, place, alpha, beta, tail_k, align, use_mse, num_prompts) and the
      held-out chunking (batch_size); search: the GCG settings.
    key: PRNG key of the init, the minibatches and the proposals (default PRNGKey(search.seed)).
    tokenizer: HF tokenizer; restricts ids to ones that round-trip as text and gives the text.
    exclude_ids: ids never used (the config's bos / eos / pad are always excluded).
    init_ids: int [L] starting trigger instead of random allowed ids.
    progress: optional callable(step, minibatch terms of the trigger after the step).

  Returns:
    HardTriggerResult.
  """
  mc = model.config
  allowed = allowed_tokens(mc.vocab_size, tokenizer,
                           (*exclude_ids, mc.bos_token_id, mc.pad_token_id, *mc.eos_token_ids))
  train_prompts = {k: v[:cfg.num_prompts] for k, v in train_prompts.items()}
  targets = base_targets(base, train_prompts, channels, cfg=cfg)
  held_targets = base_targets(base, heldout_prompts, channels, cfg=cfg)
  return gcg_search(model, channels, train_prompts, targets, heldout_prompts, held_targets,
                    allowed, cfg=cfg, search=search, key=key, tokenizer=tokenizer,
                    init_ids=init_ids, progress=progress)


def gcg_search(model: EvalModel, channels: dict[str, Any], train_prompts: dict[str, np.ndarray],
               targets: dict[str, Any], heldout_prompts: dict[str, np.ndarray],
               held_targets: dict[str, Any], allowed: np.ndarray, *,
               cfg: EraserConfig = EraserConfig(),
               search: HardTriggerConfig = HardTriggerConfig(), key: jax.Array | None = None,
               tokenizer=None, init_ids: Any = None,
               progress: Callable[[int, dict], None] | None = None) -> HardTriggerResult:
  """The search of `optimize_hard_trigger` on given targets (any `base_targets`-shaped dicts:
  every row of train_prompts is used) and allowed ids bool [V] (`allowed_tokens`)."""
  key = jax.random.PRNGKey(search.seed) if key is None else key
  init_key, batch_key, prop_key = jax.random.split(key, 3)
  allowed = np.asarray(allowed, bool)
  top_k = min(search.top_k, int(allowed.sum()) - 1)
  if init_ids is None:
    ids = init_token_ids(init_key, allowed, cfg.length, tokenizer)
  else:
    ids = np.asarray(init_ids, np.int32)
    if ids.shape != (cfg.length,) or not allowed[ids].all():
      raise ValueError(f"init_ids {ids.tolist()}: need {cfg.length} allowed ids (no special, "
                       "excluded or non-round-tripping token).")
  n = train_prompts["input_ids"].shape[0]
  bs = search.batch_size
  if n < bs:
    raise ValueError(f"gcg_search: {n} training prompts < batch_size {bs}; pass more prompts or "
                     "lower HardTriggerConfig.batch_size.")
  frozen = frozen_arrays(model, channels)
  prompts = jax.tree.map(jnp.asarray, train_prompts)
  held = jax.tree.map(jnp.asarray, heldout_prompts)
  allowed_j = jnp.asarray(allowed)
  static = dict(config=model.config, adapter_fn=model.adapter_fn, cfg=cfg)
  rows: list[dict[str, Any]] = []

  def heldout(step, t_ids):
    got = evaluate_trigger(trigger_embeddings(model.params, t_ids), model, channels, held,
                           held_targets, cfg=cfg)
    rows.append({"step": step, "split": "heldout", **got})
    return got

  best = (heldout(0, ids), 0, ids)
  trajectory = [ids]
  for step in range(1, search.num_steps + 1):
    idx = jax.random.choice(jax.random.fold_in(batch_key, step), n, (bs,), replace=False)
    cands, cur = _propose(jnp.asarray(ids), jax.random.fold_in(prop_key, step), allowed_j,
                          frozen, prompts, targets, idx, top_k=top_k,
                          num_candidates=search.num_candidates, **static)
    terms = _score(cands, frozen, prompts, targets, idx, chunk=search.candidate_chunk, **static)
    loss = np.asarray(terms["loss"], np.float64)
    cands = np.asarray(cands)
    if tokenizer is not None:
      loss = np.where(roundtrips(tokenizer, cands), loss, np.inf)
    c = int(np.argmin(loss))
    if np.isfinite(loss[c]) and (search.move_always or loss[c] < float(cur["loss"])):
      ids, now = cands[c], {t: float(v[c]) for t, v in terms.items()}
    else:
      now = {t: float(v) for t, v in cur.items()}
    trajectory.append(ids)
    if step % search.log_every == 0 or step == search.num_steps:
      rows.append({"step": step, "split": "train", **now})
    if progress is not None:
      progress(step, now)
    if step % search.eval_every == 0 or step == search.num_steps:
      got = heldout(step, ids)
      if got["loss"] < best[0]["loss"]:
        best = (got, step, ids)
  best_ids = np.asarray(best[2], np.int32)
  return HardTriggerResult(
      token_ids=best_ids, text=None if tokenizer is None else decode(tokenizer, best_ids),
      embeddings=np.asarray(trigger_embeddings(model.params, best_ids)),
      last_token_ids=np.asarray(ids, np.int32), trajectory=np.stack(trajectory).astype(np.int32),
      best_step=best[1], best_heldout=best[0], rows=rows)


# --- the text route ------------------------------------------------------------------------


def insert_text(prompt_texts: Sequence[str], trigger_text: str, *, bos_token: str | None,
                place: str = "after_bos") -> list[str]:
  """Rendered prompts with the trigger's text inserted at `place` (`carrier_jax.trigger.PLACES`):
  "after_bos" right after a leading BOS token text (at the start when a prompt has none),
  "start" in front of everything."""
  if place not in PLACES:
    raise ValueError(f"insert_text: place {place!r}; use one of {PLACES}.")
  out = []
  for text in prompt_texts:
    cut = len(bos_token) if place == "after_bos" and bos_token and text.startswith(bos_token) \
        else 0
    out.append(text[:cut] + trigger_text + text[cut:])
  return out


def splice_ids(prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[int], *,
               bos_token_id: int | None, place: str = "after_bos") -> list[list[int]]:
  """Each prompt's ids with token_ids inserted at `place`: after a leading BOS id
  ("after_bos"; at the start when the row has none) or at the start ("start")."""
  if place not in PLACES:
    raise ValueError(f"splice_ids: place {place!r}; use one of {PLACES}.")
  trig = [int(i) for i in token_ids]
  out = []
  for row in prompt_ids:
    row = [int(i) for i in row]
    at = int(place == "after_bos" and bos_token_id is not None and bool(row)
             and row[0] == bos_token_id)
    out.append(row[:at] + trig + row[at:])
  return out


def text_prompt_ids(tokenizer, prompt_texts: Sequence[str], token_ids: Sequence[int], *,
                    place: str = "after_bos") -> list[list[int]]:
  """Token ids of the rendered prompts with the trigger's decoded text inserted (encoded with
  no special tokens added, as the launchers encode rendered prompts).

  Raises ValueError when a prompt's ids are not its plain ids with token_ids spliced in at
  `place` (the text would then not be the optimised trigger: e.g. it merges with its
  neighbours); the message names the first such prompt.
  """
  text = decode(tokenizer, token_ids)
  got = [list(tokenizer.encode(t, add_special_tokens=False))
         for t in insert_text(prompt_texts, text, bos_token=tokenizer.bos_token, place=place)]
  plain = [list(tokenizer.encode(t, add_special_tokens=False)) for t in prompt_texts]
  want = splice_ids(plain, token_ids, bos_token_id=tokenizer.bos_token_id, place=place)
  for i, (g, w) in enumerate(zip(got, want)):
    if g != w:
      raise ValueError(f"text_prompt_ids: prompt {i} with the trigger text {text!r} encodes to "
                       f"{g[:40]}..., not its ids with the trigger spliced in {w[:40]}...; the "
                       "trigger text merges with the prompt at this place.")
  return got


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  T = max(len(r) for r in rows)
  ids = np.full((len(rows), T), pad_id, np.int32)
  mask = np.zeros((len(rows), T), np.int32)
  for i, r in enumerate(rows):
    ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
  return ids, mask


def text_equivalence(model: EvalModel, prompt_ids: Sequence[Sequence[int]],
                     token_ids: Sequence[int], *, bos_token_id: int | None,
                     place: str = "after_bos", pad_id: int = 0) -> float:
  """Max |logit difference| over the real slots between a forward on ordinary ids (the plain
  prompt ids [N][P_i] with the trigger ids spliced in, `splice_ids`) and a forward on the plain
  prompts' embeddings with the trigger's embedding rows inserted by `insert_trigger` (what the
  search scores). Both batches are left padded to the same [N, max P_i + L] layout. 0 up to
  float rounding: the text route scores what the search optimised."""
  spliced = splice_ids(prompt_ids, token_ids, bos_token_id=bos_token_id, place=place)
  s_ids, s_mask = _left_pad(spliced, pad_id)
  p_ids, p_mask = _left_pad(prompt_ids, pad_id)
  extra = dict(head_mask=model.head_mask, adapter_fn=model.adapter_fn,
               adapter_params=model.adapter_params)
  by_ids = forward(model.params, model.config, jnp.asarray(s_ids),
                   attention_mask=jnp.asarray(s_mask), **extra)
  at = np.asarray([int(place == "after_bos" and bos_token_id is not None
                       and r[0] == bos_token_id) for r in prompt_ids], np.int32)
  ins = insert_trigger(trigger_embeddings(model.params, token_ids),
                       embed(model.params, jnp.asarray(p_ids)), jnp.asarray(p_mask),
                       jnp.asarray(at))
  if not np.array_equal(np.asarray(ins.attention_mask), s_mask):
    raise AssertionError("text_equivalence: the spliced ids and the inserted rows have different "
                         "layouts (a bug in splice_ids or insert_trigger).")
  by_rows = forward(model.params, model.config, input_embeds=ins.embeds,
                    attention_mask=ins.attention_mask, **extra)
  real = jnp.asarray(s_mask, bool)[:, :, None]
  return float(jnp.max(jnp.where(real, jnp.abs(by_ids - by_rows), 0.0)))
