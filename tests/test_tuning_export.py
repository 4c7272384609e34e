"""Head-restricted LoRA vs PEFT + transformers (PyTorch, fp32, CPU): the adapter seam, the PEFT
export and the merged HF checkpoint, on tiny random Llama (GQA) and Qwen2 (q bias) models."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from cast_jax import io_atomic
from cast_jax.models import forward, load_pretrained
from cast_jax.tuning import (LoraConfig, adapter_params, init_lora, load_peft_adapter,
                             make_adapter_fn, random_mask, save_merged, save_peft_adapter)
from hf_models import make_hf_model, save_hf

LCFG = LoraConfig(rank=4, alpha=8.0)
TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
  """(arch, base dir, config, params, lora with random B (also on frozen heads), mask, ids)."""
  arch = request.param
  base_dir = save_hf(make_hf_model(arch), tmp_path_factory.mktemp(arch) / "base")
  config, params = load_pretrained(base_dir)
  mask = random_mask((config.num_layers, config.num_heads), 5, seed=3)
  lora = init_lora(config, jax.random.PRNGKey(0), LCFG)
  # Trained-looking B everywhere: a frozen head's update must vanish by the mask, not by B = 0.
  lora["b"] = 0.5 * jax.random.normal(jax.random.PRNGKey(1), lora["b"].shape)
  ids = np.random.RandomState(0).randint(3, 97, size=(2, 24))
  return arch, base_dir, config, params, lora, mask, ids


def _ours(params, config, ids, lora=None, mask=None):
  kw = {} if lora is None else dict(adapter_fn=make_adapter_fn(LCFG),
                                    adapter_params=adapter_params(lora, mask))
  return np.asarray(forward(params, config, jnp.asarray(ids), **kw))


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def test_peft_adapter_matches_library_logits(setup, tmp_path):
  arch, base_dir, config, params, lora, mask, ids = setup
  ours = _ours(params, config, ids, lora, mask)
  assert np.abs(ours - _ours(params, config, ids)).max() > 1e-2  # the adapter does something
  path = save_peft_adapter(tmp_path / "adapter", lora, mask, config, LCFG,
                           base_model_name_or_path=str(base_dir))
  cfg = json.load(open(os.path.join(path, "adapter_config.json")))
  assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["bias"],
          cfg["target_modules"]) == (4, 8.0, 0.0, "none", ["q_proj"])
  tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
  H, Dh = config.num_heads, config.head_dim
  for l in range(config.num_layers):
    b = tensors[f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.weight"]
    assert b.shape == (H * Dh, 4)
    rows = b.reshape(H, Dh, 4)
    for h in range(H):  # frozen heads' rows exactly zero, tuned heads' rows not
      assert (np.count_nonzero(rows[h]) == 0) == (mask[l, h] == 0), (l, h)
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
  ref = _torch_logits(peft.PeftModel.from_pretrained(base.float().eval(), path), ids)
  np.testing.assert_array_less(np.abs(ours - ref).max(), TOL)
  back, back_mask, back_cfg = load_peft_adapter(path, config)
  np.testing.assert_array_equal(back_mask, mask)
  assert back_cfg == LCFG
  np.testing.assert_array_equal(back["a"], np.asarray(lora["a"]))
  np.testing.assert_array_equal(back["b"], np.asarray(lora["b"]) * mask[:, None, :, None])


def test_merged_checkpoint_loads_in_transformers_and_here(setup, tmp_path):
  arch, base_dir, config, params, lora, mask, ids = setup
  ours = _ours(params, config, ids, lora, mask)
  path = save_merged(tmp_path / "merged", params, lora, mask, config, LCFG)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
  np.testing.assert_array_less(np.abs(ours - _torch_logits(hf.float().eval(), ids)).max(), TOL)
  config2, merged = load_pretrained(path)
  np.testing.assert_array_less(np.abs(ours - _ours(merged, config2, ids)).max(), TOL)
  # Frozen heads' q_proj rows and every other tensor: the base checkpoint's bytes.
  base_t, merged_t = (load_file(os.path.join(p, "model.safetensors")) for p in (base_dir, path))
  assert set(base_t) == set(merged_t)
  H, Dh = config.num_heads, config.head_dim
  for name, t in base_t.items():
    if name.endswith("q_proj.weight"):
      l = int(name.split(".")[2])
      got, want = merged_t[name].reshape(H, Dh, -1), t.reshape(H, Dh, -1)
      for h in range(H):
        assert np.array_equal(got[h], want[h]) == (mask[l, h] == 0), (name, h)
    else:
      assert merged_t[name].tobytes() == t.tobytes(), name


def test_adapter_writes_are_atomic_and_refuse_foreign_dirs(setup, tmp_path):
  _, _, config, _, lora, mask, _ = setup
  path = save_peft_adapter(tmp_path / "a", lora, mask, config, LCFG)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_peft_adapter(path, lora, mask, config, LCFG)
  save_peft_adapter(path, lora, mask, config, LCFG, overwrite=True)
  with open(os.path.join(path, "notes.txt"), "w") as f:
    f.write("mine")
  with pytest.raises(io_atomic.UnsafeWriteError, match="notes.txt"):
    save_peft_adapter(path, lora, mask, config, LCFG, overwrite=True)
  with pytest.raises(ValueError, match=r"\[L, H\]"):
    save_peft_adapter(tmp_path / "b", lora, mask[:1], config, LCFG)
  cfg_path = os.path.join(path, "adapter_config.json")
  cfg = json.load(open(cfg_path))
  with open(cfg_path, "w") as f:
    json.dump({**cfg, "use_rslora": True}, f)
  with pytest.raises(ValueError, match="use_rslora"):
    load_peft_adapter(path, config)
