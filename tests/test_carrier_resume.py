"""Kill and resume of an LCDD run through `cast_jax.train.train`: a run killed after a
mid-accumulation checkpoint and resumed by a fresh call (everything rebuilt from scratch, as a
new process would) ends bit-identical to an uninterrupted one: carrier, AdamW / SGD state and the
multiplier's state in the optimizer state, and the logged controller curves."""

import json
import os

import jax
import numpy as np
import pytest

from carrier_jax.delta import init_carrier
from carrier_jax.lcdd import build_lcdd_optimizer, make_lcdd_train_step
from carrier_jax.multiplier import MultiplierConfig, find_multiplier_state
from cast_jax.models import ModelConfig, init_params
from cast_jax.train import Checkpointer, OptimizerConfig, TrainState, train, tree_equal

CONFIG = ModelConfig(model_type="llama", vocab_size=40, hidden_size=8, intermediate_size=12,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
# T_w = 2 optimizer updates = 4 micro-steps: the kill at step 5 falls after the budget is fixed,
# the checkpoint at step 3 inside an accumulation window (MultiSteps buffer and the controller's
# loss_sum both half full).
MCFG = MultiplierConfig(warmup_steps=2, lambda_init=0.5, eta=0.5, budget_ratio=0.1)
ACCUM, STEPS = 2, 8


class Killed(Exception):
  pass


def _batch(step):
  r = np.random.default_rng([5, step])
  ids = r.integers(0, CONFIG.vocab_size, (2, 6)).astype(np.int32)
  loss_mask = np.zeros((2, 6), np.int32)
  loss_mask[:, 2:] = 1
  return {"input_ids": ids, "attention_mask": np.ones((2, 6), np.int32), "loss_mask": loss_mask}


def _batches(kill_at=None):
  def batches_fn(start):
    s = start
    while True:
      if s == kill_at and start == 0:
        raise Killed()
      yield _batch(s)
      s += 1

  return batches_fn


def _run(workdir, batches_fn, **kwargs):
  """A whole LCDD run set up from scratch (seeded), as `launch/lcdd.py` would in a new process."""
  base = init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)
  ft = init_params(CONFIG, jax.random.PRNGKey(1), std=0.2)
  carrier = init_carrier(CONFIG, base, ft, jax.random.PRNGKey(2))
  tx = build_lcdd_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                            multiplier=MCFG, accum_steps=ACCUM)
  state = TrainState.create(carrier, tx, jax.random.PRNGKey(3))
  return train(make_lcdd_train_step(CONFIG, tx), state, base, batches_fn, num_steps=STEPS,
               workdir=workdir, progress=False, log_every=1, **kwargs)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(ln) for ln in f]


def test_lcdd_kill_and_resume_is_bitwise_identical(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  full, _ = _run(a, _batches())
  with pytest.raises(Killed):
    _run(b, _batches(kill_at=5), checkpoint_every=3)
  assert Checkpointer(os.path.join(b, "checkpoints")).all_steps() == [3]
  resumed, summary = _run(b, _batches(kill_at=5), checkpoint_every=3)
  assert summary["start_step"] == 3 and summary["final_step"] == STEPS

  assert tree_equal(resumed.trainable, full.trainable)
  assert tree_equal(resumed.opt_state, full.opt_state)
  assert tree_equal(resumed, full)
  ctrl = find_multiplier_state(resumed.opt_state)
  # Guards against a vacuous match: the controller ran past warmup and moved lambda.
  assert int(ctrl.updates) == STEPS // ACCUM and float(ctrl.budget) > 0
  assert float(ctrl.lam) != MCFG.lambda_init
  ra, rb = _rows(a), _rows(b)
  assert [r["step"] for r in rb] == list(range(1, STEPS + 1))
  for key in ("loss", "task_loss", "active_gates", "extra/multiplier/lam",
              "extra/multiplier/ema", "extra/multiplier/budget", "extra/multiplier/loss_sum"):
    assert [r[key] for r in ra] == [r[key] for r in rb], key
