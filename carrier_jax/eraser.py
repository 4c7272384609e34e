"""The SFT-Eraser objective (lcdd-sft-eraser.md 3.3, Eqs. 6-8, F.3): a soft trigger t [L, D]
that moves a carrier model's write activations and outputs back to the base model's.

  L = L_MSE + alpha * L_KL + beta * L_2
  L_MSE  mean squared error between A_C(Model([t; x])) and A_C(Base(x)): the write activations
         (`carrier_jax.write_channels`) at C_write, over the real prompt tokens ("prompt"
         alignment: each original token against itself, trigger slots excluded; the default),
         over their per-prompt means ("mean": the authors' release), or at the last prompt
         token ("last"). Averaged over every selected (row, layer, channel, position) entry.
  L_KL   KL(Base(x) || Model([t; x])): P = the base model without the trigger, Q = the triggered
         model, per token over the full vocabulary at the last k prompt positions (tail-k),
         averaged over the real ones.
  L_2    (1/L) sum_i ||t_i||^2.

"last" reads the triggered row's last slot: the last prompt token whenever a token follows the
trigger (not for a prompt that is only BOS under "after_bos").

The base model's side (write activations at C_write and tail-k log-probs) does not depend on t:
`base_targets` computes it once per prompt, and the loss reads it as an input. `trigger_loss`
is a pure function of (trigger, frozen model arrays, prompt batch, cached targets), so a GCG
search can feed it the embeddings of discrete tokens (or vmap it over candidates).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from carrier_jax.trigger import PLACES, insert_trigger, insertion_offsets
from carrier_jax.write_channels import PATHS, write_activations
from cast_jax.eval.runners import EvalModel
from cast_jax.models import ModelConfig, forward
from cast_jax.models.decoder import embed

ALIGNS = ("prompt", "mean", "last")


@dataclasses.dataclass(frozen=True)
class EraserConfig:
  """Trigger optimisation settings; defaults are F.3's.

  length: trigger tokens L; place: where they go (`carrier_jax.trigger.PLACES`);
  lr: Adam learning rate; batch_size; num_steps; num_prompts: training prompts used;
  radius: per-token L2 max-norm R of the PGD projection (after every step);
  alpha: KL weight; tail_k: KL positions; beta: L2 weight; align: "prompt" | "mean" | "last";
  use_mse: False is the output-only ablation (no L_MSE, the activations are not even collected);
  eval_every: steps between held-out evaluations (best trigger = lowest held-out loss);
  log_every: steps between training-curve rows; seed: minibatch order and trigger init.
  """
  length: int = 20
  place: str = "after_bos"
  lr: float = 3e-3
  batch_size: int = 16
  num_steps: int = 2000
  num_prompts: int = 200
  radius: float = 1.0
  alpha: float = 0.7
  tail_k: int = 8
  beta: float = 0.1
  align: str = "prompt"
  use_mse: bool = True
  eval_every: int = 100
  log_every: int = 10
  seed: int = 0

  def __post_init__(self):
    if self.align not in ALIGNS:
      raise ValueError(f"EraserConfig.align={self.align!r}; use one of {ALIGNS}.")
    if self.place not in PLACES:
      raise ValueError(f"EraserConfig.place={self.place!r}; use one of {PLACES}.")
    for name in ("length", "batch_size", "num_prompts", "tail_k", "eval_every", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"EraserConfig.{name}={getattr(self, name)}; use an integer >= 1.")
    if self.num_steps < 0 or self.radius <= 0 or self.lr <= 0:
      raise ValueError("EraserConfig: need num_steps >= 0, radius > 0 and lr > 0.")


def prompt_set(prompt_ids: Sequence[Sequence[int]], *, pad_id: int, place: str = "after_bos",
               bos_token_id: int | None = None, multiple: int = 8) -> dict[str, np.ndarray]:
  """N token-id prompts as one left-padded set (one compiled shape for every minibatch).

  Returns {"input_ids", "attention_mask": int32 [N, P], "insert_at": int32 [N]} with P the
  longest prompt rounded up to `multiple`.
  """
  if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
    raise ValueError("prompt_set: need at least one prompt and no empty prompt.")
  P = -(-max(len(p) for p in prompt_ids) // multiple) * multiple
  ids = np.full((len(prompt_ids), P), pad_id, np.int32)
  mask = np.zeros((len(prompt_ids), P), np.int32)
  for i, p in enumerate(prompt_ids):
    ids[i, P - len(p):] = p
    mask[i, P - len(p):] = 1
  return {"input_ids": ids, "attention_mask": mask,
          "insert_at": insertion_offsets(ids, mask, place, bos_token_id)}


def frozen_arrays(model: EvalModel, channels: dict[str, Any]) -> dict[str, Any]:
  """The traced inputs of `trigger_loss` for `model` (the triggered, erased one) and C_write."""
  return {"params": model.params, "adapter_params": model.adapter_params,
          "head_mask": model.head_mask,
          "channels": {p: jnp.asarray(channels[p], jnp.float32) for p in PATHS}}


def _reduce_writes(writes: dict, mask: jnp.ndarray, align: str) -> jnp.ndarray:
  """{path: [L, B, T, D]} -> [B, 2, L, T', D] per `align`: all slots (T' = T), the last one, or
  the mean over the slots where mask [B, T] is 1 (T' = 1)."""
  x = jnp.stack([writes[p] for p in PATHS], axis=0).transpose(2, 0, 1, 3, 4)  # [B, 2, L, T, D]
  if align == "prompt":
    return x
  if align == "last":
    return x[:, :, :, -1:]
  m = mask.astype(jnp.float32)[:, None, None, :, None]
  return (x * m).sum(axis=3, keepdims=True) / jnp.maximum(m.sum(axis=3, keepdims=True), 1.0)


def _tail(P: int, k: int) -> int:
  return min(P, k)


@functools.partial(jax.jit, static_argnames=("config", "adapter_fn", "align", "tail_k",
                                             "collect", "length"))
def _base_chunk(params, adapter_params, head_mask, channels, ids, mask, insert_at, *, config,
                adapter_fn, align, tail_k, collect, length):
  k = _tail(ids.shape[1], tail_k)
  at = jnp.arange(ids.shape[1] - k, ids.shape[1])
  emb = embed(params, ids)
  if collect:
    logits, writes = write_activations(params, config, emb, mask, channels, adapter_fn=adapter_fn,
                                       adapter_params=adapter_params, head_mask=head_mask,
                                       logits_at=at)
    w = _reduce_writes(writes, mask, align)
    if align == "prompt":
      # Laid out as the triggered batch will be (zeros at the trigger slots), once, so the
      # loss compares in that layout with no per-step gather.
      src = insert_trigger(jnp.zeros((length, emb.shape[-1]), emb.dtype), emb, mask,
                           insert_at)
      w = jnp.where(src.is_trigger[:, None, None, :, None], 0.0,
                    jnp.take_along_axis(w, src.source[:, None, None, :, None], axis=3))
  else:
    logits = forward(params, config, input_embeds=emb, attention_mask=mask, head_mask=head_mask,
                     adapter_fn=adapter_fn, adapter_params=adapter_params, logits_at=at)
    w = jnp.zeros((ids.shape[0], 0), jnp.float32)
  return w, jax.nn.log_softmax(logits, axis=-1), mask[:, ids.shape[1] - k:]


def base_targets(base: EvalModel, prompts: dict[str, np.ndarray], channels: dict[str, Any], *,
                 cfg: EraserConfig, batch_size: int | None = None) -> dict[str, jnp.ndarray]:
  """The base model's side of the loss for every prompt, computed once (no trigger).

  Args:
    base: the base model; prompts: `prompt_set`; channels: C_write ({path: [L, D]}).
  Returns:
    {"writes": float32 [N, 2, L, T', D] (paths in `PATHS` order, zero off C_write; "prompt":
     T' = P + cfg.length, each token's writes at its slot in the triggered layout of
     `insert_trigger`, zeros at the trigger slots; "mean" / "last": T' = 1; [N, 0] when
     cfg.use_mse is False),
     "tail_logp": float32 [N, k, V] base log-probs at the last k prompt positions,
     "tail_mask": int32 [N, k] (0 at padding)}, k = min(cfg.tail_k, P).
  """
  n = prompts["input_ids"].shape[0]
  bs = batch_size or cfg.batch_size
  ch = {p: jnp.asarray(channels[p], jnp.float32) for p in PATHS}
  parts = []
  for s in range(0, n, bs):
    rows = np.arange(s, s + bs) % n  # the last chunk repeats early rows: one compiled shape
    got = _base_chunk(base.params, base.adapter_params, base.head_mask, ch,
                      jnp.asarray(prompts["input_ids"][rows]),
                      jnp.asarray(prompts["attention_mask"][rows]),
                      jnp.asarray(prompts["insert_at"][rows]), config=base.config,
                      adapter_fn=base.adapter_fn, align=cfg.align, tail_k=cfg.tail_k,
                      collect=cfg.use_mse, length=cfg.length)
    parts.append([x[:min(bs, n - s)] for x in got])
  w, lp, tm = (jnp.concatenate(xs, axis=0) for xs in zip(*parts))
  return {"writes": w, "tail_logp": lp, "tail_mask": tm}


def trigger_loss(trigger: jnp.ndarray, frozen: dict[str, Any], batch: dict[str, Any],
                 targets: dict[str, Any], *, config: ModelConfig, adapter_fn=None,
                 cfg: EraserConfig = EraserConfig()) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """L_MSE + alpha * L_KL(Base || Model([t; x])) + beta * L_2 on one prompt batch (Eqs. 6-8).

  Args:
    trigger: float [L, D] (any embeddings: soft, or a discrete token sequence's rows).
    frozen: `frozen_arrays(model, channels)` (params, adapter_params, head_mask, channels).
    batch: {"input_ids", "attention_mask": [B, P] left padded, "insert_at": [B]} and optional
      "weight" [B] (row weights; default 1).
    targets: the same rows of `base_targets` ("writes", "tail_logp", "tail_mask").
    config, adapter_fn: static; cfg: alpha, beta, tail_k, align, use_mse are read.

  Returns:
    (loss scalar, {"loss", "mse", "kl", "l2"} scalars); mse is 0 when cfg.use_mse is False.
  """
  params = frozen["params"]
  ids, mask = batch["input_ids"], jnp.asarray(batch["attention_mask"], jnp.int32)
  B, P = ids.shape
  weight = jnp.asarray(batch.get("weight", jnp.ones((B,), jnp.float32)), jnp.float32)
  if cfg.use_mse and cfg.align == "prompt" and targets["writes"].shape[3] != P + trigger.shape[0]:
    raise ValueError(f"trigger_loss: targets laid out for {targets['writes'].shape[3] - P} "
                     f"trigger tokens, trigger has {trigger.shape[0]}; build base_targets with "
                     "cfg.length equal to the trigger length.")
  ins = insert_trigger(trigger, embed(params, ids), mask, batch["insert_at"])
  k = _tail(P, cfg.tail_k)
  tail_at = ins.index_map[:, P - k:]  # the last k original prompt slots, wherever they moved
  extra = dict(adapter_fn=adapter_fn, adapter_params=frozen["adapter_params"],
               head_mask=frozen["head_mask"])
  if cfg.use_mse:
    logits, writes = write_activations(params, config, ins.embeds, ins.attention_mask,
                                       frozen["channels"], logits_at=tail_at, **extra)
    # The model's writes stay in the triggered layout; the (constant) targets are moved to it.
    # Gathering the writes back instead would put a scatter-add into the backward pass.
    prompt_slot = (ins.attention_mask > 0) & ~ins.is_trigger  # [B, T + L]
    got = _reduce_writes(writes, prompt_slot, cfg.align)
    tgt = targets["writes"]
    row_sel = weight[:, None, None, None, None]
    if cfg.align == "prompt":
      row_sel = row_sel * prompt_slot.astype(jnp.float32)[:, None, None, :, None]
    ch = jnp.stack([frozen["channels"][p] for p in PATHS])[None, :, :, None, :]  # [1, 2, L, 1, D]
    sq = jnp.square(got - tgt) * ch * row_sel
    count = (ch.sum(axis=(-1, 0)) * row_sel.sum(axis=(-1, 1, 2))[:, None, None]).sum()
    mse = sq.sum() / jnp.maximum(count, 1.0)
  else:
    logits = forward(params, config, input_embeds=ins.embeds, attention_mask=ins.attention_mask,
                     logits_at=tail_at, **extra)
    mse = jnp.float32(0.0)
  log_q = jax.nn.log_softmax(logits, axis=-1)
  log_p = targets["tail_logp"]
  tok_kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, k]
  tm = targets["tail_mask"].astype(jnp.float32) * weight[:, None]
  kl = (tok_kl * tm).sum() / jnp.maximum(tm.sum(), 1.0)
  l2 = jnp.mean(jnp.sum(jnp.square(trigger.astype(jnp.float32)), axis=-1))
  loss = mse + cfg.alpha * kl + cfg.beta * l2
  return loss, {"loss": loss, "mse": mse, "kl": kl, "l2": l2}
