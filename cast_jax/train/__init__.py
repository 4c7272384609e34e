"""Train step and loop over any trainable pytree (full, masked, LoRA, LCDD); orbax; HF export."""

from cast_jax.train.checkpoint import (CheckpointMismatchError, Checkpointer, export_hf,
                                       load_pytree, save_pytree)
from cast_jax.train.losses import check_sft_batch, make_sft_loss_fn, sft_loss, sft_token_nll
from cast_jax.train.loop import (NonFiniteLossError, epoch_batches, indexed_batches, train)
from cast_jax.train.state import (TrainState, cast_floating, mask_from_fn, merge, partition,
                                  tree_equal)
from cast_jax.train.step import (OptimizerConfig, build_optimizer, build_schedule,
                                 make_train_step)

__all__ = [
    "CheckpointMismatchError", "Checkpointer", "NonFiniteLossError", "OptimizerConfig",
    "TrainState", "build_optimizer", "build_schedule", "cast_floating", "check_sft_batch",
    "epoch_batches", "export_hf", "indexed_batches", "load_pytree", "make_sft_loss_fn",
    "make_train_step", "mask_from_fn", "merge", "partition", "save_pytree", "sft_loss",
    "sft_token_nll", "train", "tree_equal",
]
