"""Config for launch/testbed.py: the embedded testbed (world, tokenizer, tiny Llama, alignment).

Fields under `spec` map 1:1 onto cast_jax.testbed.TestbedSpec (the cache key); `sizes` onto
WorldSizes. Override any of them on the command line, e.g. --config.spec.pretrain_steps=400.
"""

import dataclasses

import ml_collections

from cast_jax.testbed.build import TestbedSpec
from cast_jax.testbed.world import WorldSizes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  spec = {f.name: getattr(TestbedSpec(), f.name) for f in dataclasses.fields(TestbedSpec)
          if f.name != "sizes"}
  c.spec = ml_collections.ConfigDict(spec)
  c.sizes = ml_collections.ConfigDict(dataclasses.asdict(WorldSizes()))
  c.cache_dir = ""  # empty: $CAST_JAX_CACHE or ~/.cache/cast_jax
  c.eval_limit = 200  # held-out prompts per metric
  return c
