"""The ablation sweeps with their mask batches split over pytest's 8 simulated CPU devices equal
the same sweeps pinned to one device (the plain, unsharded vmapped program)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cast_jax.diagnosis import mask_sharding, safety_proxy, sensitivity
from cast_jax.eval import batching
from test_diagnosis_resume import setup  # noqa: F401 (the tiny model + calibration fixture)
from test_diagnosis_sensitivity import ParityJudge


def _n_shapes(token_lists, batch_size):
  return len({c.input_ids.shape for c in batching.prompt_chunks(token_lists, batch_size, 0)})


def test_masks_are_split_over_the_devices():
  assert jax.device_count() == 8
  mesh = mask_sharding.mask_mesh()
  assert mesh.size == 8 and mask_sharding.mask_mesh(jax.devices()[:1]) is None

  @jax.jit
  def which_device(masks):  # 11 masks: padded to 16, two per device
    return mask_sharding.map_over_masks(
        lambda m: (m.sum(), jax.lax.axis_index(mask_sharding.AXIS)), masks, (), batch_size=4,
        mesh=mesh)

  sums, device = which_device(jnp.arange(11.0)[:, None] * jnp.ones((11, 3)))
  np.testing.assert_allclose(sums, 3.0 * np.arange(11))
  np.testing.assert_array_equal(device, np.arange(11) // 2)


@pytest.mark.parametrize("group", [1, 2])
def test_sharded_sweeps_equal_one_device(setup, group):
  tok, config, params = setup["tok"], setup["config"], setup["params"]
  one = jax.devices()[:1]
  for devices in (None, one):  # compile the sharded path first: it must not reuse one's program
    before = (sensitivity._layer_pass._cache_size(), sensitivity._sharded_greedy._cache_size())
    mcq = sensitivity.mcq_sweep(params, config, setup["mcq_set"], pad_id=0, batch_size=3,
                                mask_block=3, group=group, devices=devices)
    safe = sensitivity.safety_sweep(params, config, tok, setup["prompt_ids"], group=group,
                                    max_new_tokens=5, pad_id=0, batch_size=2, mask_block=5,
                                    judge=ParityJudge(), devices=devices)
    texts = sensitivity.decode_under_masks(
        params, config, tok, setup["prompt_ids"],
        np.ones((3, config.num_layers, config.num_heads), np.float32) * [[[1, 0, 1, 1]]],
        max_new_tokens=5, pad_id=0, batch_size=2, mask_block=3, devices=devices)
    proxy = safety_proxy.proxy_safety_sweep(params, config, setup["seqs"], setup["ks"], pad_id=0,
                                            batch_size=3, group=group, devices=devices)
    if devices is None:
      sharded = (mcq, safe, texts, proxy)
      # Compile once per shape, not per unit / block / layer: one program per chunk shape for
      # every layer and the base (the layer is traced); one decoding program per prompt shape
      # for all blocks of the safety sweep.
      layer_programs = sensitivity._layer_pass._cache_size() - before[0]
      assert layer_programs <= _n_shapes(setup["mcq_set"].prompt_ids, 3)
      decode_programs = sensitivity._sharded_greedy._cache_size() - before[1]
      assert decode_programs <= 2 * _n_shapes(setup["prompt_ids"], 2)  # mask_block 5 and 3
  s_mcq, s_safe, s_texts, s_proxy = sharded
  np.testing.assert_array_equal(s_mcq.predictions, mcq.predictions)
  np.testing.assert_array_equal(s_mcq.base_predictions, mcq.base_predictions)
  np.testing.assert_array_equal(s_safe.refused, safe.refused)
  np.testing.assert_array_equal(s_safe.base_refused, safe.base_refused)
  assert s_texts == texts and any(t for t in texts[0])
  np.testing.assert_allclose(s_proxy.logprob, proxy.logprob, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(s_proxy.base_logprob, proxy.base_logprob, rtol=1e-6, atol=1e-6)
  # Some ablation changes something, so the equalities above are not vacuous.
  assert (mcq.predictions != mcq.base_predictions).any() or (
      safe.refused != safe.base_refused).any()
