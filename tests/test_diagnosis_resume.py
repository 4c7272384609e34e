"""Unit groups (one ablation = `group` query heads, e.g. one KV head) against a one-unit-at-a-time
loop of plain scorers; the sweeps' resumable blocks (a sweep killed after k blocks and resumed
equals an uninterrupted one, and recomputes none of the k); `decode_under_masks` against
`generate` + the tokenizer; the launch killed mid-stage and re-run gives the same conflict map."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from cast_jax import data
from cast_jax.diagnosis import (calibration, head_ablation, safety_proxy, sensitivity,
                                stage_cache)
from cast_jax.eval import EvalModel, score_mcq, score_refusal_generation
from cast_jax.generate import generate
from cast_jax.models import forward
from hf_models import tiny_llama_on_testbed_vocab
from diagnosis_launch_fixtures import REPO, _args, _launch
from test_diagnosis_proxy import _np_target_logprob
from test_diagnosis_sensitivity import ParityJudge

GEN_LEN = 5


class Killed(Exception):
  """Stands in for a kill between two blocks."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  world, tok, model, config, params = tiny_llama_on_testbed_vocab(tmp_path_factory.mktemp("llama"))
  mmlu = data.load_mmlu(list(world.files["calib/d_util.jsonl"]), limit=5)
  safety = data.load_wildjailbreak(list(world.files["calib/d_safe.jsonl"]))[:3]
  mcq_set, _ = calibration.util_calibration(tok, mmlu, max_len=96)
  harmful = [data.safety_prompt(r) for r in safety if r.harmful][:2]
  seqs, ks = safety_proxy.proxy_examples(tok, harmful, ("I'm sorry", "I can't help with that"))
  return dict(tok=tok, config=config, params=params, mmlu=mmlu, safety=safety, mcq_set=mcq_set,
              prompt_ids=calibration.safety_prompt_ids(tok, safety), seqs=seqs, ks=ks)


def _unit_mask(config, layer, unit, group):
  return jnp.ones((config.num_layers, config.num_heads)).at[
      layer, unit * group:(unit + 1) * group].set(0.0)


