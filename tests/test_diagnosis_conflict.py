"""Calibration batches and per-head gradient conflict against PyTorch autograd on the same HF
checkpoint (tiny random Llama with GQA, Qwen2 with a q bias; fp32), on the testbed's D_safe /
D_util records through the real adapters and chat template."""

import numpy as np
import pytest
import torch

from cast_jax import data
from cast_jax.diagnosis import calibration, conflict
from cast_jax.models import load_pretrained
from cast_jax.testbed import build_tokenizer, build_world
from hf_models import make_hf_model, save_hf


@pytest.fixture(scope="module")
def calib():
  world = build_world(0)
  tok = build_tokenizer(world)
  safety = data.load_wildjailbreak(list(world.files["calib/d_safe.jsonl"]))[:5]
  # One harmful record whose completion complies: the refusal target replaces it.
  safety.append(data.SafetyRecord("Explain how to threaten a neighbour.", True, False, "Sure: first,"))
  safety.append(data.SafetyRecord("Say hello.", False, False, "Hello!"))  # benign: dropped
  mmlu = data.load_mmlu(list(world.files["calib/d_util.jsonl"]), limit=6)
  safe_pairs, safe = calibration.safe_calibration(tok, safety, max_len=96,
                                                  refusal_target="I can't help with that.")
  mcq_set, util = calibration.util_calibration(tok, mmlu, max_len=96)
  return dict(tok=tok, safety=safety, mmlu=mmlu, safe_pairs=safe_pairs, safe=safe, util=util,
              mcq_set=mcq_set)


def test_calibration_targets_and_masks(calib):
  tok, mmlu = calib["tok"], calib["mmlu"]
  assert len(calib["safe"]) == 6  # harmful only
  assert calib["safe_pairs"][-1] == ("Explain how to threaten a neighbour.", "I can't help with that.")
  for (prompt, response), (ids, mask) in zip(calib["safe_pairs"], calib["safe"]):
    assert prompt in tok.decode(ids[mask == 0])
    assert tok.decode(ids[mask == 1], skip_special_tokens=True).strip() == response
  letters = "ABCD"
  for r, (ids, mask), choice in zip(mmlu, calib["util"], calib["mcq_set"].choice_ids):
    assert mask.sum() == 1 and mask[-1] == 1  # the letter is the only and last target
    assert tok.decode([int(ids[-1])]).strip() == letters[r.answer_index]
    assert ids[-1] == choice[r.answer_index]
  batches = calibration.calibration_batches(calib["safe"], batch_size=4, pad_id=0)
  assert [b["input_ids"].shape[0] for b in batches] == [4, 4]
  assert batches[1]["loss_mask"][2:].sum() == 0 and batches[1]["attention_mask"][2:].sum() == 0


def _load(arch, vocab, eos, tmp_path_factory):
  model = make_hf_model(arch, vocab_size=vocab, eos_token_id=eos)
  config, params = load_pretrained(save_hf(model, tmp_path_factory.mktemp(arch)))
  return model, config, params


def _torch_head_grads(model, examples, include_bias, H, Dh):
  """Autograd reference: per-head [L, H, P] gradient of (sum of response CE) / (target count),
  each example run alone and unpadded."""
  model.zero_grad()
  total = sum(int(m[1:].sum()) for _, m in examples)
  loss = 0.0
  for ids, mask in examples:
    logits = model(torch.tensor(ids[None].astype(np.int64))).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:].astype(np.int64)),
                                            reduction="none")
    loss = loss + (nll * torch.tensor(mask[1:], dtype=torch.float32)).sum()
  (loss / total).backward()
  out = []
  for layer in model.model.layers:
    w = layer.self_attn.q_proj.weight.grad.numpy()  # [H * Dh, D]
    heads = [w[h * Dh:(h + 1) * Dh].T.reshape(-1) for h in range(H)]
    if include_bias:
      b = layer.self_attn.q_proj.bias.grad.numpy()
      heads = [np.concatenate([v, b[h * Dh:(h + 1) * Dh]]) for h, v in enumerate(heads)]
    out.append(np.stack(heads))
  return np.stack(out)


@pytest.mark.parametrize("arch,include_bias", [("llama", False), ("qwen2", True),
                                               ("qwen2", False)])
def test_head_gradients_and_conflict_equal_torch_autograd(calib, arch, include_bias,
                                                          tmp_path_factory):
  tok = calib["tok"]
  model, config, params = _load(arch, len(tok), tok.eos_token_id, tmp_path_factory)
  H, Dh = config.num_heads, config.head_dim
  assert config.num_kv_heads < H  # grouped-query attention in both families
  got = {}
  for name in ("safe", "util"):
    batches = calibration.calibration_batches(calib[name], batch_size=4, pad_id=0)
    g, n = conflict.head_gradients(params, config, batches, include_bias=include_bias)
    ref = _torch_head_grads(model, calib[name], include_bias, H, Dh)
    assert n == sum(int(m[1:].sum()) for _, m in calib[name])
    assert g.shape == ref.shape == (config.num_layers, H, config.hidden_size * Dh
                                    + Dh * include_bias)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(g), ref, atol=2e-5 * scale, rtol=1e-4)
    got[name] = (np.asarray(g), ref)
  cos, o = conflict.optimization_conflict(got["safe"][0], got["util"][0])
  a, b = got["safe"][1], got["util"][1]
  ref_cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(cos, ref_cos, atol=1e-4)
  np.testing.assert_allclose(o, (1 - ref_cos) / 2, atol=1e-4)
  assert np.ptp(ref_cos) > 0.1  # heads differ, so a permuted map would fail

  # Per-example conflict fraction vs a per-example autograd loop.
  batches = calibration.calibration_batches(calib["safe"], batch_size=4, pad_id=0)
  frac = conflict.conflict_fraction(params, config, batches, got["util"][0],
                                    include_bias=include_bias)
  signs = []
  for example in calib["safe"]:
    ge = _torch_head_grads(model, [example], include_bias, H, Dh)
    signs.append((ge * b).sum(-1) < 0)
  np.testing.assert_array_equal(frac, np.mean(signs, axis=0))


def test_cosine_epsilon_and_errors(calib, tmp_path_factory):
  z = np.zeros((2, 3, 5), np.float32)
  a = np.ones((2, 3, 5), np.float32)
  cos, o = conflict.optimization_conflict(z, a)
  np.testing.assert_array_equal(cos, 0.0)
  np.testing.assert_array_equal(o, 0.5)
  cos, o = conflict.optimization_conflict(a, -a)
  np.testing.assert_allclose(o, 1.0)
  _, config, params = _load("llama", len(calib["tok"]), 3, tmp_path_factory)
  with pytest.raises(ValueError, match="no q bias"):
    conflict.query_params(params, include_bias=True)
