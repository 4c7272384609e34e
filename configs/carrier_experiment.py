"""Config for launch/carrier_experiment.py: the LCDD / SFT-Eraser tables (issue 12 item 6).

  --config.sft.num_steps=300 --config.lcdd.num_steps=2000 --config.eraser.num_steps=500

Each stage is its own launch (configs/sft.py, configs/lcdd.py, configs/eraser.py,
configs/carrier_eval.py) run as a child process; the fields here are only the ones the
experiment sets (0 / "" = that launch's default), plus `extra`: more of that launch's flags,
space-separated (e.g. "--config.batch_size=4"). Small step counts make a smoke run.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.sft = ml_collections.ConfigDict(dict(num_steps=0, extra=""))
  # preset "": the behaviour's (fixed_response_vicuna / safety_qwen / shakespeare_deepseek).
  c.lcdd = ml_collections.ConfigDict(dict(preset="", num_steps=0, extra=""))
  # mask-only LCDD (Appendix E, Table 6): the same preset with --config.mask_only=True.
  c.lcdd_mask = ml_collections.ConfigDict(dict(num_steps=0, extra=""))
  # every SFT-Eraser run (LCDD, SFT with the LCDD channels, mask-only, output-only).
  c.eraser = ml_collections.ConfigDict(dict(num_steps=0, hard=False, extra=""))
  # launch.carrier_eval on Base / SFT / LCDD for the MMLU-analogue column (only with --mmlu).
  c.eval = ml_collections.ConfigDict(dict(extra=""))
  return c
