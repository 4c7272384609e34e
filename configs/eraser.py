"""Config for launch/eraser.py: a soft trigger that reverts a carrier model to its base.

  --config=configs/eraser.py --config.num_steps=500 --config.align=mean

The trigger fields are `carrier_jax.eraser.EraserConfig`'s, with F.3's values as defaults:
length 20, batch 16, Adam lr 3e-3, alpha 0.7, tail-k 8, beta 0.1, R = 1.0, 200 prompts, 2,000
steps. The rest: which prompts, how long, and the optional evaluation (needs --sft).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.behaviour = "fixed_response"  # schema of --data / --heldout (carrier_jax.evaluation)
  # Trigger optimisation (F.3).
  c.length = 20
  c.place = "after_bos"           # after_bos | start (carrier_jax.trigger.PLACES)
  c.lr = 3e-3
  c.batch_size = 16
  c.num_steps = 2000
  c.num_prompts = 200             # training prompts (safety: harmful and benign 1:1, F.3)
  c.radius = 1.0
  c.alpha = 0.7
  c.tail_k = 8
  c.beta = 0.1
  c.align = "prompt"              # prompt | mean (the authors' release) | last
  c.use_mse = True                # False: the output-only ablation (no L_MSE)
  c.eval_every = 100              # steps between held-out evaluations (best-trigger selection)
  c.log_every = 10
  c.seed = 0
  c.max_prompt_len = 256          # longer rendered prompts are left out
  # --heldout: the first `selection_prompts` choose the best trigger; the next `eval_limit`
  # (per kind) are the evaluation's held-out prompts (only with --sft).
  c.selection_prompts = 32
  c.eval_limit = 100
  c.mcq_limit = 200               # --mmlu: items of the MMLU-analogue column
  c.model_name = "LCDD"           # the erased model's row name (e.g. "SFT" for the ablation)
  c.max_new_tokens = 128          # evaluation decode (F.4); safety uses safety_max_new_tokens
  c.safety_max_new_tokens = 512
  c.eval_batch_size = 16
  c.max_len = 1024                # longest teacher-forced KL row
  c.lexicon = ""                  # style: archaic lexicon file, one word a line; "" = shipped
  c.data = ml_collections.ConfigDict(dict(subset="", split=""))  # hub ids only
  # The GCG-style hard-token trigger (carrier_jax.hard_trigger.HardTriggerConfig), off by
  # default: one step scores num_candidates single-token swaps on batch_size prompts.
  c.hard = ml_collections.ConfigDict(dict(
      enabled=False, num_steps=100, top_k=64, num_candidates=128, batch_size=16,
      move_always=True, eval_every=10))
  return c
