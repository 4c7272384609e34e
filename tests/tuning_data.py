"""Shared tiny setup for the tuning tests: a random HF Llama loaded here, and token examples."""

from __future__ import annotations

import numpy as np

from cast_jax.models import load_pretrained
from hf_models import make_hf_model, save_hf


def tiny_llama(path, arch: str = "llama"):
  """(HF model, config, params) of a tiny random model saved to `path` and loaded back."""
  model = make_hf_model(arch)
  config, params = load_pretrained(save_hf(model, path))
  return model, config, params


def examples(n: int, seed: int, *, prompt_len: int = 6, response_len: int = 5, vocab: int = 97,
             response_ids=None):
  """n (input_ids, loss_mask) pairs: random prompts, then a response (random, or the given ids)."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    prompt = rng.randint(3, vocab, size=prompt_len)
    resp = (rng.randint(3, vocab, size=response_len) if response_ids is None
            else np.asarray(response_ids))
    ids = np.concatenate([prompt, resp]).astype(np.int32)
    mask = np.concatenate([np.zeros(prompt_len), np.ones(len(resp))]).astype(np.int32)
    out.append((ids, mask))
  return out
