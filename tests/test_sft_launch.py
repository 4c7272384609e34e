"""launch/sft.py as a subprocess on a tiny random HF checkpoint with a tokenizer: the artifacts
exist, the exported W_ft loads and differs from the base only where SFT trains, the exported
tokenizer is the base's, and launch/lcdd.py runs on (base, exported W_ft). Bad flags fail in one
line before any file is written."""

import json
import os
import subprocess
import sys

import numpy as np

from cast_jax.models import load_pretrained
from tiny_alpaca import ROWS, write_base_and_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _setup(root):
  write_base_and_data(root)


def _run(module, *args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_launch_sft_exports_w_ft_that_lcdd_accepts(tmp_path):
  _setup(str(tmp_path))
  out = tmp_path / "sft"
  proc = _run("launch.sft", f"--base={tmp_path / 'base'}", f"--data={tmp_path / 'data.jsonl'}",
              "--behaviour=fixed_response", f"--workdir={out}", f"--config.num_steps={STEPS}",
              "--config.batch_size=4", "--config.log_every=1", "--config.data.max_len=48",
              "--config.optimizer.learning_rate=1e-2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "metrics.json", "loss.png", "sft_model/config.json",
               "sft_model/tokenizer.json", "train/metrics.jsonl"):
    assert (out / name).exists(), name
  with open(out / "config.json") as f:
    cfg = json.load(f)
  assert cfg["behaviour"] == "fixed_response" and cfg["optimizer"]["learning_rate"] == 1e-2
  with open(out / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["num_examples"] == len(ROWS) and metrics["num_steps"] == STEPS
  with open(out / "train" / "metrics.jsonl") as f:
    assert [json.loads(ln)["step"] for ln in f] == [1, 2, 3]
  with open(tmp_path / "base" / "tokenizer.json") as a, \
       open(out / "sft_model" / "tokenizer.json") as b:
    assert json.load(a)["model"] == json.load(b)["model"]

  base_config, base = load_pretrained(tmp_path / "base")
  ft_config, ft = load_pretrained(out / "sft_model")
  assert ft_config == base_config
  # Full fine-tuning: every layer matrix moved (Adam at 1e-2 moves every entry with a gradient).
  for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
    assert not np.array_equal(np.asarray(base["layers"][name]), np.asarray(ft["layers"][name]))

  # A re-run resumes the finished run (no new steps) and rewrites the same export.
  again = _run("launch.sft", f"--base={tmp_path / 'base'}", f"--data={tmp_path / 'data.jsonl'}",
               "--behaviour=fixed_response", f"--workdir={out}", f"--config.num_steps={STEPS}",
               "--config.batch_size=4", "--config.log_every=1", "--config.data.max_len=48",
               "--config.optimizer.learning_rate=1e-2")
  assert again.returncode == 0, again.stderr[-3000:]
  with open(out / "train" / "metrics.jsonl") as f:
    assert len(f.readlines()) == STEPS
  _, ft_again = load_pretrained(out / "sft_model")
  for name in ("wq", "w_down", "embed"):
    assert np.array_equal(np.asarray(ft[name] if name == "embed" else ft["layers"][name]),
                          np.asarray(ft_again[name] if name == "embed" else
                                     ft_again["layers"][name]))

  lcdd = _run("launch.lcdd", f"--base={tmp_path / 'base'}", f"--sft={out / 'sft_model'}",
              f"--data={tmp_path / 'data.jsonl'}", f"--workdir={tmp_path / 'lcdd'}",
              "--config.num_steps=2", "--config.batch_size=4", "--config.log_every=1",
              "--config.data.max_len=48", "--config.multiplier.warmup_steps=1")
  assert lcdd.returncode == 0, lcdd.stderr[-3000:]
  with open(tmp_path / "lcdd" / "summary.json") as f:
    assert json.load(f)["final_step"] == 2
  assert (tmp_path / "lcdd" / "lcdd_model" / "config.json").exists()


def test_launch_sft_usage_errors_write_nothing(tmp_path):
  _setup(str(tmp_path))
  cases = [(("--behaviour=jokes",), "--behaviour='jokes'"),
           (("--behaviour=safety", "--config.optimizer.learning_rate=-1"), "learning_rate"),
           (("--behaviour=style", "--config.batch_size=0"), "batch_size"),
           (("--behaviour=style", "--config.data.num_samples=-2"), "num_samples")]
  for extra, needle in cases:
    out = tmp_path / "w"
    proc = _run("launch.sft", f"--base={tmp_path / 'base'}", f"--data={tmp_path / 'data.jsonl'}",
                f"--workdir={out}", *extra)
    assert proc.returncode == 2, (extra, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], (extra, proc.stderr)
    assert not out.exists()
  proc = _run("launch.sft", f"--base={tmp_path / 'nope'}", f"--data={tmp_path / 'data.jsonl'}",
              "--behaviour=style", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2 and "--base=" in proc.stderr and not (tmp_path / "w").exists()
  proc = _run("launch.lcdd", f"--base={tmp_path / 'base'}", f"--sft={tmp_path / 'base'}",
              f"--data={tmp_path / 'data.jsonl'}", f"--workdir={tmp_path / 'w'}",
              "--config.data.behaviour=jokes")
  assert proc.returncode == 2 and "--config.data.behaviour='jokes'" in proc.stderr
  assert not (tmp_path / "w").exists()
