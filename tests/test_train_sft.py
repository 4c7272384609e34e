"""run_sft's optimizer: AdamW decays matrices and embeddings, never norm weights or biases."""

import jax
import numpy as np
import pytest

from cast_jax import models
from cast_jax.train.sft import run_sft
from cast_jax.train.state import weight_decay_mask
from cast_jax.train.step import OptimizerConfig

# Biases and q/k norms too, so every no-decay name is exercised; untied head so lm_head is.
CONFIG = models.ModelConfig(model_type="qwen3", vocab_size=48, hidden_size=32,
                            intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, max_position_embeddings=64, attention_bias=True,
                            qk_norm=True)
DECAYED = {"embed", "lm_head", "layers/wq", "layers/wk", "layers/wv", "layers/wo",
           "layers/w_gate", "layers/w_up", "layers/w_down"}


def _flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): v
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_weight_decay_mask_by_name():
  zeros = jax.tree.map(np.zeros, models.param_shapes(CONFIG),
                       is_leaf=lambda x: isinstance(x, tuple))
  mask = _flat(weight_decay_mask(zeros))
  assert {k for k, v in mask.items() if v} == DECAYED
  assert {k for k, v in mask.items() if not v} == {
      "final_norm", "layers/attn_norm", "layers/mlp_norm", "layers/q_norm", "layers/k_norm",
      "layers/bq", "layers/bk", "layers/bv"}
  # A sub-tree (partition's trainable side) keeps the names; an unknown name is an error.
  assert weight_decay_mask({"layers": {"mlp_norm": np.ones((2, 3))}}) == {
      "layers": {"mlp_norm": False}}
  with pytest.raises(ValueError, match="lora_a"):
    weight_decay_mask({"layers": {"lora_a": np.ones((2, 3))}})


def test_run_sft_first_step_is_closed_form_adamw_with_decay_on_matrices_only():
  """First AdamW step: m_hat = g and v_hat = g^2, so p1 = p0 - lr * (sign(g) + wd * p0 * decay).

  With eps ~ 0 and no clipping, (p0 - p1) / lr - wd * p0 * decay has magnitude 1 where the
  gradient is non-zero and 0 where it is exactly zero (embedding rows of unseen tokens).
  """
  lr, wd = 1e-2, 0.5
  params = models.init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)
  rs = np.random.RandomState(0)
  # Norms at 1 and biases at 0 would hide or flatten a wrong decay; move them off those values.
  def jitter(path, x):
    name = jax.tree_util.keystr(path, simple=True, separator="/").split("/")[-1]
    undecayed = "norm" in name or name in ("bq", "bk", "bv")
    return x + rs.normal(0, 0.3, x.shape).astype(np.float32) if undecayed else x

  params = jax.tree_util.tree_map_with_path(jitter, params)
  before = {k: np.array(v) for k, v in _flat(params).items()}
  examples = []
  for i in range(4):
    ids = rs.randint(3, 30, size=10).astype(np.int32)  # tokens 30..47 never appear
    examples.append((ids, np.r_[np.zeros(4), np.ones(6)].astype(np.int32)))
  opt = OptimizerConfig(learning_rate=lr, schedule="constant", weight_decay=wd, eps=1e-12,
                        grad_clip_norm=None)
  after, _ = run_sft(params, CONFIG, examples, pad_id=0, num_steps=1, batch_size=4, seed=0,
                     optimizer=opt, progress=False)
  after = {k: np.asarray(v) for k, v in _flat(after).items()}
  assert set(after) == set(before) == DECAYED | {
      "final_norm", "layers/attn_norm", "layers/mlp_norm", "layers/q_norm", "layers/k_norm",
      "layers/bq", "layers/bk", "layers/bv"}
  for name, p0 in before.items():
    adam = (p0 - after[name]) / lr - (wd * p0 if name in DECAYED else 0.0)
    mag = np.abs(adam)
    ok = np.isclose(mag, 1.0, atol=1e-3) | (mag < 1e-3)
    assert ok.all(), (name, mag[~ok][:5])
    assert np.isclose(mag, 1.0, atol=1e-3).mean() > 0.3, name  # the gradient reached it
  # Unseen tokens' embedding rows get no gradient, only the decay: p1 = (1 - lr * wd) * p0.
  np.testing.assert_allclose(after["embed"][30:], (1 - lr * wd) * before["embed"][30:],
                             rtol=1e-6)
