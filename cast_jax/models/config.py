"""One frozen config for every supported decoder family, parsed from / written to HF config.json.

Llama, Mistral, Qwen2 and Qwen3 differ only by switches (bias, q/k-norm, sliding window, rope
scaling, tied embeddings), so one dataclass and one decoder cover them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


# config.json keys with no default: a checkpoint without them cannot be built.
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")


class ConfigError(ValueError):
  """A config.json that this library cannot represent faithfully."""


def _hf_int(hf: Mapping[str, Any], key: str, source: str, default: Any = None) -> int:
  """hf[key] as a positive int, or ConfigError naming the key, the value and the file."""
  value = hf.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    ok = False
  else:
    try:
      ok = float(value) == int(float(value)) and int(float(value)) > 0
    except (ValueError, OverflowError):
      ok = False
  if not ok:
    raise ConfigError(f"{source}: {key}={value!r} is not a positive integer. Fix the file or "
                      "re-download the checkpoint.")
  return int(float(value))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `rope_type` in SUPPORTED_ROPE_TYPES; unused fields stay at defaults."""

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama-family decoder. Hashable, so it can be a static jit argument.

  `sliding_windows` holds one entry per layer: 0 means full causal attention, w > 0 means a
  query at position i sees keys at positions j with i - w < j <= i (HF's convention).
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  attention_bias: bool = False
  qk_norm: bool = False
  sliding_windows: tuple[int, ...] = ()
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"model_type={self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}.")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_heads} must be a multiple of "
          f"num_key_value_heads={self.num_kv_heads}.")
    if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(
          f"rope scaling type {self.rope_scaling.rope_type!r} is not implemented; "
          f"implemented: {SUPPORTED_ROPE_TYPES}.")
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ConfigError(f"hidden_act={self.hidden_act!r} not in {SUPPORTED_ACTIVATIONS}.")
    if not self.sliding_windows:
      object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
    if len(self.sliding_windows) != self.num_layers:
      raise ConfigError(
          f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers.")

  @property
  def num_groups(self) -> int:
    """Query heads per kv head (GQA group size)."""
    return self.num_heads // self.num_kv_heads

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
    """Parses an HF config.json dict (transformers v4 `rope_scaling` or v5 `rope_parameters`).

    `source` names the file in error messages. Raises ConfigError for a non-dict, a missing
    required key (REQUIRED_HF_KEYS) or a non-positive / non-integer size.
    """
    if not isinstance(hf, Mapping):
      raise ConfigError(f"{source} holds a JSON {type(hf).__name__}, expected an object "
                        "{\"model_type\": ..., ...}. Fix the file or re-download the checkpoint.")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"{source} has model_type={model_type!r}; supported: {SUPPORTED_MODEL_TYPES}.")
    missing = [k for k in REQUIRED_HF_KEYS if hf.get(k) is None]
    if missing:
      raise ConfigError(f"{source} lacks required key(s) {missing}; a {model_type} config needs "
                        f"{list(REQUIRED_HF_KEYS)}. Fix the file or re-download the checkpoint.")
    size = {k: _hf_int(hf, k, source) for k in REQUIRED_HF_KEYS}
    num_layers = size["num_hidden_layers"]
    num_heads = size["num_attention_heads"]
    head_dim = (_hf_int(hf, "head_dim", source) if hf.get("head_dim")
                else size["hidden_size"] // num_heads)
    try:
      rope_theta, rope_scaling = _parse_rope(hf)
      eos = hf.get("eos_token_id")
      eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
      if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not supported (no released Llama/Qwen/Mistral "
                          "uses it).")
      return cls(
          model_type=model_type,
          vocab_size=size["vocab_size"],
          hidden_size=size["hidden_size"],
          intermediate_size=size["intermediate_size"],
          num_layers=num_layers,
          num_heads=num_heads,
          num_kv_heads=_hf_int(hf, "num_key_value_heads", source, num_heads) if hf.get(
              "num_key_value_heads") else num_heads,
          head_dim=int(head_dim),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          rope_theta=rope_theta,
          rope_scaling=rope_scaling,
          # Qwen2 always has q/k/v biases; its config has no switch for them.
          attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
          qk_norm=model_type == "qwen3",
          sliding_windows=_parse_sliding_windows(hf, model_type, num_layers),
          tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
          hidden_act=hf.get("hidden_act", "silu"),
          max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
          bos_token_id=hf.get("bos_token_id"),
          eos_token_ids=eos_ids,
          pad_token_id=hf.get("pad_token_id"),
      )
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"{source}: cannot parse it ({type(e).__name__}: {e}). Fix the file "
                        "or re-download the checkpoint.") from e

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
    """Reads `<path>/config.json`."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file} not found: a checkpoint dir needs an HF config.json.")
    try:
      with open(file, encoding="utf-8-sig") as f:
        hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
      raise ConfigError(f"{file} is not valid JSON ({e}). Fix the file or re-download the "
                        "checkpoint.") from e
    return cls.from_hf(hf, source=file)

  def to_hf(self) -> dict[str, Any]:
    """The HF config.json dict (transformers v5 spelling; v4 keys kept for older readers)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
    rope = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
    if self.rope_scaling.rope_type == "linear":
      rope["factor"] = self.rope_scaling.factor
    elif self.rope_scaling.rope_type == "llama3":
      rope.update(dataclasses.asdict(self.rope_scaling))
    windows = set(w for w in self.sliding_windows if w)
    if len(windows) > 1:
      raise ConfigError(f"HF configs hold one sliding window size; got {sorted(windows)}.")
    window = windows.pop() if windows else None
    eos = list(self.eos_token_ids)
    out = {
        "architectures": [arch], "model_type": self.model_type,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": rope, "rope_theta": self.rope_theta,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": self.hidden_act,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": self.pad_token_id, "torch_dtype": "float32",
        "sliding_window": window,
        "layer_types": ["sliding_attention" if w else "full_attention"
                        for w in self.sliding_windows],
    }
    if self.model_type in ("llama", "qwen3"):
      out["attention_bias"] = self.attention_bias
    if self.model_type in ("qwen2", "qwen3"):
      out["use_sliding_window"] = window is not None
      first = next((i for i, w in enumerate(self.sliding_windows) if w), self.num_layers)
      out["max_window_layers"] = first
    return out


def _parse_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
  params = dict(hf.get("rope_parameters") or {})
  legacy = hf.get("rope_scaling") or {}
  if not params.get("rope_type") and legacy:
    params.update(legacy)
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", "default")) or "default"
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(
        f"rope scaling type {rope_type!r} is not implemented; implemented: "
        f"{SUPPORTED_ROPE_TYPES}. Add it in cast_jax/models/rope.py.")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError("partial_rotary_factor != 1 is not supported.")
  fields = {f.name for f in dataclasses.fields(RopeScaling)}
  return theta, RopeScaling(**{k: v for k, v in params.items() if k in fields} |
                            {"rope_type": rope_type})


def _parse_sliding_windows(hf: Mapping[str, Any], model_type: str, n: int) -> tuple[int, ...]:
  window = hf.get("sliding_window") or 0
  layer_types = hf.get("layer_types")
  if layer_types and window:
    return tuple(window if t == "sliding_attention" else 0 for t in layer_types)
  if model_type == "mistral":
    return (window,) * n
  if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
    first = hf.get("max_window_layers", n)
    return tuple(window if i >= first else 0 for i in range(n))
  return (0,) * n
