"""Config for launch/cast_experiment.py: the CAST experiment (cast.md 4-5, App. E, F) per seed.

  --config.seeds=21,42,84 --config.num_buckets=4 --config.recipe.learning_rate=5e-4

The recipe is the testbed's: set ONCE from Full SFT alone (`--choose_recipe`, which writes
recipe.json with its grid, the rule and the override line), then frozen here, with `recipe_note`
saying how, before any bucket was run. On another model start from the paper's Table 3
(lr 1e-4, 1 epoch: `--config.recipe.learning_rate=1e-4 --config.recipe.num_steps=0`) or run
--choose_recipe on it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seeds = "21,42,84"         # Table 3's seeds (comma-separated)
  c.num_buckets = 4            # M equal buckets by score (B1 = Risky, BM = Safe)
  c.rankings = "c,o,s"         # bucket runs per ranking: C (Table 7/8), and O-only, S-only (F.1)
  c.fractions = "25,50,75"     # Table 9 trajectories: Top-p% / Bottom-p% of C (100% = Full SFT)
  c.pcgrad_runs = "full,random,risky,safe"  # Table 2 (PCGrad versions); "" for none
  c.pcgrad_mode = "one_sided"  # the paper's baseline; or "symmetric"
  # Frozen from `--choose_recipe` on testbed v5 (the paper's Table 3 lr 1e-4 x 1 epoch left
  # Full-SFT refusal at the base's .16): lr 1e-3, 640 micro-batches (2 epochs of D_align).
  c.recipe = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, epochs=1,
      num_steps=640,        # > 0 overrides epochs (train-step calls = micro-batches)
      batch_size=4, accum_steps=2, max_len=1024, schedule="constant", warmup_steps=0,
      weight_decay=0.0, grad_clip_norm=1.0))
  c.recipe_note = ("chosen once by --choose_recipe on testbed v5 from Full SFT alone: the fewest "
                   "steps, then the lowest lr, of lr {1e-4, 5e-4, 1e-3} x steps {320, 640, "
                   "1280} whose held-out Avg Safe reaches 0.8 (0.960); utility not consulted")
  c.lora = ml_collections.ConfigDict(dict(rank=32, alpha=32.0, dropout=0.0))
  c.eval = ml_collections.ConfigDict(dict(
      limit=200, batch_size=32,
      max_new_tokens=72))   # the testbed's answers end well within 72 (the paper: 1024 for GSM8K)
  c.export_merged = False   # merged HF checkpoint per run (the PEFT adapter is always written)
  c.checkpoint_every = 0
  # The diagnosis (launch/diagnose.py on the base model) when --diagnosis is not given.
  c.diagnosis = ml_collections.ConfigDict(dict(
      n_safe=500, n_util=500,  # F.3 (data efficiency): n_util=100
      util_kind="mcq",         # F.4 (data source): "reasoning", with reasoning_data (GSM8K schema)
      reasoning_data="",       # GSM8K-schema D_util for util_kind=reasoning ('' on --testbed:
                               # the world's gsm8k/train.jsonl)
      seed=0, gen_len=64, batch_size=16,
      extra=""))               # more launch.diagnose flags, space-separated
  # --choose_recipe: Full SFT over this grid; the cheapest point (fewest steps, then lowest lr)
  # whose held-out Avg Safe reaches safety_target is chosen. Utility is NOT looked at. Steps
  # are train-step calls: on the testbed's 1,280-row D_align, 320 = 1 epoch of batch 4.
  c.choose = ml_collections.ConfigDict(dict(
      learning_rates="1e-4,5e-4,1e-3", num_steps="320,640,1280", safety_target=0.8, seed=42))
  # Conflict drift (beyond the paper): re-diagnose Full SFT at this many evenly spaced
  # checkpoints (seed = the first seed); 0 = off.
  c.drift = ml_collections.ConfigDict(dict(checkpoints=4))
  return c
