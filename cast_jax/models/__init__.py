"""Functional Llama / Mistral / Qwen2 / Qwen3 decoder, its config and HF checkpoint I/O."""

from cast_jax.models.checkpoint import CheckpointError, hf_state_dict, load_pretrained, save_pretrained
from cast_jax.models.config import ConfigError, ModelConfig, RopeScaling
from cast_jax.models.decoder import (COLLECTABLE, forward, forward_cached, init_cache, init_params,
                                     param_shapes)

__all__ = [
    "COLLECTABLE", "CheckpointError", "ConfigError", "ModelConfig", "RopeScaling", "forward",
    "forward_cached", "hf_state_dict", "init_cache", "init_params", "load_pretrained",
    "param_shapes", "save_pretrained",
]
