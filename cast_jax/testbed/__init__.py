"""Embedded testbed: a seeded synthetic instruction world and its word-level tokenizer.

`build_world(seed) -> World`, `write_world(world, dir)`; `build_tokenizer(world)` (imported on
first use, so the world alone does not pull in `transformers`).
"""

from cast_jax.testbed.lexicon import ARCHAIC_WORDS
from cast_jax.testbed.world import (
    HELDOUT_FILES,
    TRAIN_FILES,
    WORLD_VERSION,
    World,
    WorldSizes,
    build_world,
    iter_texts,
    record_prompt,
    record_response,
    split_prompts,
    write_world,
)
from cast_jax.testbed.world_common import (
    FIXED_RESPONSE,
    MATH_INSTRUCTION,
    MCQ_INSTRUCTION,
    REFUSAL,
    format_math_prompt,
    format_mcq_prompt,
)

_LAZY = {"build_tokenizer", "chat_ids", "CHAT_TEMPLATE", "SPECIAL_TOKENS"}


def __getattr__(name):
  if name in _LAZY:
    from cast_jax.testbed import tokenizer
    return getattr(tokenizer, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
