"""`run_sft`: encoded chat examples -> fine-tuned params, the one SFT entry point every stage uses
(testbed pretraining, alignment SFT, Full-SFT baselines, the SFT stage before LCDD).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from cast_jax.data.batching import Example, iterate_train_batches
from cast_jax.models.config import ModelConfig
from cast_jax.models.decoder import Params
from cast_jax.train.fingerprint import make_fingerprint
from cast_jax.train.losses import check_sft_batch, check_sft_examples, make_sft_loss_fn
from cast_jax.train.loop import train
from cast_jax.train.state import TrainState, merge, partition, weight_decay_mask
from cast_jax.train.step import OptimizerConfig, build_optimizer, make_train_step


def run_sft(params: Params, config: ModelConfig, examples: Sequence[Example], *, pad_id: int,
            num_steps: int, batch_size: int, seed: int, optimizer: OptimizerConfig,
            trainable_mask: Any = True, workdir: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, pad_multiple: int = 16,
            buckets: Sequence[int] | None = None, remat: bool = False, per_sequence: bool = False,
            progress: bool = True, log_every: int = 25, extend: bool = False,
            overwrite: bool = False) -> tuple[Params, dict]:
  """Fine-tunes `params` on right-padded batches drawn from `examples` in a seeded order.

  Args:
    params: the param pytree to start from (not modified).
    examples: (input_ids int32 [T_i], loss_mask int32 [T_i]) pairs (`data.encode_dataset`).
    pad_id: padding token id.
    num_steps: train-step calls; epochs roll over as needed.
    batch_size, seed: the data order is a pure function of (seed, step), so resume is exact.
    optimizer: AdamW / schedule / clipping / accumulation settings; weight decay applies to
      matrices and embeddings only, never to norms or biases (`state.weight_decay_mask`).
    trainable_mask: bool pytree (prefix) selecting the trained params; True = all.
    per_sequence: average the loss per example first (see `losses.sft_loss`).
    workdir: metrics.jsonl + orbax checkpoints (resumed if present); None writes nothing.
      The run's fingerprint (params, data, seed, batch size, optimizer, model config, mask,
      padding, loss options, num_steps) is recorded there; a workdir holding a different run is
      refused naming the differing fields (see `train`).
    extend, overwrite: continue the workdir's run past its recorded num_steps / discard it and
      start over (see `train`).
    pad_multiple, buckets: sequence lengths are padded to a multiple of `pad_multiple`, or to
      the smallest of `buckets` that fits (few compiled shapes).

  Returns:
    (params after training, the trainer's summary dict).
  """
  # Every id checked once on the host: out of range it would train on NaN embeddings and fail
  # as a "non-finite loss", blaming the learning rate.
  check_sft_examples(examples, config.vocab_size, pad_id)
  trainable, frozen = partition(params, trainable_mask)
  # The step donates its state; copy so the caller's arrays survive (params are not modified).
  trainable = jax.tree.map(jnp.copy, trainable)
  # Decay only matrices (and embeddings): decaying RMSNorm weights pulls them towards 0.
  tx, lr_fn = build_optimizer(optimizer, weight_decay_mask=weight_decay_mask(trainable))
  step = make_train_step(make_sft_loss_fn(config, remat=remat, per_sequence=per_sequence), tx)
  state = TrainState.create(trainable, tx, jax.random.PRNGKey(seed))

  def batches_fn(start):
    return (b for _, _, b in iterate_train_batches(
        examples, batch_size=batch_size, seed=seed, pad_id=pad_id, start_step=start,
        multiple=pad_multiple, buckets=buckets))

  fingerprint = None if workdir is None else make_fingerprint(
      data=examples, seed=seed, batch_size=batch_size, pad_id=pad_id, optimizer=optimizer,
      model=config, trainable_mask=trainable_mask, pad_multiple=pad_multiple, buckets=buckets,
      per_sequence=per_sequence)
  state, summary = train(step, state, frozen, batches_fn, num_steps=num_steps, workdir=workdir,
                         checkpoint_every=checkpoint_every, lr_fn=lr_fn,
                         check_batch=check_sft_batch, progress=progress, log_every=log_every,
                         fingerprint=fingerprint, extend=extend, overwrite=overwrite)
  return merge(state.trainable, frozen), summary
