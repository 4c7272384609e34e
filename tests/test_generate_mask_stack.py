"""`generate` under a stack of head masks [M, L, H] (the batched-ablation decoding program, its
loop outside the vmap over masks) equals M separate single-mask calls: greedy tokens and
lengths with rows stopping at different steps per mask, and sampling with one key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cast_jax.generate import generate
from cast_jax.models import ModelConfig, init_params


@pytest.fixture(scope="module")
def tiny():
  config = ModelConfig(model_type="llama", vocab_size=48, hidden_size=32, intermediate_size=64,
                       num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                       eos_token_ids=(2,), pad_token_id=0)
  params = init_params(config, jax.random.PRNGKey(0), std=0.4)
  ids = np.random.RandomState(0).randint(3, 48, size=(3, 6))
  mask = np.ones_like(ids)
  mask[1, :2] = 0  # left padding in one row
  hm = np.ones((4, 3, 4), np.float32)
  hm[1, 0, 1] = hm[2, 2, 3] = 0.0
  hm[3, 1] = 0.0  # a whole layer's heads
  return config, params, ids, mask, hm


def _singles(params, config, ids, mask, hm, **kw):
  outs = [generate(params, config, ids, mask, head_mask=jnp.asarray(m), **kw) for m in hm]
  return np.stack([o.tokens for o in outs]), np.stack([o.lengths for o in outs])


def test_greedy_stack_equals_single_masks_with_early_stops(tiny):
  config, params, ids, mask, hm = tiny
  # An EOS id that some rows emit early under some masks and not under others.
  free = _singles(params, config, ids, mask, hm, max_new_tokens=10, eos_token_ids=())[0]
  eos = int(free[1, 0, 2])
  kw = dict(max_new_tokens=10, eos_token_ids=(eos,), pad_token_id=0)
  tokens, lengths = _singles(params, config, ids, mask, hm, **kw)
  assert len(set(lengths.ravel().tolist())) > 1, "rows should stop at different steps"
  got = generate(params, config, ids, mask, head_mask=jnp.asarray(hm), **kw)
  assert got.tokens.shape == (4, 3, 10) and got.lengths.shape == (4, 3)
  np.testing.assert_array_equal(got.tokens, tokens)
  np.testing.assert_array_equal(got.lengths, lengths)
  assert (tokens[1:] != tokens[:1]).any()  # the masks change what is generated


def test_sampling_stack_equals_single_masks_with_the_same_key(tiny):
  config, params, ids, mask, hm = tiny
  kw = dict(max_new_tokens=6, eos_token_ids=(), temperature=1.0, top_p=0.9,
            key=jax.random.PRNGKey(5))
  tokens, _ = _singles(params, config, ids, mask, hm, **kw)
  got = generate(params, config, ids, mask, head_mask=jnp.asarray(hm), **kw)
  np.testing.assert_array_equal(got.tokens, tokens)
