"""launch/lcdd.py end to end as a subprocess on two tiny random HF checkpoints (base and a
perturbed "SFT") and a tiny Alpaca-schema JSONL: the workdir artifacts exist, and the reported
sparsity equals recounts from the saved carrier (gates) and from the exported merged model
(the dW entries that actually differ from the base)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from carrier_jax.delta import GATED_WEIGHTS, merge_carrier
from carrier_jax.outputs import load_carrier
from cast_jax.models import load_pretrained, save_pretrained
from cast_jax.train import tree_equal
from tiny_alpaca import write_base_and_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _checkpoints(root):
  tok, config, base = write_base_and_data(root)
  # The "SFT" model moves only the layer matrices, as an SFT with frozen embeddings / norms.
  keys = jax.random.split(jax.random.PRNGKey(1), len(GATED_WEIGHTS))
  layers = dict(base["layers"])
  for k, name in zip(keys, GATED_WEIGHTS):
    layers[name] = layers[name] + 0.1 * jax.random.normal(k, layers[name].shape)
  save_pretrained({**base, "layers": layers}, config, os.path.join(root, "sft"), tokenizer=tok)


def test_launch_lcdd_writes_consistent_artifacts(tmp_path):
  _checkpoints(str(tmp_path))
  out = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "launch.lcdd", f"--base={tmp_path / 'base'}",
       f"--sft={tmp_path / 'sft'}", f"--data={tmp_path / 'data.jsonl'}", f"--workdir={out}",
       f"--config.num_steps={STEPS}", "--config.batch_size=4", "--config.log_every=1",
       "--config.data.max_len=48", "--config.multiplier.warmup_steps=2",
       "--config.data.fixed_response=I don't know.", "--config.delta.learning_rate=1e-3"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "summary.json", "active_channels.json", "sparsity.json",
               "sparsity_per_layer.png", "controller_curves.png", "lcdd_model/config.json",
               "train/metrics.jsonl"):
    assert (out / name).exists(), name
  with open(out / "summary.json") as f:
    assert json.load(f)["final_step"] == STEPS
  with open(out / "sparsity.json") as f:
    report = json.load(f)
  carrier, controller = load_carrier(out / "carrier")
  assert report["controller"]["lam"] == float(controller["lam"])
  assert int(controller["updates"]) == STEPS

  gates = [np.asarray(t) for t in carrier["gates"].values()]
  off = sum(int((t <= 0).sum()) for t in gates) / sum(t.size for t in gates)
  np.testing.assert_allclose(report["gate_sparsity"]["overall"], off, rtol=1e-12)

  _, base = load_pretrained(tmp_path / "base")
  _, merged = load_pretrained(out / "lcdd_model")
  assert tree_equal(jax.tree.map(np.asarray, merged),
                    jax.tree.map(np.asarray, merge_carrier(base, carrier)))
  L = 2
  changed = sum((np.asarray(merged["layers"][n]) != np.asarray(base["layers"][n]))
                .reshape(L, -1).sum(1) for n in GATED_WEIGHTS)
  total = sum(np.asarray(base["layers"][n]).reshape(L, -1).shape[1] for n in GATED_WEIGHTS)
  np.testing.assert_allclose(report["delta_sparsity"]["per_layer"], 1 - changed / total,
                             rtol=1e-12)
  with open(out / "train" / "metrics.jsonl") as f:
    rows = [json.loads(ln) for ln in f]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert rows[-1]["extra/multiplier/lam"] == report["controller"]["lam"]


def test_launch_lcdd_kl_cached_sharded_with_one_stop_rule(tmp_path):
  """The new options end to end on 8 simulated devices (data 4 x model 2): KL to a cached
  teacher, the stall rule alone (window 1, ratio 1: the second post-warmup row stalls), the
  breach rule switched off (the KL starts near 0, so its baseline is tiny and it would fire)."""
  _checkpoints(str(tmp_path))
  out = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.lcdd", f"--base={tmp_path / 'base'}",
       f"--sft={tmp_path / 'sft'}", f"--data={tmp_path / 'data.jsonl'}", f"--workdir={out}",
       f"--config.num_steps={STEPS}", "--config.batch_size=4", "--config.log_every=1",
       "--config.data.max_len=48", "--config.multiplier.warmup_steps=1",
       "--config.task_loss=kl", "--config.teacher=cached", "--config.teacher_top_k=8",
       "--config.shard=True", "--config.mesh_model=2", "--config.stop.window=1",
       "--config.stop.patience=1", "--config.stop.stall_ratio=1.0", "--config.stop.arm_ratio=0",
       "--config.stop.breach_enabled=False", "--config.delta.learning_rate=1e-3"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "summary.json") as f:
    summary = json.load(f)
  assert summary["final_step"] == 2 and summary["stop_reason"].startswith("sparsity_stall")
  assert "budget_breach" not in summary["stop_reason"]
  with open(out / "config.json") as f:
    assert "kl" in f.read()
  with open(out / "train" / "metrics.jsonl") as f:
    rows = [json.loads(ln) for ln in f]
  # The controller tracks the KL (logged as task_loss), the CE is logged beside it.
  assert all("ce" in r and r["task_loss"] >= 0 for r in rows)
  assert rows[0]["extra/multiplier/ema"] == rows[0]["task_loss"]
