"""Checkpoint I/O: sharded index, export round trip through transformers, clear errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cast_jax.models import (CheckpointError, ConfigError, ModelConfig, forward, init_params,
                             load_pretrained, save_pretrained)
from hf_models import make_hf_model, save_hf


def _logits_hf(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  model = make_hf_model("llama")
  return model, save_hf(model, tmp_path_factory.mktemp("llama"))


def test_sharded_index_checkpoint_loads(llama_dir, tmp_path):
  model, _ = llama_dir
  path = save_hf(model, tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
  config, params = load_pretrained(path)
  ids = np.random.RandomState(0).randint(3, 97, size=(1, 12))
  np.testing.assert_allclose(forward(params, config, jnp.asarray(ids)), _logits_hf(model, ids),
                             atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("shard", [None, 30_000])
def test_export_loads_in_transformers_with_same_logits(arch, shard, tmp_path):
  config = ModelConfig.from_hf(make_hf_model(arch).config.to_dict())
  params = init_params(config, jax.random.PRNGKey(0), std=0.2)
  path = save_pretrained(params, config, tmp_path / "out", max_shard_bytes=shard)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                         dtype=torch.float32).eval()
  ids = np.random.RandomState(1).randint(3, 97, size=(2, 14))
  np.testing.assert_allclose(forward(params, config, jnp.asarray(ids)), _logits_hf(hf, ids),
                             atol=1e-4)
  again, params2 = load_pretrained(path)
  assert again == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def _corrupt(src, dst, edit):
  shutil.copytree(src, dst)
  from safetensors.numpy import load_file, save_file
  state = load_file(dst / "model.safetensors")
  edit(state)
  save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def test_missing_tensor_is_named(llama_dir, tmp_path):
  _, path = llama_dir
  bad = _corrupt(path, tmp_path / "bad", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
    load_pretrained(bad)


def test_wrong_shape_names_expected_and_found(llama_dir, tmp_path):
  _, path = llama_dir

  def edit(s):
    s["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

  bad = _corrupt(path, tmp_path / "bad", edit)
  with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \[8, 32\], expected \[16, 32\]"):
    load_pretrained(bad)


def test_unsupported_model_type_lists_supported(llama_dir, tmp_path):
  _, path = llama_dir
  bad = tmp_path / "gpt"
  shutil.copytree(path, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="model_type='gpt2'.*llama.*mistral.*qwen2.*qwen3"):
    load_pretrained(bad)


def test_unimplemented_rope_type_is_refused():
  hf = make_hf_model("llama").config.to_dict()
  hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
  with pytest.raises(ConfigError, match="'yarn' is not implemented"):
    ModelConfig.from_hf(hf)


def test_pickle_refused_without_flag(llama_dir, tmp_path):
  model, _ = llama_dir
  bad = tmp_path / "pickle"
  bad.mkdir()
  model.config.save_pretrained(bad)
  torch.save(model.state_dict(), bad / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="allow_pickle=True"):
    load_pretrained(bad)
  config, params = load_pretrained(bad, allow_pickle=True)
  ids = np.random.RandomState(2).randint(3, 97, size=(1, 9))
  np.testing.assert_allclose(forward(params, config, jnp.asarray(ids)), _logits_hf(model, ids),
                             atol=1e-4)


def test_missing_dir_and_hub_id_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    load_pretrained(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="pass the local dir"):
    load_pretrained("no-such-org-cast-jax/no-such-model")
