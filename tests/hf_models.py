"""Tiny random HF checkpoints for every supported architecture (the numerical references)."""

from __future__ import annotations

import torch
import transformers

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}

# Each case exercises the switch that distinguishes its family.
CASES = {
    "llama": dict(cls="LlamaConfig", num_attention_heads=4, num_key_value_heads=2,
                  rope_parameters=ROPE_LLAMA3),
    "qwen2": dict(cls="Qwen2Config", num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(cls="Qwen3Config", num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  tie_word_embeddings=True),
    "mistral": dict(cls="MistralConfig", num_attention_heads=4, num_key_value_heads=1,
                    sliding_window=5),
}


def make_hf_model(arch: str, seed: int = 0, **overrides):
  """A random fp32 eager-attention HF causal LM of family `arch`, with peaky logits.

  A larger init std than HF's default makes greedy decoding free of near-ties, so token-exact
  generation comparisons are meaningful.
  """
  spec = dict(CASES[arch])
  cls = getattr(transformers, spec.pop("cls"))
  kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, initializer_range=0.2)
  kw.update(spec)
  kw.update(overrides)
  config = cls(**kw)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():  # random biases and norm weights, so they are actually tested
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval().float()


def save_hf(model, path, **kw):
  model.save_pretrained(path, safe_serialization=True, **kw)
  return path


def tiny_llama_on_testbed_vocab(path):
  """A random HF Llama over the testbed world's tokenizer, saved to `path` and loaded back.

  Returns (world, tokenizer, HF model, ModelConfig, params): real testbed prompts and chat
  template on a model small enough for per-head reference loops.
  """
  from cast_jax.models import load_pretrained
  from cast_jax.testbed import build_world
  from cast_jax.testbed.tokenizer import build_tokenizer

  world = build_world(0)
  tok = build_tokenizer(world)
  model = make_hf_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id)
  config, params = load_pretrained(save_hf(model, path))
  return world, tok, model, config, params
