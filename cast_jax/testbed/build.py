"""Builds (or reuses) the testbed: world files, tokenizer, a tiny Llama pretrained from scratch on
the world, and its alignment-SFT counterpart, cached on disk by a hash of everything that decides
their bytes (generator version, seed, sizes, model and training settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
from absl import logging

from cast_jax import data
from cast_jax.models import ModelConfig, init_params, load_pretrained, save_pretrained
from cast_jax.models.decoder import Params
from cast_jax.testbed.world import WORLD_VERSION, World, WorldSizes, build_world, write_world
from cast_jax.train import OptimizerConfig
from cast_jax.train.sft import run_sft


@dataclasses.dataclass(frozen=True)
class TestbedSpec:
  """Everything that determines the testbed's bytes. Defaults build in minutes on 2 CPU cores."""

  seed: int = 0
  sizes: WorldSizes = WorldSizes()
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 4
  intermediate_size: int = 384
  max_len: int = 96
  # ~1/sqrt(hidden): at the decoder's default 0.02 attention starts near uniform and a pure
  # option-matching drill sat at chance ~1400 steps; at 0.08 it was solved by step ~500.
  init_std: float = 0.08
  pretrain_steps: int = 600
  pretrain_batch: int = 32
  pretrain_lr: float = 3e-3
  align_steps: int = 150
  align_batch: int = 16
  align_lr: float = 5e-4

  def key(self) -> str:
    """Cache key: changes whenever any setting or the world generator version changes."""
    blob = json.dumps({"world": WORLD_VERSION, "spec": dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Testbed:
  """A built testbed. `base_dir` / `aligned_dir` are HF checkpoint dirs (tokenizer included)."""

  spec: TestbedSpec
  root: str
  world: World
  tokenizer: Any
  config: ModelConfig
  base_params: Params
  base_dir: str
  world_dir: str


def default_cache_dir() -> str:
  """$CAST_JAX_CACHE, else ~/.cache/cast_jax."""
  return os.environ.get("CAST_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                       "cast_jax"))


def model_config(spec: TestbedSpec, tokenizer: Any) -> ModelConfig:
  """The testbed's Llama architecture (GQA, tied embeddings) sized by `spec`."""
  return ModelConfig(
      model_type="llama", vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
      intermediate_size=spec.intermediate_size, num_layers=spec.num_layers,
      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
      head_dim=spec.hidden_size // spec.num_heads, tie_word_embeddings=True,
      max_position_embeddings=4 * spec.max_len, bos_token_id=tokenizer.bos_token_id,
      eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)


def _sft(params, config, tokenizer, pairs, *, name, steps, batch, lr, seed, max_len, workdir,
         progress, per_sequence=False):
  examples = data.encode_dataset(tokenizer, pairs, max_len=max_len, name=name)
  opt = OptimizerConfig(learning_rate=lr, warmup_steps=max(1, steps // 12), total_steps=steps,
                        weight_decay=0.01, end_lr_ratio=0.05)
  params, summary = run_sft(params, config, examples, pad_id=tokenizer.pad_token_id,
                            num_steps=steps, batch_size=batch, seed=seed, optimizer=opt,
                            workdir=workdir, buckets=(64, max_len), progress=progress,
                            per_sequence=per_sequence)
  logging.info("%s: %d steps, final loss %.4f", name, steps, summary["loss"])
  return params, summary


def build_testbed(spec: TestbedSpec = TestbedSpec(), cache_dir: str | None = None, *,
                  progress: bool = True) -> Testbed:
  """Returns the testbed for `spec`, building and caching it first if needed.

  Layout under `<cache_dir>/testbed-<spec.key()>/`: world/ (JSONL files + MANIFEST.json),
  base/ (HF checkpoint + tokenizer), pretrain/ (metrics.jsonl, orbax checkpoints for resume).
  Every artifact appears atomically, so an interrupted build resumes or restarts cleanly.
  """
  from transformers import AutoTokenizer

  from cast_jax.testbed.tokenizer import build_tokenizer

  root = os.path.join(cache_dir or default_cache_dir(), f"testbed-{spec.key()}")
  world = build_world(spec.seed, spec.sizes)
  world_dir = os.path.join(root, "world")
  if not os.path.exists(os.path.join(world_dir, "MANIFEST.json")):
    write_world(world, world_dir)
  base_dir = os.path.join(root, "base")
  if not os.path.exists(os.path.join(base_dir, "config.json")):
    tokenizer = build_tokenizer(world)
    config = model_config(spec, tokenizer)
    params = init_params(config, jax.random.PRNGKey(spec.seed), std=spec.init_std)
    pairs = [(r["prompt"], r["response"]) for r in world.files["base/train.jsonl"]]
    params, _ = _sft(params, config, tokenizer, pairs, name="pretrain", steps=spec.pretrain_steps,
                     batch=spec.pretrain_batch, lr=spec.pretrain_lr, seed=spec.seed,
                     max_len=spec.max_len, workdir=os.path.join(root, "pretrain"),
                     progress=progress,
                     # Loss on responses, averaged per example: a one-token MCQ letter weighs as
                     # much as a 40-token solution.
                     per_sequence=True)
    save_pretrained(params, config, base_dir, tokenizer=tokenizer)
  tokenizer = AutoTokenizer.from_pretrained(base_dir)
  config, params = load_pretrained(base_dir)
  return Testbed(spec, root, world, tokenizer, config, params, base_dir, world_dir)


def align_pairs(world: World) -> list[tuple[str, str]]:
  """D_align (cast.md 4.1): WildJailbreak-schema rows -> (prompt, refusal or helpful answer)."""
  records = data.load_wildjailbreak(list(world.files["wildjailbreak/train.jsonl"]))
  return [(r.prompt, r.completion) for r in records]


def aligned_testbed(tb: Testbed, *, progress: bool = True) -> tuple[str, Params]:
  """Full alignment SFT of the base model on D_align, cached at `<root>/aligned`.

  Returns (checkpoint dir, params).
  """
  out = os.path.join(tb.root, "aligned")
  if not os.path.exists(os.path.join(out, "config.json")):
    s = tb.spec
    params, _ = _sft(tb.base_params, tb.config, tb.tokenizer, align_pairs(tb.world),
                     name="align", steps=s.align_steps, batch=s.align_batch, lr=s.align_lr,
                     seed=s.seed + 1, max_len=s.max_len, workdir=os.path.join(tb.root, "align"),
                     progress=progress)
    save_pretrained(params, tb.config, out, tokenizer=tb.tokenizer)
  return out, load_pretrained(out)[1]
