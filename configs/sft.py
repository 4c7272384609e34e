"""Config for launch/sft.py: the SFT stage that makes W_ft (lcdd-sft-eraser.md F.2).

  --config=configs/sft.py --config.num_steps=300 --config.optimizer.learning_rate=3e-4

Paper defaults: full fine-tuning at lr 2e-5 on 5,000 samples of the behaviour dataset. The paper
gives neither the SFT epochs nor the batch size, schedule or warmup; 3 epochs of batch 8,
constant lr and no weight decay are used. On the testbed (300 steps of batch 16), 2e-5 already
installs the fixed response (.98 on held-out instructions, GSM8K .905 -> .82); the alignment
lr 5e-4 gives 1.00 but wipes out GSM8K (.015).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      fixed_response="I don't know.",  # the fixed_response behaviour's target
      num_samples=5000,   # F.2: 5,000 training samples per task; 0 = all
      sample_seed=0,      # the sample (and the safety 1:1 draw); launch/lcdd.py uses the same
      subset="",          # hub ids only; "" = the adapter's default
      split="",
      max_len=256))
  c.batch_size = 8
  c.epochs = 3
  c.num_steps = 0         # > 0 overrides epochs (train-step calls)
  c.log_every = 10
  c.checkpoint_every = 0  # 0: only the final checkpoint
  c.remat = False
  c.export_dtype = ""     # "" keeps float32; e.g. "bfloat16"
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-5, schedule="constant", warmup_steps=0, weight_decay=0.0,
      grad_clip_norm=1.0, accum_steps=1))
  return c
