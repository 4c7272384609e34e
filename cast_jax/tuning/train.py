"""Training head-restricted LoRA on the substrate trainer: loss, step (plain or PCGrad), runner.

The trainer's two pytrees (`cast_jax.train.state`):
  trainable = {"a": A [L, D, r], "b": B [L, r, H, Dh]}           (LoRA factors, fp32)
  frozen    = {"params": the whole base model, "head_mask": [L, H]}  (`lora_frozen`)

Nothing in `frozen` is differentiated or updated, so every base parameter (and every frozen
head's wq slice after `merge_lora`) stays bit-identical to the base. The TrainState is the
substrate's, so `cast_jax.train.train` checkpoints and resumes it exactly.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cast_jax import models
from cast_jax.data.batching import Example, iterate_train_batches
from cast_jax.models.config import ModelConfig
from cast_jax.train.fingerprint import make_fingerprint
from cast_jax.train.loop import train
from cast_jax.train.losses import check_sft_batch, check_sft_examples, sft_loss
from cast_jax.train.state import TrainState
from cast_jax.train.step import OptimizerConfig, build_optimizer, make_train_step
from cast_jax.tuning import lora as lora_lib
from cast_jax.tuning import pcgrad as pcgrad_lib

Params = dict[str, Any]


def lora_frozen(params: Params, head_mask: Any, config: ModelConfig) -> Params:
  """The trainer's `frozen` tree: {"params": base params, "head_mask": float32 [L, H]}."""
  mask = lora_lib.check_head_mask(head_mask, config)
  return {"params": params, "head_mask": jnp.asarray(mask)}


def make_lora_loss_fn(config: ModelConfig, lora_config: lora_lib.LoraConfig, *,
                      remat: bool = False, per_sequence: bool = False):
  """SFT `loss_fn(lora, frozen, batch, rng, extra) -> (loss, metrics)` through the LoRA seam.

  `frozen` from `lora_frozen`; `batch` the training contract (input_ids, attention_mask,
  loss_mask, all [B, T]); metrics as `cast_jax.train.sft_loss`. rng / extra unused (no dropout).
  """
  adapter_fn = lora_lib.make_adapter_fn(lora_config)

  def loss_fn(trainable, frozen, batch, rng, extra):
    del rng, extra
    logits = models.forward(frozen["params"], config, batch["input_ids"],
                            attention_mask=batch["attention_mask"], remat=remat,
                            adapter_fn=adapter_fn,
                            adapter_params=lora_lib.adapter_params(trainable, frozen["head_mask"]))
    return sft_loss(logits, batch["input_ids"], batch["loss_mask"], per_sequence=per_sequence)

  return loss_fn


def make_lora_train_step(config: ModelConfig, tx: optax.GradientTransformation,
                         lora_config: lora_lib.LoraConfig = lora_lib.LoraConfig(), *,
                         pcgrad: str | None = None, remat: bool = False,
                         per_sequence: bool = False, compute_dtype: Any = None,
                         donate: bool = True, jit: bool = True):
  """`train_step(state, frozen, batch) -> (state, metrics)` over LoRA factors.

  pcgrad: None (plain SFT on `batch`), "one_sided" or "symmetric" (`cast_jax.tuning.pcgrad`;
  the batch is then {"align": batch, "util": batch}). Other arguments: `make_train_step`.
  """
  loss_fn = make_lora_loss_fn(config, lora_config, remat=remat, per_sequence=per_sequence)
  if pcgrad is None:
    return make_train_step(loss_fn, tx, compute_dtype=compute_dtype, donate=donate, jit=jit)
  grad_fn = pcgrad_lib.make_pcgrad_grad_fn(loss_fn, pcgrad, compute_dtype=compute_dtype)
  return make_train_step(None, tx, grad_fn=grad_fn, donate=donate, jit=jit)


def check_pcgrad_batch(batch: dict, step: int) -> None:
  """Host-side check of a PCGrad batch {"align", "util"}: both halves are SFT batches."""
  if not (isinstance(batch, dict) and set(batch) == {pcgrad_lib.ALIGN, pcgrad_lib.UTIL}):
    raise ValueError(f"batch at step {step}: a PCGrad batch is {{'align': ..., 'util': ...}}.")
  for k in (pcgrad_lib.ALIGN, pcgrad_lib.UTIL):
    check_sft_batch(batch[k], step)


