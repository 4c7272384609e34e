"""Config for launch/carrier_eval.py: Base / SFT / LCDD on held-out prompts of one behaviour.

  --config=configs/carrier_eval.py --config.limit=100 --config.max_new_tokens=64

F.4's decode defaults: greedy, 200 prompts per condition, 128 new tokens (512 for safety:
`safety_max_new_tokens`). KL(SFT||LCDD) is teacher-forced on the SFT model's greedy responses.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.limit = 200                  # held-out prompts per kind (safety: harmful and benign each)
  c.mcq_limit = 200              # MMLU-analogue items (0: all)
  c.max_new_tokens = 128         # fixed_response and style (F.4)
  c.safety_max_new_tokens = 512  # safety (F.4)
  c.batch_size = 16
  c.max_len = 1024               # longest teacher-forced [prompt; reference] row
  c.lexicon = ""                 # style: archaic lexicon file, one word a line; "" = shipped
  c.num_samples = 3              # responses per model kept in eval.json for reading
  c.data = ml_collections.ConfigDict(dict(subset="", split=""))  # --data as a hub id only
  return c
