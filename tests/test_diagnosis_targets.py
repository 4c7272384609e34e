"""`--target q|k|v|o`: per-unit gradients of W_q / W_k / W_v / W_o (KV heads for k / v) against
PyTorch autograd on the same HF checkpoint (tiny random Llama with GQA, Qwen2 with q/k/v biases;
fp32), the per-example conflict fraction against a per-example autograd loop, and the unit
ablation masks against the grouped-query rule and a zeroed V slice."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cast_jax import data
from cast_jax.diagnosis import calibration, conflict, targets
from cast_jax.models import forward, load_pretrained
from cast_jax.testbed import build_tokenizer, build_world
from hf_models import make_hf_model, save_hf


@pytest.fixture(scope="module")
def calib():
  world = build_world(0)
  tok = build_tokenizer(world)
  safety = data.load_wildjailbreak(list(world.files["calib/d_safe.jsonl"]))[:4]
  mmlu = data.load_mmlu(list(world.files["calib/d_util.jsonl"]), limit=5)
  _, safe = calibration.safe_calibration(tok, safety, max_len=96)
  _, util = calibration.util_calibration(tok, mmlu, max_len=96)
  return dict(tok=tok, safe=safe, util=util)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, calib, tmp_path_factory):
  tok = calib["tok"]
  hf = make_hf_model(request.param, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
  config, params = load_pretrained(save_hf(hf, tmp_path_factory.mktemp(request.param)))
  assert 1 < config.num_kv_heads < config.num_heads  # grouped-query attention
  return request.param, hf, config, params


def _torch_unit_grads(hf, examples, target, include_bias, config):
  """Autograd reference [L, U, P]: gradient of (sum of response CE) / (target tokens), each
  example run alone and unpadded, sliced per unit from the HF projection's weight gradient."""
  hf.zero_grad()
  total = sum(int(m[1:].sum()) for _, m in examples)
  loss = 0.0
  for ids, mask in examples:
    logits = hf(torch.tensor(ids[None].astype(np.int64))).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:].astype(np.int64)),
                                            reduction="none")
    loss = loss + (nll * torch.tensor(mask[1:], dtype=torch.float32)).sum()
  (loss / total).backward()
  Dh = config.head_dim
  out = []
  for layer in hf.model.layers:
    proj = getattr(layer.self_attn, f"{target}_proj")
    w = proj.weight.grad.numpy()
    if target == "o":  # HF [D, H * Dh]: unit h reads input columns h * Dh .. (h + 1) * Dh
      units = [w[:, h * Dh:(h + 1) * Dh].T.reshape(-1) for h in range(config.num_heads)]
    else:  # HF [U * Dh, D]: unit u writes output rows u * Dh .. (u + 1) * Dh
      units = [w[u * Dh:(u + 1) * Dh].T.reshape(-1) for u in range(w.shape[0] // Dh)]
      if include_bias:
        b = proj.bias.grad.numpy()
        units = [np.concatenate([v, b[u * Dh:(u + 1) * Dh]]) for u, v in enumerate(units)]
    out.append(np.stack(units))
  return np.stack(out)


# q (the paper's query heads) is checked the same way in test_diagnosis_conflict.py.
@pytest.mark.parametrize("target", ["k", "v", "o"])
def test_unit_gradients_equal_torch_autograd(calib, model, target):
  arch, hf, config, params = model
  include_bias = arch == "qwen2" and target != "o"
  U = config.num_kv_heads if target in ("k", "v") else config.num_heads
  assert targets.target_units(config, target) == U
  assert targets.unit_name(target) == ("kv_head" if target in ("k", "v") else "head")
  got = {}
  for name in ("safe", "util"):
    batches = calibration.calibration_batches(calib[name], batch_size=4, pad_id=0)
    g, _ = conflict.head_gradients(params, config, batches, include_bias=include_bias,
                                   target=target)
    ref = _torch_unit_grads(hf, calib[name], target, include_bias, config)
    assert g.shape == ref.shape == (config.num_layers, U, config.hidden_size * config.head_dim
                                    + config.head_dim * include_bias)
    np.testing.assert_allclose(np.asarray(g), ref, atol=2e-5 * np.abs(ref).max(), rtol=1e-4)
    got[name] = ref
  a, b = got["safe"], got["util"]
  cos, _ = conflict.optimization_conflict(a, b)
  assert np.ptp(cos) > 0.05  # units differ, so a permuted unit order would fail

  # The vmapped per-example path once per layout: KV units with biases, o units.
  if (arch, target) in (("qwen2", "k"), ("llama", "o")):
    batches = calibration.calibration_batches(calib["safe"], batch_size=2, pad_id=0)
    frac = conflict.conflict_fraction(params, config, batches, b, include_bias=include_bias,
                                      target=target)
    signs = [(_torch_unit_grads(hf, [ex], target, include_bias, config) * b).sum(-1) < 0
             for ex in calib["safe"]]
    np.testing.assert_array_equal(frac, np.mean(signs, axis=0))


def test_unit_masks_follow_the_grouped_query_rule(model):
  _, _, config, _ = model
  L, H, KV = config.num_layers, config.num_heads, config.num_kv_heads
  group = H // KV
  for target in ("k", "v"):
    masks = targets.unit_head_masks(config, target)
    assert masks.shape == (L * KV, L, H)
    for l in range(L):
      for g in range(KV):
        want = np.ones((L, H), np.float32)
        # HF repeat_kv: query head h reads KV head h // group.
        want[l, [h for h in range(H) if h // group == g]] = 0.0
        np.testing.assert_array_equal(masks[l * KV + g], want)
  for target in ("q", "o"):
    np.testing.assert_array_equal(targets.unit_head_masks(config, target),
                                  1.0 - np.eye(L * H, dtype=np.float32).reshape(L * H, L, H))


def test_removing_a_kv_head_equals_zeroing_its_value_slice(calib, model):
  """A zeroed V slice (and V bias, where there is one) is a removed KV head: every query head
  reading it outputs 0, which is what the unit's head mask does."""
  _, _, config, params = model
  ids = jnp.asarray(calib["util"][0][0][None])
  masks = targets.unit_head_masks(config, "v")
  KV = config.num_kv_heads
  for unit in (0, config.num_layers * KV - 1):
    l, g = divmod(unit, KV)
    layers = dict(params["layers"], wv=params["layers"]["wv"].at[l, :, g, :].set(0.0))
    if "bv" in layers:
      layers["bv"] = layers["bv"].at[l, g].set(0.0)
    zeroed = dict(params, layers=layers)
    np.testing.assert_allclose(forward(params, config, ids, head_mask=jnp.asarray(masks[unit])),
                               forward(zeroed, config, ids), atol=1e-4)


def test_bad_targets_and_biases_are_clear_errors(model):
  arch, _, config, params = model
  with pytest.raises(ValueError, match="target='x'"):
    targets.check_target("x")
  with pytest.raises(ValueError, match="o_proj has no bias"):
    targets.target_params(params, "o", include_bias=True)
  if arch == "llama":
    with pytest.raises(ValueError, match="no k bias"):
      targets.target_params(params, "k", include_bias=True)
  with pytest.raises(ValueError, match="exactly one of wq"):
    targets.unit_vectors({"wq": params["layers"]["wq"], "wk": params["layers"]["wk"]})
