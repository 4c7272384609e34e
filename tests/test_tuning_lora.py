"""Head-restricted LoRA: init, the masked delta vs numpy, gradients vs PEFT autograd, and a short
training run on one bucket that leaves everything outside it bit-identical to the base."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from cast_jax.eval.runners import EvalModel, next_token_choice_logits
from cast_jax.generate import generate
from cast_jax.models import forward
from cast_jax.train import OptimizerConfig, tree_equal
from cast_jax.tuning import (LoraConfig, adapter_params, bucket_mask, check_head_mask,
                             count_trainable, init_lora, lora_delta, make_adapter_fn, merge_lora,
                             run_lora, save_peft_adapter)
from tuning_data import examples, tiny_llama

LCFG = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  hf, config, params = tiny_llama(path / "base")
  return path / "base", config, params


def test_init_is_peft_default_and_keyed():
  from cast_jax.models import ModelConfig
  config = ModelConfig(model_type="llama", vocab_size=11, hidden_size=64, intermediate_size=8,
                       num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
  a = init_lora(config, jax.random.PRNGKey(0), LoraConfig(rank=32))
  assert a["a"].shape == (3, 64, 32) and a["b"].shape == (3, 32, 4, 16)
  assert not np.any(np.asarray(a["b"]))
  x = np.asarray(a["a"], np.float64)
  bound = 1 / np.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on [r, D]: U(-1/sqrt(D), 1/sqrt(D))
  assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
  np.testing.assert_allclose(x.var(), bound ** 2 / 3, rtol=0.08)
  assert tree_equal(a, init_lora(config, jax.random.PRNGKey(0), LoraConfig(rank=32)))
  assert not tree_equal(a, init_lora(config, jax.random.PRNGKey(1), LoraConfig(rank=32)))


def test_delta_matches_numpy_and_frozen_heads_are_exact_zeros(model):
  _, config, _ = model
  L, H, Dh, D = config.num_layers, config.num_heads, config.head_dim, config.hidden_size
  rng = np.random.RandomState(0)
  lora = {"a": rng.randn(L, D, 4).astype(np.float32),
          "b": rng.randn(L, 4, H, Dh).astype(np.float32)}
  mask = (rng.rand(L, H) > 0.5).astype(np.float32)
  got = np.asarray(lora_delta(lora, mask, LCFG))
  want = np.stack([2.0 * lora["a"][l].astype(np.float64) @ (lora["b"][l] * mask[l][None, :, None]
                                                             ).reshape(4, H * Dh)
                   for l in range(L)]).reshape(L, D, H, Dh)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  frozen = np.broadcast_to(mask[:, None, :, None] == 0, got.shape)
  assert not np.any(got[frozen]) and np.all(got[~frozen] != 0)


def test_gradients_match_peft_autograd(model, tmp_path):
  """d(sum(logits * W))/dA, dB vs torch autograd through PEFT on the HF model: B's gradient is
  PEFT's with the frozen heads' rows zeroed; A's is PEFT's (whose B rows there are zero)."""
  base_dir, config, params = model
  L, H, Dh = config.num_layers, config.num_heads, config.head_dim
  mask = bucket_mask(np.random.RandomState(1).rand(L, H), 4, 2)
  lora = init_lora(config, jax.random.PRNGKey(0), LCFG)
  lora["b"] = 0.3 * jax.random.normal(jax.random.PRNGKey(1), lora["b"].shape)
  ids = np.random.RandomState(0).randint(3, 97, size=(2, 12))
  w = np.random.RandomState(1).randn(2, 12, config.vocab_size).astype(np.float32)

  def loss(lora):
    logits = forward(params, config, jnp.asarray(ids), adapter_fn=make_adapter_fn(LCFG),
                     adapter_params=adapter_params(lora, mask))
    return jnp.sum(logits * w)

  g = jax.grad(loss)(lora)
  path = save_peft_adapter(tmp_path / "ad", lora, mask, config, LCFG)
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
  pm = peft.PeftModel.from_pretrained(base.float(), path, is_trainable=True)
  (pm(torch.tensor(ids)).logits * torch.tensor(w)).sum().backward()
  named = dict(pm.named_parameters())
  for l in range(L):
    key = f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_{{}}.default.weight"
    ga = named[key.format("A")].grad.numpy().T
    gb = named[key.format("B")].grad.numpy().T.reshape(4, H, Dh) * mask[l][None, :, None]
    scale = np.abs(ga).max() + np.abs(gb).max()
    np.testing.assert_allclose(np.asarray(g["a"][l]), ga, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(g["b"][l]), gb, atol=1e-4 * scale)
    assert not np.any(np.asarray(g["b"][l])[:, mask[l] == 0])  # exactly zero, by construction


def test_bucket_training_leaves_everything_else_bit_identical(model):
  """Must show (issue 10): a few AdamW steps (with weight decay) on bucket B2 of a conflict map;
  the merged model's wq slices of heads outside it and every other base parameter are the base
  bytes; the bucket's heads moved; the adapter forward, the merged forward, eval and generate
  agree."""
  _, config, params = model
  L, H = config.num_layers, config.num_heads
  c = np.random.RandomState(5).rand(L, H)
  mask = bucket_mask(c, 4, 2)
  base_copy = jax.tree.map(np.array, params)
  opt = OptimizerConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.1)
  lora, summary = run_lora(params, config, examples(16, 0), mask, pad_id=0, num_steps=4,
                           batch_size=4, seed=21, optimizer=opt, lora_config=LCFG,
                           progress=False)
  assert summary["final_step"] == 4
  assert tree_equal(params, base_copy)  # the input params are untouched
  # Frozen heads' B never left 0 (zero gradient; AdamW's decay keeps 0 at 0).
  assert not np.any(np.asarray(lora["b"]).transpose(0, 2, 1, 3)[mask == 0])
  merged = merge_lora(params, lora, mask, LCFG)
  wq0, wq1 = np.asarray(base_copy["layers"]["wq"]), np.asarray(merged["layers"]["wq"])
  for l in range(L):
    for h in range(H):
      same = wq0[l, :, h].tobytes() == wq1[l, :, h].tobytes()
      assert same == (mask[l, h] == 0), (l, h)
  rest = lambda p: {**p, "layers": {k: v for k, v in p["layers"].items() if k != "wq"}}
  assert tree_equal(jax.tree.map(np.asarray, rest(merged)), rest(base_copy))
  assert count_trainable(lora, mask) == (int(mask.any(1).sum()) * config.hidden_size * 4 +
                                         int(mask.sum()) * 4 * config.head_dim)

  # The same model through every entry point of the seam.
  ids = np.random.RandomState(2).randint(3, 97, size=(2, 10))
  ap, fn = adapter_params(lora, mask), make_adapter_fn(LCFG)
  a = np.asarray(forward(params, config, jnp.asarray(ids), adapter_fn=fn, adapter_params=ap))
  m = np.asarray(forward(merged, config, jnp.asarray(ids)))
  np.testing.assert_allclose(a, m, atol=2e-5)
  choices = np.tile(np.arange(3, 7), (2, 1))
  ev_a = next_token_choice_logits(EvalModel(params, config, adapter_fn=fn, adapter_params=ap),
                                  [list(r) for r in ids], choices, pad_id=0)
  ev_m = next_token_choice_logits(EvalModel(merged, config), [list(r) for r in ids], choices,
                                  pad_id=0)
  np.testing.assert_allclose(ev_a, ev_m, atol=2e-5)
  gen_a = generate(params, config, jnp.asarray(ids), max_new_tokens=6, adapter_fn=fn,
                   adapter_params=ap)
  gen_m = generate(merged, config, jnp.asarray(ids), max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(gen_a.tokens), np.asarray(gen_m.tokens))


def test_bad_config_and_masks_are_refused(model):
  _, config, _ = model
  with pytest.raises(ValueError, match="only 0.0 is supported"):
    LoraConfig(dropout=0.05)
  with pytest.raises(ValueError, match="rank"):
    LoraConfig(rank=0)
  with pytest.raises(ValueError, match=r"\[L, H\]"):
    check_head_mask(np.ones((2, 2)), config)
  with pytest.raises(ValueError, match="only 0 / 1"):
    check_head_mask(np.full((config.num_layers, config.num_heads), 0.5), config)
