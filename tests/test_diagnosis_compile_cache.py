"""`diagnosis.compile_cache`: a second process loads the first one's compiled program from the
folder instead of compiling it (JAX's own cache-hit event is the independent witness)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cast_jax.diagnosis.compile_cache import enable_compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROGRAM = """
import sys, jax, jax.numpy as jnp
from cast_jax.diagnosis.compile_cache import enable_compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else 0)
print(enable_compile_cache(sys.argv[1]))
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)
print(float(f(jnp.ones((8, 8)))), len(hits))
"""


def _run(folder):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  got = subprocess.run([sys.executable, "-c", _PROGRAM, str(folder)], env=env,
                       capture_output=True, text=True, timeout=120)
  assert got.returncode == 0, got.stderr[-2000:]
  return got.stdout.split("\n")


def test_second_process_loads_the_program_from_the_folder(tmp_path):
  folder = tmp_path / "xla"
  first = _run(folder)
  assert first[0] == str(folder) and os.listdir(folder)  # created and filled
  value, hits = first[1].split()
  assert float(value) == pytest.approx(3 * 64 * np.tanh(8.0)) and hits == "0"
  second = _run(folder)
  assert second[1].split()[0] == value and int(second[1].split()[1]) >= 1


def test_off_and_bad_paths(tmp_path):
  assert enable_compile_cache("") is None and enable_compile_cache(None) is None
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    enable_compile_cache(str(tmp_path / "file"))
