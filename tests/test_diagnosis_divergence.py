"""Divergence-first greedy decoding under head masks against step-by-step decoding of every
(mask, prompt) pair (`method="decode"`, itself checked against HF hooks and a one-head loop in
test_diagnosis_sensitivity): identical tokens on a random tiny model, identical refusal
decisions on the aligned testbed."""

import os

import numpy as np
import pytest
import transformers

from cast_jax import data
from cast_jax.diagnosis import calibration, head_ablation, sensitivity
from cast_jax.diagnosis import divergence_decode as dd
from cast_jax.models import load_pretrained
from hf_models import tiny_llama_on_testbed_vocab


def _tokens(params, config, prompts, masks, method, gen_len, **kw):
  return sensitivity._masked_tokens(params, config, prompts, masks, max_new_tokens=gen_len,
                                    eos=list(config.eos_token_ids), pad_id=0, batch_size=3,
                                    mask_block=4, mesh=None, method=method, **kw)


def test_divergence_tokens_equal_step_by_step_decoding(tmp_path, monkeypatch):
  monkeypatch.setattr(sensitivity, "AUTO_PLAIN", 1.0)  # never fall back to "decode" here
  world, tok, _, config, params = tiny_llama_on_testbed_vocab(tmp_path)
  safety = data.load_wildjailbreak(list(world.files["calib/d_safe.jsonl"]))[:7]
  prompts = calibration.safety_prompt_ids(tok, safety)
  L, H = config.num_layers, config.num_heads
  rs = np.random.RandomState(0)
  # All ones, single units, a half-scaled head and multi-layer masks: 7 masks in blocks of 4.
  masks = np.concatenate([np.ones((1, L, H), np.float32), head_ablation.unit_masks(config, 1)[:4],
                          (rs.rand(2, L, H) > 0.3).astype(np.float32)])
  masks[1, L - 1, 0] = 0.5
  gen_len = 12
  want, want_len = _tokens(params, config, prompts, masks, "decode", gen_len)
  got, got_len = _tokens(params, config, prompts, masks, "divergence", gen_len)
  np.testing.assert_array_equal(got_len, want_len)
  np.testing.assert_array_equal(got, want)
  # `first` is where each output leaves the base continuation (mask 0), as numpy finds it.
  runs = dd.base_runs(params, config, prompts, max_new_tokens=gen_len,
                      eos=list(config.eos_token_ids), pad_id=0, batch_size=3, group_size=8)
  _, _, first = dd.decode_with_base(params, config, runs, prompts, masks,
                                    eos=list(config.eos_token_ids), pad_id=0, mask_block=4,
                                    group_size=8)
  for m in range(len(masks)):
    for n in range(len(prompts)):
      diff = np.flatnonzero(want[m, n] != want[0, n])
      assert first[m, n] == (diff[0] if len(diff) else gen_len)
  # Not vacuous: some pairs part from the base, some late, some never.
  parted = first < gen_len
  assert parted.any() and (~parted[1:]).any() and (first[parted] > 0).any()
  assert dd.first_touched_layer(masks[:1]) == L and dd.first_touched_layer(masks[2:4]) == 0


def test_safety_sweep_divergence_equals_decode_on_the_aligned_testbed(monkeypatch):
  monkeypatch.setattr(sensitivity, "AUTO_PLAIN", 1.0)  # the divergence path throughout
  from cast_jax.testbed import build
  tb = build.build_testbed(progress=False)
  path = build.aligned_testbed(tb, progress=False)[0]
  config, params = load_pretrained(path)
  tok = transformers.AutoTokenizer.from_pretrained(tb.base_dir)
  safe = [r for r in data.load_wildjailbreak(os.path.join(tb.world_dir, "calib/d_safe.jsonl"))
          if r.harmful][:24]
  prompts = calibration.safety_prompt_ids(tok, safe)
  kw = dict(max_new_tokens=40, pad_id=int(tok.pad_token_id), batch_size=12, mask_block=11)
  plain = sensitivity.safety_sweep(params, config, tok, prompts, method="decode", **kw)
  fast = sensitivity.safety_sweep(params, config, tok, prompts, **kw)  # the default
  np.testing.assert_array_equal(fast.base_refused, plain.base_refused)
  np.testing.assert_array_equal(fast.refused, plain.refused)
  assert plain.base_refused.mean() > 0.5 and (plain.refused != plain.base_refused).any()


def test_method_is_checked(tmp_path):
  _, tok, _, config, params = tiny_llama_on_testbed_vocab(tmp_path)
  with pytest.raises(ValueError, match="method"):
    sensitivity.decode_under_masks(params, config, tok, [[5, 6]],
                                   np.ones((1, config.num_layers, config.num_heads)),
                                   max_new_tokens=2, pad_id=0, method="beam")


@pytest.mark.parametrize("auto_plain", [0.0, 1.0])  # switch after the first block / never
def test_safety_sweep_divergence_and_its_switch_equal_decode(tmp_path, monkeypatch, auto_plain):
  from test_diagnosis_sensitivity import ParityJudge
  world, tok, _, config, params = tiny_llama_on_testbed_vocab(tmp_path)
  safety = data.load_wildjailbreak(list(world.files["calib/d_safe.jsonl"]))[:5]
  prompts = calibration.safety_prompt_ids(tok, safety)
  kw = dict(max_new_tokens=8, pad_id=0, batch_size=2, mask_block=3, judge=ParityJudge())
  plain = sensitivity.safety_sweep(params, config, tok, prompts, method="decode", **kw)
  monkeypatch.setattr(sensitivity, "AUTO_PLAIN", auto_plain)
  blocks = []
  fast = sensitivity.safety_sweep(params, config, tok, prompts,
                                  on_block=lambda k, v: blocks.append(k), **kw)
  np.testing.assert_array_equal(fast.refused, plain.refused)
  np.testing.assert_array_equal(fast.base_refused, plain.base_refused)
  assert blocks == [k for k, _, _ in sensitivity.safety_blocks(config, 1, 3)]  # all, in order
  assert (plain.refused != plain.base_refused).any()
