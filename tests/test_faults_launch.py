"""Fault table (issue 13), launch scripts run as subprocesses: bad flags fail in one line before
any side effect; a good run keeps the console quiet and writes readable files."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's smoke mode (a random checkpoint) with a one-layer model and a few tokens: seconds.
SMOKE = f"--config={os.path.join(REPO, 'configs', 'demo.py')}:smoke"
TINY = ["--config.model.num_layers=1", "--config.batch_size=2", "--config.prompt_len=4",
        "--config.max_new_tokens=3"]


def _launch(script, *args, cwd, env=None):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **(env or {}))
  env.pop("XLA_FLAGS", None)  # the tests' 8 simulated devices are not the launch default
  return subprocess.run([sys.executable, "-m", f"launch.{script}", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_line_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in result.stderr, lines
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture
def cwd(tmp_path):
  """The launch's current directory, holding a user file that must survive."""
  d = tmp_path / "cwd"
  d.mkdir()
  (d / "NOTES.md").write_text("mine")
  return d


def _untouched(cwd):
  assert sorted(os.listdir(cwd)) == ["NOTES.md"] and (cwd / "NOTES.md").read_text() == "mine"


@pytest.mark.parametrize("workdir, needle", [("", "--workdir is empty"),
                                             (".", "current directory"),
                                             ("NOTES.md", "is a file")])
def test_bad_workdir_is_refused_before_writing(cwd, workdir, needle):
  _one_line_error(_launch("demo", SMOKE, f"--workdir={workdir}", cwd=cwd), needle)
  _untouched(cwd)


def test_missing_workdir_flag(cwd):
  _one_line_error(_launch("demo", SMOKE, cwd=cwd), "--workdir")
  _untouched(cwd)


@pytest.mark.parametrize("flag, needles", [
    ("--config.nonexistent=1", ("unknown config key 'nonexistent'", "--config.nonexistent")),
    ("--config.batch_siz=2", ("'batch_siz'", "did you mean 'batch_size'")),
    ("--config.model.foo=2", ("unknown config key 'foo'", "--config.model.foo")),
    ("--config.batch_size=abc", ("--config.batch_size=abc",)),
    ("--nope=1", ("Unknown command line flag 'nope'",)),
])
def test_unknown_or_malformed_flags_are_one_line(cwd, flag, needles):
  _one_line_error(_launch("demo", SMOKE, "--workdir=out", flag, cwd=cwd), *needles)
  _untouched(cwd)


@pytest.mark.parametrize("flag, needle", [
    ("--config.batch_size=0", "--config.batch_size=0: use an integer >= 1"),
    ("--config.max_new_tokens=-1", "--config.max_new_tokens=-1"),
    ("--config.model.num_kv_heads=3", "num_key_value_heads=3"),
    ("--config.model.vocab_size=3", "--config.model.vocab_size=3"),
])
def test_demo_config_values_are_checked_before_any_side_effect(cwd, flag, needle):
  _one_line_error(_launch("demo", SMOKE, "--workdir=out", flag, cwd=cwd), needle)
  _untouched(cwd)


def test_testbed_spec_is_checked_before_the_world_is_cached(cwd, tmp_path):
  cache = tmp_path / "cache"
  result = _launch("testbed", "--workdir=out", f"--config.cache_dir={cache}",
                   "--config.spec.num_kv_heads=3", cwd=cwd, env={"CAST_JAX_CACHE": str(cache)})
  _one_line_error(result, "--config.spec", "num_kv_heads=3")
  assert not cache.exists()
  _untouched(cwd)


def test_demo_console_is_quiet_and_files_are_readable(cwd):
  result = _launch("demo", SMOKE, "--workdir=out", *TINY, cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  # No library INFO chatter (absl format "I1125 16:03:25..." or python "INFO:"), no warnings.
  assert not re.search(r"^(I\d{4} |INFO:|W\d{4} )", result.stderr, re.M), result.stderr[-3000:]
  stages = [ln for ln in result.stdout.splitlines() if re.match(r"^\[ *\d+\.\ds\] ", ln)]
  assert len(stages) == 4 and "round trip" in stages[0] and "wrote" in stages[-1], stages
  assert "KL(full || one head ablated)" in result.stdout
  out = cwd / "out"
  assert sorted(os.listdir(out)) == ["config.json", "head_ablation.png", "metrics.json"]
  mask = os.umask(0)
  os.umask(mask)
  for name in os.listdir(out):
    assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~mask, name
  assert json.loads((out / "config.json").read_text())["model"]["num_layers"] == 1


@pytest.mark.slow
def test_verbosity_flag_brings_library_logs_back(cwd):
  result = _launch("demo", SMOKE, "--workdir=out", "-v", "0", *TINY, cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r"^I\d{4} .*round-tripped a random llama checkpoint", result.stderr, re.M)
