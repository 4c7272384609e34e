"""Builds (or reuses) the testbed: world files, tokenizer, a tiny Llama pretrained from scratch on
the world, and its alignment-SFT counterpart, cached on disk by a hash of everything that decides
their bytes (generator version, seed, sizes, model and training settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
from typing import Any

import jax
from absl import logging

from cast_jax import data
from cast_jax.models import ModelConfig, init_params, load_pretrained, save_pretrained
from cast_jax.models.decoder import Params
from cast_jax.testbed.world import WORLD_VERSION, World, WorldSizes, build_world, write_world
from cast_jax.train import OptimizerConfig
from cast_jax.train.sft import run_sft


# Modules whose code decides the built bytes (tokenizer, world, model, trainer, data order):
# their source is hashed into the cache key, so editing any of them rebuilds instead of reusing
# a stale model.
_KEY_MODULES = ("cast_jax.testbed.build", "cast_jax.testbed.tokenizer", "cast_jax.models.decoder",
                "cast_jax.models.rope", "cast_jax.models.checkpoint", "cast_jax.train.step",
                "cast_jax.train.losses", "cast_jax.train.sft", "cast_jax.train.state",
                "cast_jax.data.batching", "cast_jax.data.chat")


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
  pretrain_steps: int = 1400
  pretrain_batch: int = 32
  pretrain_lr: float = 3e-3
  # Alignment: 3 epochs over D_align's 1,280 rows at a sixth of the pretraining peak lr, an
  # ordinary SFT recipe. cast.md's lr 1e-4 x 1 epoch (tuned for 8B models) left held-out
  # refusal at .09 here: a model this small needs the larger step to learn to refuse.
  align_steps: int = 240
  align_batch: int = 16
  align_lr: float = 5e-4
  # Recipe shared by both stages: linear warmup over this fraction of the steps, cosine decay
  # to end_lr_ratio * lr, AdamW weight decay on matrices only, padded length buckets.
  warmup_fraction: float = 1 / 12
  weight_decay: float = 0.01
  end_lr_ratio: float = 0.05
  buckets: tuple[int, ...] = (64, 96)

  def validate(self) -> None:
    """Raises ValueError naming the first bad field (before anything is written)."""
    positive = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "max_len", "pretrain_steps", "pretrain_batch", "align_steps", "align_batch")
    for name in positive:
      if int(getattr(self, name)) < 1:
        raise ValueError(f"TestbedSpec.{name}={getattr(self, name)!r}: use an integer >= 1.")
    if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(f"TestbedSpec: hidden_size={self.hidden_size} must divide by num_heads="
                       f"{self.num_heads}, and num_heads by num_kv_heads={self.num_kv_heads}.")
    if not self.buckets or max(self.buckets) != self.max_len:
      raise ValueError(f"TestbedSpec.buckets={self.buckets!r} must end at max_len={self.max_len}.")

  def key(self) -> str:
    """Cache key over the spec, the world and recipe code, and the jax build.

    The build runs at "highest" matmul precision on one device whatever the caller's settings
    (`build_testbed`), so those are not part of the key.
    """
    blob = json.dumps({"world": WORLD_VERSION, "spec": dataclasses.asdict(self),
                       "code": _code_digest(), "jax": jax.__version__,
                       "jaxlib": jax.lib.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _code_digest() -> str:
  h = hashlib.sha256()
  for name in _KEY_MODULES:
    h.update(inspect.getsource(importlib.import_module(name)).encode())
  return h.hexdigest()


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


def _sft(params, config, tokenizer, pairs, *, spec, name, steps, batch, lr, seed, workdir,
         progress, per_sequence=False):
  examples = data.encode_dataset(tokenizer, pairs, max_len=spec.max_len, name=name)
  opt = OptimizerConfig(learning_rate=lr, warmup_steps=max(1, int(steps * spec.warmup_fraction)),
                        total_steps=steps, weight_decay=spec.weight_decay,
                        end_lr_ratio=spec.end_lr_ratio)
  # Pinned precision: pytest sets "highest" globally, a launch run does not; both must build the
  # same bytes under the same key.
  with jax.default_matmul_precision("highest"):
    params, summary = run_sft(params, config, examples, pad_id=tokenizer.pad_token_id,
                              num_steps=steps, batch_size=batch, seed=seed, optimizer=opt,
                              workdir=workdir, buckets=spec.buckets, progress=progress,
                              per_sequence=per_sequence)
  logging.info("%s: %d steps, final loss %.4f", name, steps, summary["loss"])
  return params, summary


def _canonical_process() -> bool:
  """Whether this process computes the canonical testbed bytes: XLA:CPU with one device.

  XLA:CPU sums in a different order when it is told to simulate several devices (pytest's 8),
  so the same key would name different bytes; every other process builds in a subprocess.
  """
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def _run_stage(stage: str, spec: TestbedSpec, root: str, progress: bool) -> None:
  """Runs a training stage ("base" / "aligned") here if canonical, else in a canonical child."""
  if _canonical_process():
    _STAGES[stage](spec, root, progress)
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  cmd = [sys.executable, "-m", "cast_jax.testbed.build", stage, root,
         json.dumps(dataclasses.asdict(spec)), str(int(progress))]
  result = subprocess.run(cmd, env=env, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"building the testbed stage {stage!r} under {root} failed in a child "
                       f"process (exit {result.returncode}); its error is printed above.")


def _train_base(spec: TestbedSpec, root: str, progress: bool) -> None:
  from cast_jax.testbed.tokenizer import build_tokenizer

  world = build_world(spec.seed, spec.sizes)
  tokenizer = build_tokenizer(world)
  config = model_config(spec, tokenizer)
  params = init_params(config, jax.random.PRNGKey(spec.seed), std=spec.init_std)
  pairs = [(r["prompt"], r["response"]) for r in world.files["base/train.jsonl"]]
  params, _ = _sft(params, config, tokenizer, pairs, spec=spec, name="pretrain",
                   steps=spec.pretrain_steps, batch=spec.pretrain_batch, lr=spec.pretrain_lr,
                   seed=spec.seed, workdir=os.path.join(root, "pretrain"), progress=progress,
                   # Loss on responses, averaged per example: a one-token MCQ letter weighs as
                   # much as a 40-token solution.
                   per_sequence=True)
  save_pretrained(params, config, os.path.join(root, "base"), tokenizer=tokenizer)


def _train_aligned(spec: TestbedSpec, root: str, progress: bool) -> None:
  from transformers import AutoTokenizer

  base_dir = os.path.join(root, "base")
  tokenizer = AutoTokenizer.from_pretrained(base_dir)
  config, params = load_pretrained(base_dir)
  world = build_world(spec.seed, spec.sizes)
  params, _ = _sft(params, config, tokenizer, align_pairs(world), spec=spec, name="align",
                   steps=spec.align_steps, batch=spec.align_batch, lr=spec.align_lr,
                   seed=spec.seed + 1, workdir=os.path.join(root, "align"), progress=progress)
  save_pretrained(params, config, os.path.join(root, "aligned"), tokenizer=tokenizer)


_STAGES = {"base": _train_base, "aligned": _train_aligned}


def build_testbed(spec: TestbedSpec = TestbedSpec(), cache_dir: str | None = None, *,
                  progress: bool = True) -> Testbed:
  """Returns the testbed for `spec`, building and caching it first if needed.

  Layout under `<cache_dir>/testbed-<spec.key()>/`: world/ (JSONL files + MANIFEST.json),
  base/ (HF checkpoint + tokenizer), pretrain/ (metrics.jsonl, orbax checkpoints for resume).
  Every artifact appears atomically, so an interrupted build resumes or restarts cleanly.
  Training always runs on XLA:CPU with one device (in a child process if this one differs),
  so a key names the same bytes in a launch run, under pytest and on an accelerator host.
  """
  from transformers import AutoTokenizer

  spec.validate()
  root = os.path.join(cache_dir or default_cache_dir(), f"testbed-{spec.key()}")
  world = build_world(spec.seed, spec.sizes)
  world_dir = os.path.join(root, "world")
  if not os.path.exists(os.path.join(world_dir, "MANIFEST.json")):
    write_world(world, world_dir)
  base_dir = os.path.join(root, "base")
  if not os.path.exists(os.path.join(base_dir, "config.json")):
    _run_stage("base", spec, root, progress)
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
    _run_stage("aligned", tb.spec, tb.root, progress)
  return out, load_pretrained(out)[1]


def spec_from_dict(d: dict) -> TestbedSpec:
  """Inverse of `dataclasses.asdict(spec)` (JSON turns the tuples into lists)."""
  return TestbedSpec(**{**d, "sizes": WorldSizes(**d["sizes"]), "buckets": tuple(d["buckets"])})


if __name__ == "__main__":  # the canonical child of `_run_stage`: stage, root, spec JSON, progress
  _stage, _root, _spec, _progress = sys.argv[1:5]
  _STAGES[_stage](spec_from_dict(json.loads(_spec)), _root, bool(int(_progress)))
