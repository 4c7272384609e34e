"""Helpers shared by launch/sparse_tune.py and launch/cast_experiment.py (no flags defined here,
so both scripts can import it): config checks, the recipe / LoRA objects, head-set masks."""

import os

from absl import app

KINDS = ("bucket", "top", "bottom", "random", "all")
PCGRAD_MODES = ("one_sided", "symmetric")


def check_recipe(cfg, where: str = "--config") -> None:
  """Recipe / LoRA / eval config values, app.UsageError naming the field (shared by
  launch/cast_experiment.py)."""
  ints = {"recipe.epochs": (cfg.recipe.epochs, 1), "recipe.num_steps": (cfg.recipe.num_steps, 0),
          "recipe.batch_size": (cfg.recipe.batch_size, 1),
          "recipe.accum_steps": (cfg.recipe.accum_steps, 1),
          "recipe.max_len": (cfg.recipe.max_len, 8),
          "recipe.warmup_steps": (cfg.recipe.warmup_steps, 0),
          "eval.limit": (cfg.eval.limit, 1), "eval.batch_size": (cfg.eval.batch_size, 1),
          "eval.max_new_tokens": (cfg.eval.max_new_tokens, 1),
          "checkpoint_every": (cfg.checkpoint_every, 0)}
  for name, (v, low) in ints.items():
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise app.UsageError(f"{where}.{name}={v!r}: use an integer >= {low}.")
  try:
    recipe(cfg).optimizer(max(1, cfg.recipe.num_steps or 1))
    lora_config(cfg)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"{where}.recipe / lora: {e}") from None


def recipe(cfg):
  from cast_jax.tuning.runner import Recipe
  return Recipe(**cfg.recipe.to_dict())


def lora_config(cfg):
  from cast_jax.tuning import LoraConfig
  return LoraConfig(**cfg.lora.to_dict())


def check_file(flag: str, value, *, required: bool = True, kind: str = "file") -> None:
  if not value:
    if required:
      raise app.UsageError(f"--{flag} is required; pass the {kind}.")
    return
  ok = os.path.isdir(value) if kind == "dir" else os.path.isfile(value)
  if not ok:
    raise app.UsageError(f"--{flag}={value!r} is not an existing {kind}.")


def check_model(flag: str, value) -> None:
  if not value or not os.path.isfile(os.path.join(value, "config.json")):
    raise app.UsageError(f"--{flag}={value!r}: pass an HF checkpoint dir (with config.json and "
                         "the tokenizer).")


def resolve_mask(spec: str, map_path: str | None, config, seed: int, ranking: str):
  """(mask [L, H], the ConflictTables used) for a head-set spec; all / random need no map."""
  import numpy as np

  from cast_jax.tuning import runner
  if map_path:
    tables = runner.load_conflict_map(map_path)
  else:  # all / random only need the grid's shape
    tables = runner.ConflictTables(np.zeros((config.num_layers, config.num_heads)), None, None,
                                   1, "the model's head grid")
  if tables.c.shape != (config.num_layers, config.num_heads):
    raise ValueError(f"{tables.source} is over {tables.c.shape[0]} layers x {tables.c.shape[1]} "
                     f"heads; the model has {config.num_layers} x {config.num_heads}: pass the "
                     "map diagnosed on this model.")
  return runner.head_set_mask(spec, tables, seed, ranking), tables
