"""Config for launch/sparse_tune.py: head-restricted LoRA alignment of one head set (cast.md 3.5,
4.2, Table 3).

  --config.recipe.learning_rate=5e-4 --config.recipe.num_steps=320 --config.eval.limit=100

Defaults are the paper's recipe (Table 3): LoRA r 32, alpha 32, dropout 0 on W_q; AdamW lr 1e-4,
1 epoch, batch 4 x gradient accumulation 2, max length 1024. The paper states no schedule,
warmup or weight decay: constant lr, none, none.
"""

import ml_collections


def recipe() -> ml_collections.ConfigDict:
  """The alignment recipe (`cast_jax.tuning.runner.Recipe`); shared with configs/cast_experiment."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-4, epochs=1,
      num_steps=0,          # > 0 overrides epochs (train-step calls = micro-batches)
      batch_size=4, accum_steps=2, max_len=1024, schedule="constant", warmup_steps=0,
      weight_decay=0.0, grad_clip_norm=1.0))


def lora() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(rank=32, alpha=32.0, dropout=0.0))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.recipe = recipe()
  c.lora = lora()
  c.eval = ml_collections.ConfigDict(dict(
      limit=200,             # held-out items per metric
      batch_size=32,
      max_new_tokens=1024))  # the paper's GSM8K budget; the testbed needs 72
  c.export_merged = True     # also write the merged HF checkpoint (<workdir>/merged)
  c.checkpoint_every = 0     # 0: only the final checkpoint
  return c
