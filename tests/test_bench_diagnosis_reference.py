"""The per-head HF loop `benchmarks/bench_diagnosis.py` times the library against
(`benchmarks/diagnosis_reference.py`) computes the same diagnosis on a tiny random Llama over
the testbed vocabulary: O from torch autograd, MCQ predictions and greedy responses under each
hooked head, and C with scipy's ranks (checked on a hand example with ties). So a speed ratio
that benchmark prints is between two implementations of one computation."""

import os
import sys

import numpy as np
import pytest

from cast_jax import data
from cast_jax.diagnosis import (calibration, calibration_batches, head_gradients, mcq_sweep,
                                optimization_conflict, safety_prompt_ids, score_heads)
from cast_jax.diagnosis.sensitivity import decode_under_masks
from hf_models import tiny_llama_on_testbed_vocab

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import diagnosis_reference as ref  # noqa: E402

GEN_LEN = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  world, tok, model, config, params = tiny_llama_on_testbed_vocab(tmp_path_factory.mktemp("m"))
  safety = data.load_wildjailbreak(list(world.files["calib/d_safe.jsonl"]))[:5]
  mmlu = data.load_mmlu(list(world.files["calib/d_util.jsonl"]), limit=6)
  _, safe_ex = calibration.safe_calibration(tok, safety, max_len=96)
  mcq_set, util_ex = calibration.util_calibration(tok, mmlu, max_len=96)
  return dict(tok=tok, model=model, config=config, params=params, safe_ex=safe_ex,
              util_ex=util_ex, mcq_set=mcq_set, prompts=safety_prompt_ids(tok, safety))


def test_reference_o_equals_library_gradients(setup):
  s = setup
  batches = lambda ex: calibration_batches(ex, batch_size=4, pad_id=0)
  g_safe, _ = head_gradients(s["params"], s["config"], batches(s["safe_ex"]))
  g_util, _ = head_gradients(s["params"], s["config"], batches(s["util_ex"]))
  _, o = optimization_conflict(g_safe, g_util)
  # Different batch sizes on the two sides: the normalisation is over the whole set.
  o_ref = ref.conflict_o(s["model"], s["safe_ex"], s["util_ex"], 3, 0)
  np.testing.assert_allclose(o_ref, o, atol=1e-5)
  assert np.ptp(o) > 1e-3  # heads differ, so the comparison is not of constants


def test_reference_sweeps_equal_library_sweeps(setup):
  s = setup
  config, m = s["config"], s["mcq_set"]
  L, H = config.num_layers, config.num_heads
  heads = [(l, h) for l in range(L) for h in range(H)]
  base, ablated = ref.mcq_loop(s["model"], m.prompt_ids, m.choice_ids, heads, 4, 0)
  sweep = mcq_sweep(s["params"], config, m, pad_id=0, batch_size=4)
  np.testing.assert_array_equal(base, sweep.base_predictions)
  np.testing.assert_array_equal(ablated, sweep.predictions.reshape(L * H, -1))
  assert (ablated != base).any()
  some = [None, (0, 1), (L - 1, H - 1)]
  masks = np.ones((len(some), L, H), np.float32)
  for i, head in enumerate(some[1:], 1):
    masks[i][head] = 0.0
  ours = decode_under_masks(s["params"], config, s["tok"], s["prompts"], masks,
                            max_new_tokens=GEN_LEN, pad_id=0, batch_size=4, mask_block=3)
  eos = s["tok"].eos_token_id
  for i, head in enumerate(some):
    with ref.ablated(s["model"], head) as hf:
      assert ref.responses(hf, s["tok"], s["prompts"], 3, GEN_LEN, 0, eos) == ours[i], head


def test_reference_conflict_scores_equal_score_heads_with_ties():
  o = np.array([[0.2, 0.5, 0.5], [0.9, 0.1, 0.4]])
  h_gen = np.array([[0.0, 0.1, 0.1], [0.3, 0.0, 0.1]])  # ties: 0.0 x2, 0.1 x3
  h_safe = np.array([[0.2, 0.2, 0.0], [0.0, 0.5, 0.2]])
  # By hand: rank_gen = [0.1, 0.6, 0.6, 1, 0.1, 0.6], rank_safe = [0.6, 0.6, 0.1, 0.1, 1, 0.6].
  want = o.ravel() * np.exp(np.array([0.1, 0.6, 0.6, 1, 0.1, 0.6])
                            - np.array([0.6, 0.6, 0.1, 0.1, 1, 0.6]))
  np.testing.assert_allclose(ref.conflict_scores(o, h_gen, h_safe), want, atol=1e-12)
  np.testing.assert_allclose(score_heads(o, h_gen, h_safe, m=2).c.ravel(), want, atol=1e-12)


def test_device_benchmark_runs_end_to_end_on_a_tiny_shape(tmp_path):
  """benchmarks/bench_diagnosis_device.py (the 8B-on-a-GPU measurement) at --shape=tiny on the
  CPU: every stage runs, the sweeps cover every head, and the JSON holds both sides' times."""
  import json
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "r.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/bench_diagnosis_device.py", "--shape=tiny", "--n_safe=4",
       "--n_util=4", "--gen_len=4", "--prompt_len=12", f"--out={out}"], cwd=repo, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())
  assert got["ours"]["heads"] == 16 and set(got["ours"]["seconds"]) == {"gradients", "mcq",
                                                                       "safety"}
  assert got["reference"]["heads_timed"] == 2 and got["ratio"] > 0
  assert "ours, all 16 heads" in proc.stdout
