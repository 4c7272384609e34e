"""Test-wide setup: 8 simulated CPU devices (for the sharding tests) and float32 matmuls.

XLA reads its flags once, at backend start, so they are set before anything imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Identical programs (e.g. the same tiny model's train step in several tests) compile once.
_CACHE = os.environ.get("CAST_JAX_CACHE",
                        os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache"))
jax.config.update("jax_compilation_cache_dir", os.path.join(_CACHE, "jax_compilation"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Session fixtures of the diagnosis launch tests (one tiny launch run shared by three modules).
from diagnosis_launch_fixtures import diag_files, diag_first  # noqa: E402,F401


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops this module's compiled programs when it ends. A whole-suite process that kept every
  program aborted inside a later XLA:CPU compile (twice, at ~75 % of the suite; suspected: the
  kernel's limit on memory mappings, vm.max_map_count, since XLA:CPU maps each executable's
  code). The persistent compilation cache above makes a program another module shares cheap."""
  yield
  jax.clear_caches()
