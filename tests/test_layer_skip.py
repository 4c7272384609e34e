"""`layer_skip.forward_from_any_layer` (traced start layer, last layer cut to the scored tail)
against HF transformers with a forward pre-hook zeroing heads at o_proj's input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cast_jax.models import forward, load_pretrained
from cast_jax.models.layer_skip import forward_from_any_layer, hidden_at_layer, suffix_length
from hf_models import make_hf_model, save_hf


def _hf_logits(model, ids, mask, head_mask):
  """HF logits float32 [B, T, V] with query head h of layer l scaled by head_mask[l, h] at
  o_proj's input (left padding: positions from the mask)."""
  Dh = model.model.layers[0].self_attn.o_proj.in_features // len(head_mask[0])

  def hook(layer):
    def pre(module, args):
      x = args[0].clone()
      for h, m in enumerate(head_mask[layer]):
        x[..., h * Dh:(h + 1) * Dh] *= float(m)
      return (x,)
    return pre

  handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook(i))
             for i, layer in enumerate(model.model.layers)]
  try:
    with torch.no_grad():
      m = torch.tensor(mask, dtype=torch.long)
      out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=m,
                  position_ids=(m.cumsum(-1) - 1).clamp(min=0))
  finally:
    for h in handles:
      h.remove()
  return out.logits.float().numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # mistral: sliding window 5
def test_forward_from_any_layer_equals_hf_with_hooks(arch, tmp_path_factory):
  model = make_hf_model(arch).eval()
  config, params = load_pretrained(save_hf(model, tmp_path_factory.mktemp(arch)))
  L, H, B, T = config.num_layers, config.num_heads, 2, 11
  rs = np.random.RandomState(0)
  ids = rs.randint(3, 97, size=(B, T))
  mask = np.ones((B, T), np.int32)
  mask[0, :4] = 0
  ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
  _, got = forward(params, config, ids_j, attention_mask=mask_j, collect=("residual",))

  @jax.jit  # the start layer is traced: one program serves every layer
  def run(hidden, start, hm, at):
    return forward_from_any_layer(params, config, hidden, start, attention_mask=mask_j,
                                  head_mask=hm, logits_at=at, last_positions=4)

  # traced positions inside the last 4 tokens, different per row
  at = np.asarray([[T - 1, T - 3], [T - 4, T - 2]], np.int32)
  for layer in range(L):
    hm = np.ones((L, H), np.float32)
    hm[layer, (layer + 1) % H] = 0.0
    hm[L - 1, 0] = 0.5
    ref = _hf_logits(model, ids, mask, hm)
    hidden = got["residual"][layer]
    for logits_at, want in (([-1], ref[:, -1:]), (list(range(-3, 0)), ref[:, -3:]),
                            (None, ref)):
      out = forward_from_any_layer(params, config, hidden, layer, attention_mask=mask_j,
                                   head_mask=jnp.asarray(hm), logits_at=logits_at)
      np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)
    out = run(hidden, jnp.int32(layer), jnp.asarray(hm), jnp.asarray(at))
    want = np.take_along_axis(ref, at[:, :, None], axis=1)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)
    # the ablation matters (a vacuous mask would pass the comparison too)
    assert np.abs(ref - _hf_logits(model, ids, mask, np.ones((L, H)))).max() > 1e-3
  assert run._cache_size() == 1
  # The residual entering each layer, against HF's hidden states (its input to that layer).
  with torch.no_grad():
    m = torch.tensor(mask, dtype=torch.long)
    states = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=m,
                   position_ids=(m.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
  at_layer = jax.jit(lambda i: hidden_at_layer(params, config, ids_j, i, attention_mask=mask_j))
  for layer in range(L):
    got_h = np.asarray(at_layer(jnp.int32(layer)))
    np.testing.assert_allclose(got_h[mask > 0], states.hidden_states[layer].numpy()[mask > 0],
                               atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="head_mask"):
    forward_from_any_layer(params, config, got["residual"][1], 1, head_mask=jnp.ones((L - 1, H)))
  with pytest.raises(ValueError, match="last_positions"):
    forward_from_any_layer(params, config, got["residual"][1], 1, last_positions=T + 1)


def test_suffix_length():
  assert suffix_length([-1], 80) == 1
  assert suffix_length(list(range(-5, -1)), 80) == 5
  assert suffix_length([3, -1], 10) == 7
  assert suffix_length([0], 10) is None  # reads the first token: everything kept
  assert suffix_length(None, 10) is None
  assert suffix_length(jnp.asarray([-1]), 10) is None  # traced: no static promise


def test_entry_points_name_bad_shapes():
  from cast_jax.models import ModelConfig, init_params
  from cast_jax.models.layer_skip import forward_from_layer
  c = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4)
  p = init_params(c, jax.random.PRNGKey(0))
  h = jnp.zeros((2, 5, 16))
  with pytest.raises(ValueError, match=r"forward_from_layer: head_mask \(3, 4\) must be "
                                       r"\[L - start_layer, H\] = \(2, 4\)"):
    forward_from_layer(p, c, h, 1, head_mask=jnp.ones((3, 4)))
  with pytest.raises(ValueError, match=r"forward_from_any_layer: head_mask \(2, 4\) must be "
                                       r"\[L, H\] = \(3, 4\)"):
    forward_from_any_layer(p, c, h, jnp.int32(1), head_mask=jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"forward_from_any_layer: hidden must be \[B, T, 16\]"):
    forward_from_any_layer(p, c, jnp.zeros((2, 5, 8)), jnp.int32(0))