def run_lora(params: Params, config: ModelConfig, examples: Sequence[Example], head_mask: Any, *,
             pad_id: int, num_steps: int, batch_size: int, seed: int, optimizer: OptimizerConfig,
             lora_config: lora_lib.LoraConfig = lora_lib.LoraConfig(),
             util_examples: Sequence[Example] | None = None, pcgrad: str | None = None,
             workdir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
             pad_multiple: int = 16, buckets: Sequence[int] | None = None, remat: bool = False,
             per_sequence: bool = False, progress: bool = True, log_every: int = 25,
             extend: bool = False, overwrite: bool = False) -> tuple[Params, dict]:
  """Trains head-restricted LoRA factors on `examples` (D_align), the base model frozen.

  Args:
    params: base param pytree (not modified); config its ModelConfig.
    examples: (input_ids, loss_mask) pairs (`data.encode_dataset`).
    head_mask: [L, H] in {0, 1} (`cast_jax.tuning.head_sets`).
    seed: draws A (fold 0), seeds the step keys (fold 1) and the data order (as `run_sft`);
      D_util batches use seed + 1.
    optimizer: AdamW settings; weight decay (if any) applies to A and B.
    util_examples, pcgrad: with pcgrad "one_sided" / "symmetric", batch s of `util_examples`
      (same batch size) is drawn alongside alignment batch s and used as the reference gradient.
    workdir, checkpoint_every, log_every, progress, extend, overwrite: `cast_jax.train.train`.
    pad_multiple, buckets, remat, per_sequence: as `cast_jax.train.run_sft`.

  Returns:
    (lora {"a", "b"}, the trainer's summary; with pcgrad its "tokens" is 0, since the loop
    counts a top-level attention_mask and a PCGrad batch nests two). Merge with
    `merge_lora(params, lora, head_mask, lora_config)`; export with `tuning.peft_export`.
  """
  check_sft_examples(examples, config.vocab_size, pad_id)
  if (pcgrad is None) != (util_examples is None):
    raise ValueError("run_lora: pass util_examples together with pcgrad ('one_sided' or "
                     "'symmetric'), or neither.")
  if util_examples is not None:
    check_sft_examples(util_examples, config.vocab_size, pad_id, where="run_lora util_examples")
  frozen = lora_frozen(params, head_mask, config)
  key = jax.random.PRNGKey(seed)
  lora = lora_lib.init_lora(config, jax.random.fold_in(key, 0), lora_config)
  tx, lr_fn = build_optimizer(optimizer, weight_decay_mask={"a": True, "b": True})
  state = TrainState.create(lora, tx, jax.random.fold_in(key, 1))
  step = make_lora_train_step(config, tx, lora_config, pcgrad=pcgrad, remat=remat,
                              per_sequence=per_sequence)

  def stream(data, data_seed, start):
    return (b for _, _, b in iterate_train_batches(
        data, batch_size=batch_size, seed=data_seed, pad_id=pad_id, start_step=start,
        multiple=pad_multiple, buckets=buckets))

  def batches_fn(start):
    if pcgrad is None:
      return stream(examples, seed, start)
    return ({pcgrad_lib.ALIGN: a, pcgrad_lib.UTIL: u}
            for a, u in zip(stream(examples, seed, start), stream(util_examples, seed + 1, start)))

  fingerprint = None if workdir is None else make_fingerprint(
      data=examples, util_data=util_examples, seed=seed, batch_size=batch_size, pad_id=pad_id,
      optimizer=optimizer, model=config, lora=lora_config, pcgrad=pcgrad,
      pad_multiple=pad_multiple, buckets=buckets, per_sequence=per_sequence)
  state, summary = train(step, state, frozen, batches_fn, num_steps=num_steps, workdir=workdir,
                         checkpoint_every=checkpoint_every, lr_fn=lr_fn,
                         check_batch=check_sft_batch if pcgrad is None else check_pcgrad_batch,
                         progress=progress, log_every=log_every, fingerprint=fingerprint,
                         extend=extend, overwrite=overwrite)
  return state.trainable, summary


def count_trainable(lora: Params, head_mask: Any) -> int:
  """LoRA parameters that can move: B's entries of tuned heads, plus A of every layer that has
  a tuned head (a layer with none gets a zero gradient for A)."""
  m = np.asarray(head_mask) > 0
  _, D, r = lora["a"].shape
  Dh = lora["b"].shape[3]
  return int(m.any(axis=1).sum()) * D * r + int(m.sum()) * r * Dh
