"""Config for launch/lcdd.py: LCDD between a base and an SFT checkpoint on a behaviour dataset.

  --config=configs/lcdd.py                       the defaults (Table 7's first row)
  --config=configs/lcdd.py:safety_qwen           a Table 7 row by name (PRESETS)
  --config.multiplier.lambda_max=0.02            any field on top

PRESETS are the 7 rows of lcdd-sft-eraser.md Table 7 (budget ratio, lambda_0, eta, eta_up,
warmup steps, epochs) with F.2's stabilizers: lambda_max for the asymmetric rows, where F.2
gives only "lambda_max in {0.02, 0.05}" without saying which run used which (0.05 here), and
beta = 0.90 for the rows holding Qwen or Vicuna safety and Shakespeare runs (the Shakespeare row
is shared with Mistral; F.2 does not split it). Gates: SGD lr 0.1, momentum 0 (F.2). The paper
does not give the dW optimizer's settings; AdamW at the SFT stage's 2e-5, constant, is used.
"""

import math

import ml_collections
from ml_collections.config_dict import placeholder

# name: (budget_ratio, lambda_init, eta, eta_up, warmup_steps, epochs, beta)
PRESETS = {
    "fixed_response": (0.30, 1.0, 0.1, None, 300, 10, 0.95),  # Qwen, Mistral, DeepSeek
    "fixed_response_vicuna": (0.30, 0.01, 0.1, 0.01, 700, 20, 0.95),
    "safety": (0.30, 0.01, 0.1, None, 300, 20, 0.95),  # Mistral, DeepSeek
    "safety_qwen": (0.01, 0.01, 0.1, 0.01, 300, 20, 0.90),
    "safety_vicuna": (0.50, 0.01, 1.0, 0.005, 300, 20, 0.90),
    "shakespeare": (0.01, 0.01, 0.1, 0.01, 700, 20, 0.90),  # Qwen, Mistral, Vicuna
    "shakespeare_deepseek": (0.01, 0.01, 0.1, 0.01, 300, 20, 0.95),
}
ASYMMETRIC_LAMBDA_MAX = 0.05
_BEHAVIOUR = {"fixed": "fixed_response", "safety": "safety", "shakespeare": "style"}


def get_config(preset: str = "fixed_response") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"configs/lcdd.py: unknown preset {preset!r}; choose from {sorted(PRESETS)}.")
  r, lam0, eta, eta_up, warmup, epochs, beta = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  # The sample settings match configs/sft.py's, so LCDD trains on the SFT stage's pairs.
  c.data = ml_collections.ConfigDict(dict(
      behaviour=_BEHAVIOUR[preset.split("_")[0]],  # the schema of --data (carrier_jax.behaviours)
      fixed_response="I don't know.",  # the fixed_response behaviour's target
      num_samples=5000,    # F.2: 5,000 training samples per task; 0 = all
      sample_seed=0,
      subset="",           # hub ids only; "" = the adapter's default
      split="",
      max_len=256))
  c.batch_size = 8
  c.epochs = epochs
  c.num_steps = 0          # > 0 overrides epochs (train-step calls)
  c.accum_steps = 1
  c.log_every = 10
  c.checkpoint_every = 0   # 0: only the final checkpoint
  c.mask_only = False      # Appendix E: dW frozen at W_ft - W_base
  c.task_loss = "ce"       # "ce": SFT cross-entropy; "kl": KL(SFT || LCDD) per response token
  c.teacher = "online"     # for "kl": "online" (SFT forward each step) or "cached" (top-k)
  c.teacher_top_k = 64     # logits kept per response token by the "cached" teacher
  # The KL starts at ~0 (LCDD starts from the SFT model), so its relative budget
  # EMA * (1 + r) needs a floor: KL(SFT || LCDD) <= this many nats per response token.
  c.kl_budget_floor = 0.01
  c.shard = False          # run the step on a ('data', 'model') mesh over all devices
  c.mesh_model = 1         # the mesh's model axis (data = devices // model)
  c.train_norms = False
  c.remat = "full"         # full | weights (recompute only the masked weights) | none
  c.export_dtype = ""      # "" keeps float32; e.g. "bfloat16"
  c.delta = ml_collections.ConfigDict(dict(
      learning_rate=2e-5, schedule="constant", warmup_steps=0, weight_decay=0.0,
      grad_clip_norm=1.0))
  c.gates = ml_collections.ConfigDict(dict(learning_rate=0.1, momentum=0.0))
  c.gate_init = ml_collections.ConfigDict(dict(mode="normal", mean=1.5, std=0.5, value=0.0))
  c.multiplier = ml_collections.ConfigDict(dict(
      budget_ratio=r, lambda_init=lam0, eta=eta, eta_up=placeholder(float), warmup_steps=warmup,
      beta=beta, lambda_min=0.0,
      lambda_max=math.inf if eta_up is None else ASYMMETRIC_LAMBDA_MAX,
      violation_clip=placeholder(float), ema_init="first"))
  c.multiplier.eta_up = eta_up
  # enabled is the master switch; stall_enabled / breach_enabled switch each rule. window and
  # patience count logged rows (log_every steps each): 20 x 10 = 200 steps, because on the
  # testbed 50-step windows stalled runs that went on from 2% to 44% gate sparsity
  # (docs/results/lcdd_testbed.md).
  c.stop = ml_collections.ConfigDict(dict(
      enabled=True, stall_enabled=True, breach_enabled=True, window=20, stall_ratio=0.01,
      patience=3, breach_ratio=0.5, stop_when_empty=True, arm_ratio=0.01))
  return c
