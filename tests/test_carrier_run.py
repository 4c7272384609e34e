"""`run_lcdd`: the early-stop window survives a resume (its history is re-read from
metrics.jsonl), so a run stopped and continued in a second call stops at the same step, with
the same carrier and controller, as an uninterrupted one."""

import json
import os

import jax
import numpy as np

from carrier_jax.early_stop import StopConfig
from carrier_jax.multiplier import MultiplierConfig
from carrier_jax.run import run_lcdd
from cast_jax.models import ModelConfig, init_params
from cast_jax.train import OptimizerConfig, tree_equal

CONFIG = ModelConfig(model_type="llama", vocab_size=40, hidden_size=8, intermediate_size=12,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
# Window 1, patience 2, stall ratio 1: every post-warmup row after the first counts as stalled,
# so the run stops at the third post-warmup row: step 3 (T_w = 1, one row per step).
STOP = StopConfig(window=1, stall_ratio=1.0, patience=2, breach_ratio=None, arm_ratio=0.0)


def _examples():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(8):
    ids = rng.integers(1, CONFIG.vocab_size, 6).astype(np.int32)
    out.append((ids, np.array([0, 0, 1, 1, 1, 1], np.int32)))
  return out


def _run(workdir, num_steps, **kwargs):
  base = init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)
  ft = init_params(CONFIG, jax.random.PRNGKey(1), std=0.2)
  return run_lcdd(base, ft, CONFIG, _examples(), pad_id=0, num_steps=num_steps, batch_size=2,
                  seed=3, delta_optimizer=OptimizerConfig(learning_rate=1e-3,
                                                          schedule="constant"),
                  multiplier=MultiplierConfig(warmup_steps=1), stop=STOP, workdir=workdir,
                  log_every=1, progress=False, pad_multiple=8, **kwargs)


def test_stop_rule_sees_the_logged_history_after_a_resume(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  car_a, ctrl_a, sum_a = _run(a, 10)
  assert sum_a["final_step"] == 3 and sum_a["stop_reason"].startswith("sparsity_stall")
  _, _, first = _run(b, 2)
  assert first["final_step"] == 2 and first["stop_reason"] == "num_steps"
  # Without rows 1-2 from metrics.jsonl the window would restart and the run stop at step 5.
  car_b, ctrl_b, sum_b = _run(b, 10, extend=True)
  assert sum_b["start_step"] == 2 and sum_b["final_step"] == 3
  assert sum_b["stop_reason"] == sum_a["stop_reason"]
  assert tree_equal(car_a, car_b) and tree_equal(ctrl_a, ctrl_b)
  with open(os.path.join(b, "metrics.jsonl")) as f:
    assert [json.loads(ln)["step"] for ln in f] == [1, 2, 3]
