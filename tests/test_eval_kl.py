"""Teacher-forced KL against numpy on HF transformers logits (fp32, unpadded rows)."""

import numpy as np
import pytest
import torch
import transformers

from cast_jax.eval import divergence as kl_lib
from cast_jax.eval.runners import EvalModel
from cast_jax.models import forward, load_pretrained

VOCAB = 61


def _np_token_kl(p_logits, q_logits):
  p_logits = p_logits.astype(np.float64)
  q_logits = q_logits.astype(np.float64)
  log_p = p_logits - np.log(np.exp(p_logits - p_logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True)) \
      - p_logits.max(-1, keepdims=True)
  log_q = q_logits - np.log(np.exp(q_logits - q_logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True)) \
      - q_logits.max(-1, keepdims=True)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def test_token_kl_matches_numpy_and_is_safe():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  q = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  np.testing.assert_allclose(kl_lib.token_kl(p, q), _np_token_kl(p, q), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl_lib.token_kl(p, p), 0.0, atol=1e-6)
  # A masked-out vocabulary entry (-inf) in P contributes 0, not NaN.
  p_inf = p.copy()
  p_inf[..., 0] = -np.inf
  assert np.isfinite(np.asarray(kl_lib.token_kl(p_inf, q))).all()
  mask = np.array([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0]])
  got = np.asarray(kl_lib.kl(p, q, mask))
  assert got[0] == pytest.approx(_np_token_kl(p, q)[0][[1, 2, 4]].mean(), rel=1e-5)
  assert np.isnan(got[1])
  # Direction matters: KL(P||Q) != KL(Q||P).
  assert not np.allclose(kl_lib.token_kl(p, q), kl_lib.token_kl(q, p))


def _hf_llama(seed):
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
      tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config)
  model.config._attn_implementation = "eager"
  return model.eval().float()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
  out = []
  for seed in (0, 1):
    hf = _hf_llama(seed)
    path = tmp_path_factory.mktemp(f"llama{seed}")
    hf.save_pretrained(path, safe_serialization=True)
    config, params = load_pretrained(path)
    out.append((hf, EvalModel(params, config)))
  return out


def _batch(rng, n=5, t=14):
  """Right-padded [prompt; response] rows of varying lengths with a response loss_mask."""
  ids = np.zeros((n, t), np.int32)
  mask = np.zeros((n, t), np.int32)
  loss = np.zeros((n, t), np.int32)
  for i in range(n):
    prompt_len, resp_len = int(rng.integers(2, 6)), int(rng.integers(1, 7))
    length = prompt_len + resp_len
    ids[i, :length] = rng.integers(3, VOCAB, size=length)
    mask[i, :length] = 1
    loss[i, prompt_len:length] = 1
  return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}


def _reference_kl(p_hf, q_hf, batch):
  per_row = []
  for ids, mask, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
    row = torch.tensor(ids[mask == 1][None].astype(np.int64))
    with torch.no_grad():
      p = p_hf(row).logits[0].numpy()
      q = q_hf(row).logits[0].numpy()
    targets = loss[mask == 1][1:] == 1  # token t is predicted by the logits at t - 1
    per_row.append(_np_token_kl(p[:-1], q[:-1])[targets].mean())
  return np.array(per_row)


def test_teacher_forced_kl_matches_hf(two_models):
  (p_hf, p_model), (q_hf, q_model) = two_models
  batch = _batch(np.random.default_rng(0))
  expected = _reference_kl(p_hf, q_hf, batch)
  got = kl_lib.teacher_forced_kl(p_model, q_model, batch, batch_size=2)
  np.testing.assert_allclose(got.per_prompt, expected, rtol=2e-4, atol=1e-6)
  assert got.mean == pytest.approx(expected.mean(), rel=2e-4)
  np.testing.assert_array_equal(got.num_tokens, batch["loss_mask"][:, 1:].sum(1))
  # Reverse direction, through the logits-function path.
  q_fn = lambda ids, m: forward(q_model.params, q_model.config, ids, attention_mask=m)
  reverse = kl_lib.teacher_forced_kl(q_fn, p_model, batch, batch_size=2)
  np.testing.assert_allclose(reverse.per_prompt, _reference_kl(q_hf, p_hf, batch), rtol=2e-4,
                             atol=1e-6)


def test_teacher_forced_kl_self_is_zero_and_errors(two_models):
  (_, p_model), _ = two_models
  batch = _batch(np.random.default_rng(1), n=3)
  batch["loss_mask"][1] = 0
  got = kl_lib.teacher_forced_kl(p_model, p_model, batch, batch_size=2)
  assert np.isnan(got.per_prompt[1]) and got.num_tokens[1] == 0
  np.testing.assert_allclose(got.per_prompt[[0, 2]], 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="loss_mask"):
    kl_lib.teacher_forced_kl(p_model, p_model, {"input_ids": batch["input_ids"]})
  with pytest.raises(TypeError, match="EvalModel"):
    kl_lib.teacher_forced_kl("model", p_model, batch)
