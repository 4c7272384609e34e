"""Appendix A of lcdd-sft-eraser.md: activation gating equals weight masking.

The reference is a float64 numpy decoder layer written in the activation-gating form, Eqs. 9-10
(FFN) and 16-20 (attention): the base path on x, the delta path on gated inputs with gated
outputs, the o_proj delta reading the context gated by the v gate of its kv head (GQA). The
library forms masked weights instead (Eq. 2); both must give the same attention and MLP writes,
over head layouts (GQA, MHA, MQA, with and without Qwen2 biases) and gate densities.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carrier_jax.delta import apply_carrier, gate_shapes, init_carrier
from cast_jax.models import ModelConfig, forward, init_params

SHAPES = {  # (D, H, K, Dh, F, attention_bias)
    "gqa": (8, 4, 2, 4, 12, False), "gqa3_bias": (6, 6, 2, 2, 5, True),
    "mha": (4, 2, 2, 4, 7, False), "mqa_bias": (8, 4, 1, 2, 3, True),
}


def _config(D, H, K, Dh, F, bias):
  return ModelConfig(model_type="qwen2" if bias else "llama", vocab_size=16, hidden_size=D,
                     intermediate_size=F, num_layers=1, num_heads=H, num_kv_heads=K, head_dim=Dh,
                     attention_bias=bias, rope_theta=10000.0)


def _rms(x, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, theta):
  """HF rotate-half rope on x [B, T, N, Dh] at positions 0..T-1."""
  Dh = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, Dh, 2) / Dh)
  ang = np.arange(x.shape[1])[:, None] * inv[None]
  ang = np.concatenate([ang, ang], axis=-1)[None, :, None, :]
  rot = np.concatenate([-x[..., Dh // 2:], x[..., :Dh // 2]], axis=-1)
  return x * np.cos(ang) + rot * np.sin(ang)


def _activation_gated_layer(cfg, base, delta, m, h):
  """Float64 writes of layer 0: (attn_write, mlp_write), each [B, T, D]."""
  D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  W = {n: np.asarray(v[0], np.float64) for n, v in base.items()}
  dW = {n: np.asarray(v[0], np.float64) for n, v in delta.items()}
  x = _rms(h, cfg.rms_norm_eps) * W["attn_norm"]
  B, T, _ = x.shape

  def proj(name, gate):
    w, dw = W[name].reshape(D, -1), dW[name].reshape(D, -1)
    base_out = x @ w
    delta_out = (x * m["attn_read"]) @ dw
    if cfg.attention_bias:
      b = "b" + name[1]
      base_out = base_out + W[b].reshape(-1)
      delta_out = delta_out + dW[b].reshape(-1)
    return base_out + delta_out * m[gate]  # Eqs. 16-18

  q = proj("wq", "q").reshape(B, T, H, Dh)
  k = proj("wk", "k").reshape(B, T, K, Dh)
  v = proj("wv", "v").reshape(B, T, K, Dh)
  q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
  c = np.zeros((B, T, H, Dh))
  causal = np.tril(np.ones((T, T), bool))
  for hh in range(H):
    kv = hh // (H // K)
    s = np.einsum("btd,bsd->bts", q[:, :, hh], k[:, :, kv]) / np.sqrt(Dh)
    s = np.where(causal[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    c[:, :, hh] = (p / p.sum(-1, keepdims=True)) @ v[:, :, kv]  # Eq. 19
  c = c.reshape(B, T, H * Dh)
  # Context channel h * Dh + d comes from value channel (h // G) * Dh + d.
  m_v_ctx = np.array([m["v"][(i // Dh) // (H // K) * Dh + i % Dh] for i in range(H * Dh)])
  attn = c @ W["wo"].reshape(H * Dh, D) + ((c * m_v_ctx) @ dW["wo"].reshape(H * Dh, D)) * m[
      "attn_write"]  # Eq. 20
  x2 = _rms(h + attn, cfg.rms_norm_eps) * W["mlp_norm"]
  read = x2 * m["ffn_read"]
  gate = x2 @ W["w_gate"] + (read @ dW["w_gate"]) * m["ffn_hidden"]
  up = x2 @ W["w_up"] + (read @ dW["w_up"]) * m["ffn_hidden"]  # Eq. 9, both read matrices
  a = gate / (1 + np.exp(-gate)) * up
  mlp = a @ W["w_down"] + ((a * m["ffn_hidden"]) @ dW["w_down"]) * m["ffn_write"]  # Eq. 10
  return attn, mlp


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("p_on", [0.15, 0.5, 0.85])
def test_activation_gating_equals_weight_masking(shape, p_on):
  cfg = _config(*SHAPES[shape])
  seed = int(100 * p_on) + len(shape)
  base = init_params(cfg, jax.random.PRNGKey(seed), std=0.3)
  ft = init_params(cfg, jax.random.PRNGKey(seed + 1), std=0.3)
  if cfg.attention_bias:
    for i, n in enumerate(("bq", "bk", "bv")):
      base["layers"][n] = 0.2 * jax.random.normal(jax.random.PRNGKey(seed + 10 + i),
                                                  base["layers"][n].shape)
      ft["layers"][n] = 0.2 * jax.random.normal(jax.random.PRNGKey(seed + 20 + i),
                                                ft["layers"][n].shape)
  car = init_carrier(cfg, base, ft, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  logits = {g: np.where(rng.random(s) < p_on, 0.5, -0.5).astype(np.float32)
            for g, s in gate_shapes(cfg).items()}
  car["gates"] = jax.tree.map(jnp.asarray, logits)
  masks = {g: (v[0] > 0).astype(np.float64).reshape(-1) for g, v in logits.items()}
  h = rng.normal(size=(2, 5, cfg.hidden_size)).astype(np.float32)

  _, got = forward(base, cfg, input_embeds=jnp.asarray(h), adapter_fn=apply_carrier,
                   adapter_params=car, collect=("attn_write", "mlp_write"))
  attn, mlp = _activation_gated_layer(cfg, base["layers"], car["delta"], masks,
                                      h.astype(np.float64))
  np.testing.assert_allclose(got["attn_write"][0], attn, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["mlp_write"][0], mlp, rtol=1e-5, atol=1e-5)