def test_unit_masks_and_group_errors(setup):
  config = setup["config"]  # L=3, H=4 (2 KV heads)
  masks = head_ablation.unit_masks(config, 2)
  assert masks.shape == (6, 3, 4)
  for i in range(6):
    np.testing.assert_array_equal(masks[i], np.asarray(_unit_mask(config, i // 2, i % 2, 2)))
  for layer in range(3):
    np.testing.assert_array_equal(sensitivity.layer_head_masks(config, layer, 2),
                                  masks[2 * layer:2 * layer + 2, layer:])
  np.testing.assert_array_equal(head_ablation.unit_masks(config, 1),
                                1.0 - np.eye(12).reshape(12, 3, 4))
  for bad in (3, 0, 8):
    with pytest.raises(ValueError, match="group"):
      sensitivity.mcq_sweep(setup["params"], config, setup["mcq_set"], pad_id=0, group=bad)
  with pytest.raises(ValueError, match="group"):
    sensitivity.layer_head_masks(config, 0, group=3)


def test_grouped_sweeps_equal_one_unit_at_a_time(setup):
  tok, config, params = setup["tok"], setup["config"], setup["params"]
  L, g = config.num_layers, 2
  mcq = sensitivity.mcq_sweep(params, config, setup["mcq_set"], pad_id=0, batch_size=3,
                              group=g)
  judge = ParityJudge()
  safe = sensitivity.safety_sweep(params, config, tok, setup["prompt_ids"], group=g,
                                  max_new_tokens=GEN_LEN, pad_id=0, batch_size=2, mask_block=3,
                                  judge=judge)
  proxy = safety_proxy.proxy_safety_sweep(params, config, setup["seqs"], setup["ks"], pad_id=0,
                                          batch_size=3, group=g)
  assert mcq.predictions.shape == (L, 2, 5) and safe.refused.shape == (L, 2, 3)
  assert proxy.logprob.shape == (L, 2, len(setup["seqs"]))
  prompts = [data.render_prompt(tok, data.mcq_prompt(r)) for r in setup["mmlu"]]
  answers = [r.answer_index for r in setup["mmlu"]]
  rendered = [data.render_prompt(tok, data.safety_prompt(r)) for r in setup["safety"]]
  for layer in range(L):
    for unit in range(2):
      hm = _unit_mask(config, layer, unit, g)
      ours = score_mcq(EvalModel(params, config, head_mask=hm), tok, prompts, answers,
                       batch_size=4)
      np.testing.assert_array_equal(mcq.predictions[layer, unit], ours.predictions)
      _, verdicts, _ = score_refusal_generation(
          EvalModel(params, config, head_mask=hm), tok, rendered, max_new_tokens=GEN_LEN,
          judge=judge, batch_size=4, eos_token_ids=[tok.eos_token_id])
      np.testing.assert_array_equal(safe.refused[layer, unit],
                                    [v.value == "refused" for v in verdicts])
      ref = [_np_target_logprob(np.asarray(forward(params, config, jnp.asarray([s]),
                                                   head_mask=hm)[0], np.float64), s, k)
             for s, k in zip(setup["seqs"], setup["ks"])]
      np.testing.assert_allclose(proxy.logprob[layer, unit], ref, rtol=1e-5, atol=1e-4)
  # Some ablation changes something, so the equalities above are not vacuous.
  assert (mcq.predictions != mcq.base_predictions).any() or (
      safe.refused != safe.base_refused).any()


def test_decode_under_masks_equals_generate_and_decode(setup):
  tok, config, params = setup["tok"], setup["config"], setup["params"]
  masks = head_ablation.unit_masks(config, 1)[[0, 5, 11]]
  texts = sensitivity.decode_under_masks(params, config, tok, setup["prompt_ids"], masks,
                                         max_new_tokens=GEN_LEN, pad_id=0, batch_size=2,
                                         mask_block=2)
  assert len(texts) == 3 and all(len(t) == 3 for t in texts)
  eos = tok.eos_token_id
  for m in range(3):
    for n, p in enumerate(setup["prompt_ids"]):
      out = generate(params, config, np.asarray([p]), max_new_tokens=GEN_LEN, eos_token_ids=[eos],
                     pad_token_id=0, head_mask=jnp.asarray(masks[m])).trimmed()[0]
      assert texts[m][n] == tok.decode([t for t in out if t != eos], skip_special_tokens=True)
  with pytest.raises(ValueError, match="head_masks"):
    sensitivity.decode_under_masks(params, config, tok, setup["prompt_ids"], masks[:, :2],
                                   max_new_tokens=2, pad_id=0)


def _killed_then_resumed(sweep, workdir, name, kill_after):
  """Runs sweep(done=, on_block=, progress=) through stage_cache, 'killed' after `kill_after`
  stored blocks; then resumes. Returns (result, keys stored before the kill, keys the resumed
  run computed, units the resumed run reported)."""
  saved = []

  def first_run(done, save):
    def on_block(key, arr):
      save(key, arr)
      saved.append(key)
      if len(saved) == kill_after:
        raise Killed
    return sweep(done=done, on_block=on_block)

  with pytest.raises(Killed):
    stage_cache.cached_blocks(workdir, name, first_run)
  computed, units = [], []

  def second_run(done, save):
    assert sorted(done) == sorted(saved)
    return sweep(done=done, on_block=lambda k, a: (computed.append(k), save(k, a)),
                 progress=units.append)

  result, reused = stage_cache.cached_blocks(workdir, name, second_run)
  assert reused == sorted(saved)
  return result, saved, computed, sum(units)


def test_killed_sweeps_resume_to_the_uninterrupted_result(setup, tmp_path):
  tok, config, params = setup["tok"], setup["config"], setup["params"]
  L, H = config.num_layers, config.num_heads

  def mcq(**kw):
    return sensitivity.mcq_sweep(params, config, setup["mcq_set"], pad_id=0, batch_size=3,
                                 layer_block=1, **kw)

  full = sensitivity.mcq_sweep(params, config, setup["mcq_set"], pad_id=0, batch_size=3)
  got, saved, computed, units = _killed_then_resumed(mcq, str(tmp_path), "mcq", kill_after=2)
  assert saved == ["layers_000_001", "layers_001_002"] and computed == ["layers_002_003"]
  assert units == pytest.approx(H)  # only the last layer's heads ran again
  np.testing.assert_array_equal(got.predictions, full.predictions)
  np.testing.assert_array_equal(got.base_predictions, full.base_predictions)

  # The safety sweep: 13 masks in blocks of 5; killed after the diag_first.
  kw = dict(max_new_tokens=GEN_LEN, pad_id=0, batch_size=2, judge=ParityJudge())

  def safety(**more):
    return sensitivity.safety_sweep(params, config, tok, setup["prompt_ids"], mask_block=5,
                                    **kw, **more)

  full_s = safety()
  got_s, saved, computed, units = _killed_then_resumed(safety, str(tmp_path), "safety", 1)
  assert [k for k, *_ in sensitivity.safety_blocks(config, 1, 5)] == saved + computed
  assert units == 1 + L * H - 5
  np.testing.assert_array_equal(got_s.refused, full_s.refused)
  np.testing.assert_array_equal(got_s.base_refused, full_s.base_refused)

  # The proxy, with the last layer (and the base values) stored before the "kill".
  def proxy(**more):
    return safety_proxy.proxy_safety_sweep(params, config, setup["seqs"], setup["ks"],
                                           pad_id=0, batch_size=3, layer_block=2, **more)

  full_p = proxy()
  got_p, saved, computed, _ = _killed_then_resumed(proxy, str(tmp_path), "proxy", 1)
  assert saved == ["layers_000_002"] and computed == ["layers_002_003"]
  np.testing.assert_allclose(got_p.logprob, full_p.logprob, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_p.base_logprob, full_p.base_logprob, rtol=1e-6, atol=1e-6)
  # With the last block given, the base values come from a separate full forward.
  last = proxy(done={"layers_002_003": full_p.logprob[2:]})
  np.testing.assert_allclose(last.base_logprob, full_p.base_logprob, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(last.logprob, full_p.logprob, rtol=1e-6, atol=1e-6)
  # Blocks from another run's shapes are refused, not silently mixed in.
  with pytest.raises(ValueError, match="another run"):
    proxy(done={"layers_000_002": np.zeros((2, H, 1))})


_KILL_AFTER_FIRST_SAFETY_BLOCK = """
import os, runpy, signal, sys
from cast_jax.diagnosis import stage_cache
save = stage_cache.save_block
def save_then_die(workdir, name, key, array):
  path = save(workdir, name, key, array)
  if name == "safety_sweep":
    os.kill(os.getpid(), signal.SIGKILL)
  return path
stage_cache.save_block = save_then_die
sys.argv = ["launch.diagnose", *sys.argv[1:]]
runpy.run_module("launch.diagnose", run_name="__main__")
"""


def test_launch_killed_mid_safety_sweep_resumes_to_the_same_map(diag_files, diag_first):
  """SIGKILL right after the first stored block of the safety sweep (13 masks, mask_block 5),
  then an ordinary re-run: the same conflict_map.json as the uninterrupted run (`diag_first`),
  and the block stored before the kill is reused, not rewritten. (Stages 1-2, finished before
  the kill, are reused too: stage-level resume.)"""
  wd = diag_files / "wd_killed"
  args = _args("wd_killed", "--config.mask_block=5")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  got = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_SAFETY_BLOCK, *args],
                       cwd=diag_files, env=env, capture_output=True, text=True, timeout=300)
  assert got.returncode == -9, got.stderr[-3000:]
  blocks = sorted(os.listdir(wd / "stages" / "safety_sweep"))
  assert blocks == ["masks_000000_000005.npz"]
  assert not (wd / "stages" / "safety_sweep.npz").exists()
  assert not (wd / "conflict_map.json").exists()
  before = os.stat(wd / "stages" / "safety_sweep" / blocks[0])
  again = _launch(*args, cwd=diag_files)
  assert again.returncode == 0, again.stderr[-3000:]
  after = os.stat(wd / "stages" / "safety_sweep" / blocks[0])
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  assert sorted(os.listdir(wd / "stages" / "safety_sweep")) == [
      "masks_000000_000005.npz", "masks_000005_000010.npz", "masks_000010_000013.npz"]
  ours = json.loads((wd / "conflict_map.json").read_text())
  ref = json.loads((diag_files / "wd" / "conflict_map.json").read_text())
  assert ours == ref
