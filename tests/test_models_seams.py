"""The decoder seams later stages stand on, each against HF transformers (torch fp32 eager):
soft inputs (`input_embeds`), per-head outputs (`collect=("head_out",)`), KV-cache decoding
(`forward_cached`), batched head ablation, multi-head (not grouped) attention, bf16 checkpoints.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cast_jax.diagnosis.head_ablation import ablate_each_head
from cast_jax.models import forward, forward_cached, init_cache, load_pretrained
from hf_models import make_hf_model, save_hf


def _load(arch, tmp_path_factory, **overrides):
  model = make_hf_model(arch, **overrides)
  config, params = load_pretrained(save_hf(model, tmp_path_factory.mktemp(arch)))
  return model, config, params


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  """Biases on q/k/v, so head slices and soft inputs are tested with them."""
  return _load("qwen2", tmp_path_factory)


def _hf_logits(model, ids=None, **kw):
  with torch.no_grad():
    kw = {k: torch.tensor(v) for k, v in kw.items()}
    if ids is not None:
      kw["input_ids"] = torch.tensor(ids)
    return model(**kw).logits.float().numpy()


def _mask_positions(mask):
  """The design's position rule for left padding: the count of real tokens before, minus one."""
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _scale_heads_hook(scales, head_dim):
  """A forward pre-hook on o_proj multiplying head h's input slice by scales[h]."""

  def hook(module, args):
    x = args[0].clone()
    for h, s in enumerate(scales):
      if s != 1.0:
        x[..., h * head_dim:(h + 1) * head_dim] *= float(s)
    return (x,)

  return hook


def _hf_logits_with_head_mask(model, ids, head_mask, head_dim):
  """HF logits with o_proj's input of layer l, head h scaled by head_mask[l, h]."""
  handles = [layer.self_attn.o_proj.register_forward_pre_hook(
      _scale_heads_hook(np.asarray(head_mask)[l], head_dim))
             for l, layer in enumerate(model.model.layers)]
  try:
    return _hf_logits(model, ids)
  finally:
    for h in handles:
      h.remove()


def test_input_embeds_equal_ids_and_hf_inputs_embeds(qwen2):
  model, config, params = qwen2
  rs = np.random.RandomState(0)
  ids = rs.randint(3, 97, size=(2, 10))
  table = model.model.embed_tokens.weight.detach().numpy()
  by_rows = np.asarray(forward(params, config, input_embeds=jnp.asarray(table[ids])))
  np.testing.assert_array_less(np.abs(by_rows - _hf_logits(model, ids)).max(), 1e-4)
  np.testing.assert_allclose(by_rows, forward(params, config, jnp.asarray(ids)), atol=1e-5)

  # A soft prompt that is no token's embedding, left padded: HF gets the same positions.
  soft = rs.normal(0, 0.2, size=(2, 10, config.hidden_size)).astype(np.float32)
  mask = np.ones((2, 10), np.int64)
  mask[0, :3] = 0
  ours = np.asarray(forward(params, config, input_embeds=jnp.asarray(soft),
                            attention_mask=jnp.asarray(mask)))
  ref = _hf_logits(model, inputs_embeds=soft, attention_mask=mask,
                   position_ids=_mask_positions(mask))
  real = mask.astype(bool)
  np.testing.assert_array_less(np.abs(ours[real] - ref[real]).max(), 1e-4)
  assert np.abs(ours[real] - by_rows[real]).max() > 1e-2  # the soft input was actually used


def test_head_out_equals_hf_o_proj_input_after_head_mask(qwen2):
  model, config, params = qwen2
  L, H, Dh = config.num_layers, config.num_heads, config.head_dim
  ids = np.random.RandomState(1).randint(3, 97, size=(2, 9))
  zero_layer, zero_head = 1, 3
  captured = {}

  def capture(l):
    def hook(module, args):
      captured[l] = args[0].detach().numpy().reshape(*ids.shape, H, Dh)
    return hook

  handles = []
  for l, layer in enumerate(model.model.layers):
    if l == zero_layer:  # registered first, so the capture sees the ablated input
      scales = np.ones(H)
      scales[zero_head] = 0.0
      handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
          _scale_heads_hook(scales, Dh)))
    handles.append(layer.self_attn.o_proj.register_forward_pre_hook(capture(l)))
  try:
    ref = _hf_logits(model, ids)
  finally:
    for h in handles:
      h.remove()
  hm = jnp.ones((L, H)).at[zero_layer, zero_head].set(0.0)
  logits, got = forward(params, config, jnp.asarray(ids), head_mask=hm, collect=("head_out",))
  assert got["head_out"].shape == (L, *ids.shape, H, Dh)
  for l in range(L):
    np.testing.assert_allclose(got["head_out"][l], captured[l], atol=1e-5)
  assert np.abs(captured[zero_layer - 1][:, :, zero_head]).max() > 1e-2  # heads are not all 0
  np.testing.assert_array_less(np.abs(np.asarray(logits) - ref).max(), 1e-4)


