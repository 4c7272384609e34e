"""Head-restricted LoRA out to PEFT (adapter dir) and to a merged HF checkpoint, both atomic.

PEFT layout (what `peft.PeftModel.from_pretrained(hf_base, path)` loads; target q_proj only):
  adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
                              target_modules ["q_proj"], bias "none", base_model_name_or_path
  adapter_model.safetensors   base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight
                              [r, D] = A[l].T, and ...lora_B.weight [H*Dh, r] = (B[l] * mask[l])
                              as [r, H*Dh], transposed: row h*Dh + d is head h's output channel d
                              (HF's q_proj order), so a frozen head's Dh rows are exact zeros.
  cast_head_mask.json         the [L, H] mask (PEFT ignores it; `load_peft_adapter` reads it)

PEFT computes q += scale * lora_B(lora_A(x)) with scale = lora_alpha / r, the same map as
delta_Wq = scale * A @ (B * mask) on our [D, H*Dh] weight (torch stores W^T).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cast_jax import io_atomic
from cast_jax.models import checkpoint as hf_checkpoint
from cast_jax.models.config import ModelConfig
from cast_jax.tuning import lora as lora_lib

Params = dict[str, Any]
CONFIG_FILE, WEIGHTS_FILE, MASK_FILE = ("adapter_config.json", "adapter_model.safetensors",
                                        "cast_head_mask.json")
_ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, MASK_FILE, "README.md")
_KEY = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


def _foreign(path: str) -> list[str]:
  """Entries of an existing dir that a PEFT adapter writer did not make."""
  return sorted(n for n in os.listdir(path) if n not in _ADAPTER_FILES)


def peft_state_dict(lora: Params, head_mask: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """{PEFT tensor name: float32 numpy}: lora_A.weight [r, D], lora_B.weight [H*Dh, r] per layer."""
  mask = lora_lib.check_head_mask(head_mask, config)
  a = np.asarray(jax.device_get(lora["a"]), np.float32)
  b = np.asarray(jax.device_get(lora["b"]), np.float32) * mask[:, None, :, None]
  L, r = b.shape[:2]
  out = {}
  for l in range(L):
    out[_KEY.format(l, "A")] = np.ascontiguousarray(a[l].T)
    out[_KEY.format(l, "B")] = np.ascontiguousarray(b[l].reshape(r, -1).T)
  return out


def adapter_config(lora_config: lora_lib.LoraConfig, base_model_name_or_path: str | None) -> dict:
  """The adapter_config.json dict (PEFT LoraConfig fields; unset ones take PEFT's defaults)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora_config.rank),
      "lora_alpha": float(lora_config.alpha), "lora_dropout": float(lora_config.dropout),
      "target_modules": ["q_proj"], "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
      "modules_to_save": None, "layers_to_transform": None,
      "base_model_name_or_path": base_model_name_or_path,
  }


def save_peft_adapter(path: str | os.PathLike, lora: Params, head_mask: Any, config: ModelConfig,
                      lora_config: lora_lib.LoraConfig = lora_lib.LoraConfig(), *,
                      base_model_name_or_path: str | None = None, overwrite: bool = False) -> str:
  """Writes the PEFT adapter dir (module doc) atomically (`cast_jax.io_atomic.atomic_dir`).

  Args:
    lora: {"a": [L, D, r], "b": [L, r, H, Dh]}; head_mask [L, H] in {0, 1}.
    base_model_name_or_path: recorded for `peft.AutoPeftModelForCausalLM` (the HF base dir or
      hub id); None leaves it null (load with `PeftModel.from_pretrained(base, path)`).
    overwrite: replace an existing adapter dir (only one holding nothing but adapter files).

  Returns: path.
  """
  mask = lora_lib.check_head_mask(head_mask, config)
  with io_atomic.atomic_dir(path, kind="PEFT adapter", overwrite=overwrite,
                            recognise=_foreign) as tmp:
    save_file(peft_state_dict(lora, mask, config), os.path.join(tmp, WEIGHTS_FILE),
              metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(adapter_config(lora_config, base_model_name_or_path), f, indent=2)
    with open(os.path.join(tmp, MASK_FILE), "w") as f:
      json.dump({"head_mask": mask.astype(int).tolist()}, f)
  return os.fspath(path)


def load_peft_adapter(path: str | os.PathLike, config: ModelConfig
                      ) -> tuple[Params, np.ndarray, lora_lib.LoraConfig]:
  """Reads an adapter dir written by `save_peft_adapter` -> (lora, head_mask [L, H], config).

  Without cast_head_mask.json (a foreign PEFT q_proj adapter) the mask is 1 for every head
  whose lora_B rows are not all zero.
  """
  path = os.fspath(path)
  with open(os.path.join(path, CONFIG_FILE)) as f:
    cfg = json.load(f)
  if cfg.get("peft_type") != "LORA" or list(cfg.get("target_modules") or []) != ["q_proj"]:
    raise ValueError(f"{path}/{CONFIG_FILE}: expected a LORA adapter on ['q_proj'], got "
                     f"peft_type={cfg.get('peft_type')!r}, target_modules="
                     f"{cfg.get('target_modules')!r}.")
  # Options that change PEFT's map away from scale * B @ A on x @ W^T: not representable here.
  odd = {k: cfg[k] for k in ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern",
                             "alpha_pattern", "layers_to_transform") if cfg.get(k)}
  if odd:
    raise ValueError(f"{path}/{CONFIG_FILE} sets {odd}; only plain LoRA (scale lora_alpha / r "
                     "on every layer's q_proj) loads here.")
  lcfg = lora_lib.LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                             dropout=float(cfg.get("lora_dropout", 0.0)))
  c = config
  a = np.empty((c.num_layers, c.hidden_size, lcfg.rank), np.float32)
  b = np.empty((c.num_layers, lcfg.rank, c.num_heads, c.head_dim), np.float32)
  with safe_open(os.path.join(path, WEIGHTS_FILE), framework="numpy") as f:
    names = set(f.keys())
    for l in range(c.num_layers):
      ka, kb = _KEY.format(l, "A"), _KEY.format(l, "B")
      if ka not in names or kb not in names:
        raise ValueError(f"{path}/{WEIGHTS_FILE} lacks {ka if ka not in names else kb}; it is "
                         f"not a q_proj LoRA for this {c.num_layers}-layer model.")
      a[l] = f.get_tensor(ka).T
      b[l] = f.get_tensor(kb).T.reshape(lcfg.rank, c.num_heads, c.head_dim)
  mask_path = os.path.join(path, MASK_FILE)
  if os.path.exists(mask_path):
    with open(mask_path) as f:
      mask = lora_lib.check_head_mask(json.load(f)["head_mask"], c, where=mask_path)
  else:
    mask = (np.abs(b).max(axis=(1, 3)) > 0).astype(np.float32)
  return {"a": a, "b": b}, mask, lcfg


def save_merged(path: str | os.PathLike, params: Params, lora: Params, head_mask: Any,
                config: ModelConfig, lora_config: lora_lib.LoraConfig = lora_lib.LoraConfig(),
                *, dtype=None, tokenizer: Any = None, overwrite: bool = False) -> str:
  """The merged model (`lora.merge_lora`) as an HF checkpoint dir (`models.save_pretrained`)."""
  mask = lora_lib.check_head_mask(head_mask, config)
  merged = lora_lib.merge_lora(params, lora, mask, lora_config)
  return hf_checkpoint.save_pretrained(merged, config, path, dtype=dtype, tokenizer=tokenizer,
                                       overwrite=overwrite)
