"""Config for launch/demo.py: a tiny random checkpoint, greedy generation, per-head sanity table."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
      num_heads=8, num_kv_heads=4, head_dim=8, init_std=0.2))
  c.batch_size = 4
  c.prompt_len = 12
  c.max_new_tokens = 24
  return c