def _check_cached_decode_matches_hf(model, config, params, seed):
  """Left-padded prefill, then one forced token per call, vs HF on each unpadded row."""
  rs = np.random.RandomState(seed)
  lengths, P, N = [7, 4, 6], 7, 6
  B = len(lengths)
  prompts = [rs.randint(3, 97, size=n) for n in lengths]
  cont = rs.randint(3, 97, size=(B, N))
  ids = np.zeros((B, P), np.int32)
  mask = np.zeros((B, P), np.int32)
  for b, r in enumerate(prompts):
    ids[b, P - len(r):], mask[b, P - len(r):] = r, 1
  step = jax.jit(lambda x, pos, kv, cache, index: forward_cached(params, config, x, pos, kv,
                                                                 cache, index))
  kv_valid = np.concatenate([mask, np.zeros((B, N), np.int32)], axis=1)
  positions = _mask_positions(mask)
  prefill, cache = step(ids, positions, kv_valid, init_cache(config, B, P + N), 0)
  decoded = []
  for i in range(N):
    kv_valid[:, P + i] = 1
    logits, cache = step(cont[:, i:i + 1], positions[:, -1:] + 1 + i, kv_valid, cache, P + i)
    decoded.append(np.asarray(logits[:, 0]))
  prefill = np.asarray(prefill)
  for b, r in enumerate(prompts):
    ref = _hf_logits(model, np.concatenate([r, cont[b]])[None])[0]
    n = len(r)
    np.testing.assert_array_less(np.abs(prefill[b, P - n:] - ref[:n]).max(), 1e-4)
    for i in range(N):
      np.testing.assert_array_less(np.abs(decoded[i][b] - ref[n + i]).max(), 1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: window 5 < 13 cached tokens
def test_forward_cached_decode_equals_hf_full_sequence(arch, tmp_path_factory):
  model, config, params = _load(arch, tmp_path_factory)
  _check_cached_decode_matches_hf(model, config, params, seed=2)


def test_mha_config_matches_hf(tmp_path_factory):
  """num_kv_heads == num_heads: the grouped-attention reshape with groups of one."""
  model, config, params = _load("llama", tmp_path_factory, num_key_value_heads=4)
  assert config.num_kv_heads == config.num_heads == 4
  ids = np.random.RandomState(3).randint(3, 97, size=(2, 20))
  ours = np.asarray(forward(params, config, jnp.asarray(ids)))
  np.testing.assert_array_less(np.abs(ours - _hf_logits(model, ids)).max(), 1e-4)
  hm = np.ones((config.num_layers, config.num_heads), np.float32)
  hm[2, 1] = 0.0
  ablated = np.asarray(forward(params, config, jnp.asarray(ids), head_mask=jnp.asarray(hm)))
  ref = _hf_logits_with_head_mask(model, ids, hm, config.head_dim)
  np.testing.assert_array_less(np.abs(ablated - ref).max(), 1e-4)
  _check_cached_decode_matches_hf(model, config, params, seed=4)


def test_ablate_each_head_equals_hf_loop(qwen2):
  model, config, params = qwen2
  L, H = config.num_layers, config.num_heads
  rs = np.random.RandomState(5)
  ids = rs.randint(3, 97, size=(2, 8))
  target = rs.randint(3, 97, size=2)

  def metric(log_probs):  # mean log-prob of a fixed next token
    return log_probs[np.arange(2), target].mean()

  def metric_fn(head_mask):
    logits = forward(params, config, jnp.asarray(ids), head_mask=head_mask)
    return metric(jax.nn.log_softmax(logits[:, -1]))

  # chunk=5 does not divide L*H=12: the remainder batch is covered too.
  table = np.asarray(jax.jit(lambda: ablate_each_head(metric_fn, config, chunk=5))())
  ref = np.zeros((L, H))
  for l in range(L):
    for h in range(H):
      hm = np.ones((L, H))
      hm[l, h] = 0.0
      logits = _hf_logits_with_head_mask(model, ids, hm, config.head_dim)[:, -1]
      ref[l, h] = metric(torch.log_softmax(torch.tensor(logits), -1).numpy())
  np.testing.assert_allclose(table, ref, atol=1e-4)
  assert np.ptp(ref) > 1e-2  # heads differ, so a permuted table would fail


def test_vmapped_head_masks_equal_hf(qwen2):
  """Several masks in one vmap: one head, two heads in two layers, a half-scaled head, a layer."""
  model, config, params = qwen2
  L, H = config.num_layers, config.num_heads
  ids = np.random.RandomState(6).randint(3, 97, size=(2, 8))
  masks = np.ones((4, L, H), np.float32)
  masks[0, 0, 1] = 0.0
  masks[1, 1, 0] = masks[1, 2, 3] = 0.0
  masks[2, 2, 2] = 0.5
  masks[3, 1] = 0.0
  ours = np.asarray(jax.jit(jax.vmap(
      lambda hm: forward(params, config, jnp.asarray(ids), head_mask=hm)))(jnp.asarray(masks)))
  for m, hm in enumerate(masks):
    ref = _hf_logits_with_head_mask(model, ids, hm, config.head_dim)
    np.testing.assert_array_less(np.abs(ours[m] - ref).max(), 1e-4)


def _ours_from_hf_state(sd, config):
  """HF tensor names and [out, in] shapes -> the design's param layout, written out by hand."""
  L, D = config.num_layers, config.hidden_size
  H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim

  def stack(fmt, fn):
    return np.stack([fn(sd[fmt.format(i)]) for i in range(L)])

  pre = "model.layers.{}."
  layers = {
      "attn_norm": stack(pre + "input_layernorm.weight", lambda w: w),
      "mlp_norm": stack(pre + "post_attention_layernorm.weight", lambda w: w),
      "wq": stack(pre + "self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, Dh)),
      "wk": stack(pre + "self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, Dh)),
      "wv": stack(pre + "self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, Dh)),
      "wo": stack(pre + "self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D)),
      "bq": stack(pre + "self_attn.q_proj.bias", lambda b: b.reshape(H, Dh)),
      "bk": stack(pre + "self_attn.k_proj.bias", lambda b: b.reshape(K, Dh)),
      "bv": stack(pre + "self_attn.v_proj.bias", lambda b: b.reshape(K, Dh)),
      "w_gate": stack(pre + "mlp.gate_proj.weight", lambda w: w.T),
      "w_up": stack(pre + "mlp.up_proj.weight", lambda w: w.T),
      "w_down": stack(pre + "mlp.down_proj.weight", lambda w: w.T),
  }
  out = {"embed": sd["model.embed_tokens.weight"], "layers": layers,
         "final_norm": sd["model.norm.weight"]}
  if not config.tie_word_embeddings:
    out["lm_head"] = sd["lm_head.weight"].T
  return out


def test_bf16_checkpoint_loads_exactly_in_fp32_and_bf16(tmp_path):
  hf16 = copy.deepcopy(make_hf_model("qwen2")).to(torch.bfloat16)
  path = save_hf(hf16, tmp_path / "bf16")
  saved = json.loads((path / "config.json").read_text())
  assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
  # bf16 -> fp32 is exact, so these are the stored values themselves.
  expected = _ours_from_hf_state({k: v.float().numpy() for k, v in hf16.state_dict().items()},
                                 load_pretrained(path)[0])
  config, p32 = load_pretrained(path)
  _, p16 = load_pretrained(path, dtype=jnp.bfloat16)
  assert jax.tree.structure(p32) == jax.tree.structure(expected)
  for got32, got16, want in zip(jax.tree.leaves(p32), jax.tree.leaves(p16),
                                jax.tree.leaves(expected)):
    assert got32.dtype == jnp.float32 and got16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got32), want)
    np.testing.assert_array_equal(np.asarray(got16.astype(jnp.float32)), want)

  ids = np.random.RandomState(7).randint(3, 97, size=(2, 16))
  hf32 = transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()
  ref = _hf_logits(hf32, ids)
  ours32 = np.asarray(forward(p32, config, jnp.asarray(ids)))
  np.testing.assert_array_less(np.abs(ours32 - ref).max(), 1e-4)
  # bf16 compute: no worse than HF's own bf16 forward on the same weights (plus a margin).
  ours16 = np.asarray(forward(p16, config, jnp.asarray(ids)))
  hf_err = np.abs(_hf_logits(hf16, ids) - ref).max()
  ours_err = np.abs(ours16 - ref).max()
  assert ours_err <= 1.5 * hf_err + 0.02 and ours_err < 0.3, (ours_err, hf_err)


def test_activation_side_low_rank_seam_equals_hf_with_merged_weights(qwen2):
  """`<w>_lora_a / _b` added by an adapter_fn == HF with W + a @ b written into every projection."""
  model, config, params = qwen2
  L, r = config.num_layers, 3
  hf_names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
              "w_down": "mlp.down_proj"}
  in_dims = {"wo": 2}
  rng = np.random.default_rng(0)
  lora, merged = {}, copy.deepcopy(model)
  for name, hf in hf_names.items():
    w = np.asarray(params["layers"][name])[0]
    k = in_dims.get(name, 1)
    a = rng.normal(0, 0.05, (L, *w.shape[:k], r)).astype(np.float32)
    b = rng.normal(0, 0.05, (L, r, *w.shape[k:])).astype(np.float32)
    lora[name] = (a, b)
    n_in = int(np.prod(w.shape[:k]))
    for l in range(L):
      delta = a[l].reshape(n_in, r) @ b[l].reshape(r, -1)  # [in, out]; torch stores [out, in]
      lin = merged.model.layers[l].get_submodule(hf)
      with torch.no_grad():
        lin.weight += torch.tensor(delta.T)

  def adapter_fn(lp, ap):
    return {**lp, **{f"{n}_lora_{s}": ap[n][i] for n in ap for i, s in enumerate("ab")}}

  ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, 9))
  got = forward(params, config, jnp.asarray(ids), adapter_fn=adapter_fn,
                adapter_params={n: tuple(map(jnp.asarray, ab)) for n, ab in lora.items()})
  want = _hf_logits(merged, ids)
  assert np.abs(want - _hf_logits(model, ids)).max() > 1e-2  # the deltas matter
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)
