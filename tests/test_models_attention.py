"""Attention implementations (`attend` impl="einsum" / "xla" / "cudnn") against a numpy loop
reference and, through the full forward, against HF transformers; logits at chosen positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cast_jax.models import forward, load_pretrained
from cast_jax.models.decoder import attend, attention_mask_bias, resolve_attention
from hf_models import make_hf_model, save_hf

ON_GPU = jax.default_backend() == "gpu"


def _reference_attention(q, k, v, allowed):
  """Per (row, head, query) softmax over the allowed keys, in float64; a query with no allowed
  key averages every value (the uniform distribution the decoder's contract gives pad rows)."""
  B, T, H, Dh = q.shape
  G = H // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for b in range(B):
    for h in range(H):
      for t in range(T):
        keys = np.flatnonzero(allowed[b, t])
        if keys.size == 0:
          out[b, t, h] = v[b, :, h // G].mean(axis=0)
          continue
        s = k[b, keys, h // G] @ q[b, t, h] / np.sqrt(Dh)
        p = np.exp(s - s.max())
        out[b, t, h] = (p / p.sum()) @ v[b, keys, h // G]
  return out


def _padded_mask(lengths, T, left):
  mask = np.zeros((len(lengths), T), np.int32)
  for b, n in enumerate(lengths):
    if left:
      mask[b, T - n:] = 1
    else:
      mask[b, :n] = 1
  return mask


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
@pytest.mark.parametrize("window", [0, 3], ids=["full", "window3"])
def test_attend_impls_equal_numpy_reference(left, window):
  B, T, H, K, Dh = 3, 10, 4, 2, 8  # GQA: 2 query heads per kv head
  rs = np.random.RandomState(0)
  q, k, v = (rs.normal(size=s).astype(np.float32) for s in [(B, T, H, Dh), (B, T, K, Dh),
                                                             (B, T, K, Dh)])
  mask = _padded_mask([10, 6, 3], T, left)
  allowed = attention_mask_bias(jnp.arange(T), jnp.asarray(mask), jnp.int32(window))
  ref = _reference_attention(q, k, v, np.asarray(allowed))
  impls = ["einsum", "xla"] + (["cudnn"] if ON_GPU else [])
  for impl in impls:
    # cuDNN flash attention takes bf16 / fp16 only: its inputs are rounded, so a looser atol.
    dtype, atol = (jnp.bfloat16, 3e-2) if impl == "cudnn" else (jnp.float32, 2e-5)
    got = np.asarray(attend(*(jnp.asarray(x, dtype) for x in (q, k, v)), allowed, impl=impl,
                            causal=True), np.float32)
    assert np.isfinite(got).all(), impl
    real = np.asarray(allowed).any(-1)  # cudnn zeroes pad query rows instead of averaging
    rows = real if impl == "cudnn" else np.ones_like(real)
    np.testing.assert_allclose(got[rows], ref[rows], atol=atol, err_msg=impl)
  if left:  # left padding leaves query rows with no key at all: they must stay finite
    assert not np.asarray(allowed).any(-1).all()


def test_attend_under_vmap_equals_one_call_per_item():
  """A vmapped axis over q/k/v and the mask (the head-mask sweeps, per-example gradients)
  through every impl, forward and gradient. cuDNN (GPU, bf16, head_dim 64) needed a per-head
  mask: its vmap rule reshapes a batched mask to [B, H, T, S]."""
  M, B, T, H, K, Dh = 3, 2, 16, 4, 2, 64
  dtype = jnp.bfloat16 if ON_GPU else jnp.float32
  rs = np.random.RandomState(3)
  q, k, v = (jnp.asarray(rs.normal(size=(M, B, T, n, Dh)), dtype) for n in (H, K, K))
  masks = jnp.asarray(np.stack([_padded_mask(n, T, True) for n in ([16, 9], [4, 16], [12, 7])]))
  allowed = jax.vmap(lambda m: attention_mask_bias(jnp.arange(T), m, jnp.int32(0)))(masks)
  real = np.asarray(allowed).any(-1)
  for impl in ["einsum", "xla"] + (["cudnn"] if ON_GPU else []):
    f = lambda q, k, v, a: attend(q, k, v, a, impl=impl, causal=True)
    loss = lambda q, k, v, a: jnp.sum(jnp.where(a.any(-1)[..., None, None], f(q, k, v, a), 0)
                                      .astype(jnp.float32) ** 2)
    got, g = jax.vmap(f)(q, k, v, allowed), jax.vmap(jax.grad(loss))(q, k, v, allowed)
    for i in range(M):
      one = f(q[i], k[i], v[i], allowed[i])
      np.testing.assert_allclose(np.asarray(got[i], np.float32)[real[i]],
                                 np.asarray(one, np.float32)[real[i]], atol=1e-2, err_msg=impl)
      np.testing.assert_allclose(np.asarray(g[i], np.float32),
                                 np.asarray(jax.grad(loss)(q[i], k[i], v[i], allowed[i]),
                                            np.float32), atol=5e-2, err_msg=impl)


def test_resolve_attention_defaults():
  shapes = ((2, 8, 4, 8), (2, 8, 2, 8))
  assert resolve_attention("xla", *shapes, jnp.float32) == "xla"
  # float32 never takes cuDNN flash attention (bf16 / fp16 only), on any backend.
  assert resolve_attention(None, *shapes, jnp.float32) == "einsum"
  if not ON_GPU:
    assert resolve_attention(None, *shapes, jnp.bfloat16) == "einsum"
  with pytest.raises(ValueError, match="attention='flash'"):
    attend(*(jnp.zeros((1, 2, 2, 8)),) * 3, jnp.ones((1, 2, 2), bool), impl="flash")


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def pair(request, tmp_path_factory):
  """mistral: GQA 4/1 with a sliding window of 5; qwen2: GQA 4/2 with q/k/v biases."""
  model = make_hf_model(request.param)
  config, params = load_pretrained(save_hf(model, tmp_path_factory.mktemp(request.param)))
  return model, config, params


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def test_forward_logits_per_impl_match_hf_with_padding(pair):
  model, config, params = pair
  rs = np.random.RandomState(1)
  lengths, T = [14, 9, 12], 14  # longer than mistral's window of 5
  rows = [rs.randint(3, 97, size=n) for n in lengths]
  refs = [_hf_logits(model, r[None])[0] for r in rows]
  for left in (True, False):
    mask = _padded_mask(lengths, T, left)
    ids = np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
      ids[b, mask[b] == 1] = r
    outs = {}
    for impl in ["einsum", "xla"]:  # fp32 params: cuDNN (bf16 / fp16) is test_attend_*'s
      outs[impl] = np.asarray(forward(params, config, jnp.asarray(ids),
                                      attention_mask=jnp.asarray(mask), attention=impl))
      for b, ref in enumerate(refs):
        np.testing.assert_allclose(outs[impl][b, mask[b] == 1], ref, atol=1e-4,
                                   err_msg=f"{impl} left={left}")
    np.testing.assert_allclose(outs["xla"], outs["einsum"], atol=1e-5)  # pad positions too


def test_logits_at_equals_hf_at_those_positions(pair):
  model, config, params = pair
  ids = np.random.RandomState(2).randint(3, 97, size=(2, 11))
  ref = _hf_logits(model, ids)
  at = np.array([[0, 10, 4], [-1, 3, 3]])
  got = np.asarray(jax.jit(lambda p, x, a: forward(p, config, x, logits_at=a))(params, ids, at))
  assert got.shape == (2, 3, config.vocab_size)
  for b in range(2):
    np.testing.assert_allclose(got[b], ref[b, at[b] % 11], atol=1e-4)
  for at in (jnp.array([-1]), -1):  # the same position in every row; a scalar is [1]
    last = np.asarray(forward(params, config, jnp.asarray(ids), logits_at=at))
    assert last.shape == (2, 1, config.vocab_size)
    np.testing.assert_allclose(last[:, 0], ref[:, -1], atol=1e-4)
