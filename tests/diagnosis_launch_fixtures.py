"""The tiny launch/diagnose.py setup the diagnosis launch tests share: a random HF Llama with
the testbed tokenizer, small calibration files, and one uninterrupted run, made once per test
session (tests/conftest.py registers the fixtures) instead of once per test module."""

import json
import os
import subprocess
import sys

import pytest

from cast_jax.testbed import build_tokenizer, build_world
from hf_models import make_hf_model, save_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the tests' 8 simulated devices are not the launch default
  return subprocess.run([sys.executable, "-m", "launch.diagnose", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def diag_files(tmp_path_factory):
  """A tiny random Llama with the testbed tokenizer, and 8-row D_safe / D_util JSONL files."""
  root = tmp_path_factory.mktemp("diagnose")
  world = build_world(0)
  tok = build_tokenizer(world)
  save_hf(make_hf_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id),
          root / "model")
  tok.save_pretrained(root / "model")
  for name in ("d_safe", "d_util"):
    rows = world.files[f"calib/{name}.jsonl"][:8]
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  rows = world.files["gsm8k/test.jsonl"][:8]  # reasoning D_util (GSM8K schema)
  (root / "d_gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "prefixes.txt").write_text("# GCG-style\nI'm sorry\n\nI cannot\n")
  (root / "no_prefixes.txt").write_text("# nothing but a comment\n\n")
  return root


def _args(workdir, *extra):
  # The short flags and --config.<field> overrides, both.
  return [f"--workdir={workdir}", "--model=model", "--safe_data=d_safe.jsonl",
          "--util_data=d_util.jsonl", "--n_safe=4", "--config.n_util=6", "--gen_len=4",
          "--config.batch_size=4", "--buckets=4", *extra]


def _stage_lines(stdout):
  return [line for line in stdout.splitlines() if "stage " in line and ": " in line]


@pytest.fixture(scope="session")
def diag_first(diag_files):
  """An uninterrupted run into diag_files/wd."""
  got = _launch(*_args("wd"), cwd=diag_files)
  assert got.returncode == 0, got.stderr[-3000:]
  return got
