"""Sharded forward on 8 simulated devices, sampling properties, generation stop handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cast_jax.generate import generate
from cast_jax.models import ModelConfig, forward, init_params, load_pretrained
from cast_jax.models import sharding
from hf_models import make_hf_model, save_hf


@pytest.fixture(scope="module")
def tiny():
  config = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       eos_token_ids=(2,), pad_token_id=0)
  return config, init_params(config, jax.random.PRNGKey(0), std=0.3)


def test_eight_device_sharded_forward_equals_single_device(tmp_path):
  assert len(jax.devices()) == 8, "conftest sets --xla_force_host_platform_device_count=8"
  model = make_hf_model("qwen2")
  path = save_hf(model, tmp_path)
  config, params = load_pretrained(path)
  mesh = sharding.make_mesh(data=4, model=2)
  shardings = sharding.param_shardings(config, mesh)
  _, sharded = load_pretrained(path, shardings=shardings)
  assert sharded["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, "data", "model", None)
  assert len(sharded["layers"]["wq"].sharding.device_set) == 8
  ids = np.random.RandomState(0).randint(3, 97, size=(4, 16))
  ids_sharded = jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh))
  out = jax.jit(forward, static_argnums=1)(sharded, config, ids_sharded)
  ref = forward(params, config, jnp.asarray(ids))
  np.testing.assert_allclose(out, ref, atol=1e-5)
  gen = generate(sharded, config, ids, max_new_tokens=6, eos_token_ids=(),
                 cache_sharding=sharding.cache_sharding(config, mesh))
  np.testing.assert_array_equal(gen.tokens, generate(params, config, ids, max_new_tokens=6,
                                                     eos_token_ids=()).tokens)


def test_tiny_top_p_sampling_is_greedy(tiny):
  config, params = tiny
  ids = np.random.RandomState(1).randint(3, 96, size=(3, 5))
  greedy = generate(params, config, ids, max_new_tokens=8, eos_token_ids=())
  sampled = generate(params, config, ids, max_new_tokens=8, eos_token_ids=(), temperature=1.0,
                     top_p=1e-6, key=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(greedy.tokens, sampled.tokens)


def test_sampling_is_reproducible_from_key_and_follows_distribution(tiny):
  config, params = tiny
  ids = np.tile(np.array([[5, 6, 7]]), (512, 1))
  a = generate(params, config, ids, max_new_tokens=1, eos_token_ids=(), temperature=1.0,
               key=jax.random.PRNGKey(3))
  b = generate(params, config, ids, max_new_tokens=1, eos_token_ids=(), temperature=1.0,
               key=jax.random.PRNGKey(3))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  probs = np.asarray(jax.nn.softmax(forward(params, config, jnp.asarray(ids[:1]))[0, -1]))
  freq = np.bincount(a.tokens[:, 0], minlength=config.vocab_size) / len(ids)
  assert np.abs(freq - probs).sum() < 0.35  # total variation of 512 draws from a peaky dist


def test_eos_stops_row_and_pads(tiny):
  config, params = tiny
  ids = np.random.RandomState(2).randint(3, 96, size=(2, 4))
  free = generate(params, config, ids, max_new_tokens=10, eos_token_ids=())
  stop_tok = int(free.tokens[0, 3])  # make row 0's 4th token an EOS
  out = generate(params, config, ids, max_new_tokens=10, eos_token_ids=(stop_tok,), pad_token_id=0)
  first = int(np.argmax(free.tokens[0] == stop_tok))
  assert out.lengths[0] == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert (out.tokens[0, first + 1:] == 0).all()
  assert out.trimmed()[0][-1] == stop_tok


def test_generation_rejects_right_padding_and_keyless_sampling(tiny):
  config, params = tiny
  ids = np.ones((1, 4), np.int32)
  with pytest.raises(ValueError, match="left padded"):
    generate(params, config, ids, np.array([[1, 1, 1, 0]]), max_new_tokens=2)
  with pytest.raises(ValueError, match="explicit PRNG key"):
    generate(params, config, ids, max_new_tokens=2, temperature=0.7)


def test_head_mask_in_generation_changes_output_consistently(tiny):
  config, params = tiny
  ids = np.random.RandomState(4).randint(3, 96, size=(2, 6))
  hm = jnp.zeros((config.num_layers, config.num_heads))
  out = generate(params, config, ids, max_new_tokens=1, eos_token_ids=(), head_mask=hm)
  ref = forward(params, config, jnp.asarray(ids), head_mask=hm)[:, -1].argmax(-1)
  np.testing.assert_array_equal(out.tokens[:, 0], ref)


def test_greedy_argmax_matches_numpy_first_maximum():
  from cast_jax.generate import _argmax
  rs = np.random.RandomState(5)
  logits = rs.randint(0, 4, size=(64, 301)).astype(np.float32)  # many ties: first one wins
  logits[3] = -np.inf
  logits[4, [7, 300]] = np.inf
  np.testing.assert_array_equal(np.asarray(_argmax(jnp.asarray(logits))), logits.argmax(-1))
  smooth = rs.normal(size=(8, 4096)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(_argmax)(smooth)), smooth.argmax(-1))
