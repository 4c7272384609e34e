"""Config for launch/demo.py.

  --config=configs/demo.py          the end-to-end demo on the testbed (the default)
  --config=configs/demo.py:smoke    the 30-second smoke run on a random checkpoint

Every reduced size of the demo is a field here; the defaults keep the whole run (testbed build
included) within ~15 minutes on a 2-core CPU. Raise them toward the papers' settings with e.g.
--config.buckets.eval_limit=200 --config.eraser.num_steps=2000.
"""

import ml_collections


def _smoke() -> ml_collections.ConfigDict:
  """A tiny random checkpoint, greedy generation and a per-head sanity table."""
  c = ml_collections.ConfigDict()
  c.mode = "smoke"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
      num_heads=8, num_kv_heads=4, head_dim=8, init_std=0.2))
  c.batch_size = 4
  c.prompt_len = 12
  c.max_new_tokens = 24
  return c


def get_config(mode: str = "full") -> ml_collections.ConfigDict:
  if mode == "smoke":
    return _smoke()
  if mode != "full":
    raise ValueError(f"configs/demo.py: unknown mode {mode!r}; use 'full' (default) or 'smoke'.")
  c = ml_collections.ConfigDict()
  c.mode = "full"
  c.cache_dir = ""  # testbed cache: "" = $CAST_JAX_CACHE or ~/.cache/cast_jax
  # Also build the aligned testbed model (~20 s), so the test suite reuses this build.
  c.build_aligned = True
  # 1. CAST diagnosis of the base model (launch.diagnose; cast.md section 3).
  c.diagnosis = ml_collections.ConfigDict(dict(
      n_safe=100, n_util=64, gen_len=32, batch_size=16, num_buckets=4, seed=0))
  # 2. The reduced bucket experiment: one seed; Full SFT, Random, B1 (Risky) and BM (Safe),
  # with configs/cast_experiment.py's recipe (lr 1e-3, 640 micro-batches of 4 x accum 2).
  c.buckets = ml_collections.ConfigDict(dict(
      seed=42, learning_rate=1e-3, num_steps=640, eval_limit=100, eval_batch_size=32,
      max_new_tokens=72))
  # 3. SFT on the fixed-response behaviour (W_ft; launch.sft), the testbed's 2e-5 setting.
  c.sft = ml_collections.ConfigDict(dict(
      num_steps=300, batch_size=16, learning_rate=2e-5, max_len=96))
  # 4. LCDD (launch.lcdd): the asymmetric Table 7 row with the stall rule off
  # (docs/results/lcdd_testbed.md), a shorter warmup and step cap.
  c.lcdd = ml_collections.ConfigDict(dict(
      preset="fixed_response_vicuna", num_steps=1000, warmup_steps=300, stall_enabled=False,
      max_len=96))
  # 5. SFT-Eraser (launch.eraser) on the LCDD carrier, then the carrier evaluation of Base /
  # SFT / LCDD / LCDD+Trigger on `eval_limit` held-out prompts (F.3's trigger settings, fewer
  # steps).
  c.eraser = ml_collections.ConfigDict(dict(
      num_steps=300, eval_every=50, num_prompts=200, selection_prompts=32, eval_limit=50,
      max_new_tokens=64))
  return c
