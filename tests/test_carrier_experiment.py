"""launch/carrier_experiment.py end to end as a subprocess on tiny checkpoints: every stage runs,
the tables' numbers equal the stage files' (eraser eval.json, LCDD sparsity.json, read here
independently), the curves are copied, and a rerun skips every finished stage."""

import json
import os
import subprocess
import sys

from tiny_alpaca import write_base_and_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.sft.num_steps=3", "--config.lcdd.num_steps=3", "--config.lcdd_mask.num_steps=2",
    "--config.eraser.num_steps=2",
    "--config.sft.extra=--config.batch_size=4 --config.data.max_len=48 --config.log_every=1 "
    "--config.optimizer.learning_rate=1e-2",
    "--config.lcdd.extra=--config.batch_size=4 --config.log_every=1 --config.data.max_len=48 "
    "--config.multiplier.warmup_steps=2 --config.delta.learning_rate=1e-3",
    "--config.eraser.extra=--config.length=2 --config.batch_size=4 --config.eval_every=2 "
    "--config.log_every=1 --config.selection_prompts=4 --config.max_new_tokens=3 "
    "--config.eval_batch_size=2 --config.tail_k=4"]


def _run(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "launch.carrier_experiment", *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def _json(path):
  with open(path) as f:
    return json.load(f)


def _rows(table):
  return {r["name"]: r for r in table["rows"]}


def test_carrier_experiment_tables_match_stage_files_and_rerun_skips(tmp_path):
  write_base_and_data(str(tmp_path))
  with open(tmp_path / "held.jsonl", "w") as f:
    f.writelines(json.dumps({"instruction": f"name a colour number {i}", "input": "",
                             "output": ""}) + "\n" for i in range(200, 207))
  out = tmp_path / "run"
  args = [f"--base={tmp_path / 'base'}", f"--data={tmp_path / 'data.jsonl'}",
          f"--heldout={tmp_path / 'held.jsonl'}", f"--workdir={out}", *TINY]
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / "config.json").exists() and (out / "tables.md").exists()

  ev = _json(out / "eraser_lcdd" / "eval.json")
  sp = _json(out / "lcdd" / "sparsity.json")
  main = _json(out / "tables" / "main.json")
  rows = _rows(main)
  assert list(rows) == ["Base", "SFT", "LCDD", "LCDD+Trig"]
  for name, row in rows.items():
    src = ev["models"][name.replace("Trig", "Trigger")]
    assert row["fixed_response_rate"] == src["fixed_response_rate"]
    assert row["MMLU analogue"] is None  # no --mmlu
  assert rows["LCDD"]["gate sparsity"] == sp["gate_sparsity"]["overall"]
  assert rows["LCDD"]["dW sparsity"] == sp["delta_sparsity"]["overall"]
  assert rows["LCDD"]["KL(SFT||LCDD)"] == ev["kl"]["SFT||LCDD"]["mean"]
  assert rows["LCDD"]["KL(Base||LCDD)"] == ev["kl"]["Base||LCDD"]["mean"]
  assert rows["LCDD+Trig"]["KL(SFT||Trig)"] == ev["kl"]["SFT||LCDD+Trigger"]["mean"]
  assert rows["LCDD+Trig"]["KL(Base||Trig)"] == ev["kl"]["Base||LCDD+Trigger"]["mean"]

  ev_sft = _json(out / "eraser_sft" / "eval.json")
  st = _rows(_json(out / "tables" / "structure.json"))
  assert st["SFT + trigger"]["KL(Base||Trig)"] == ev_sft["kl"]["Base||SFT+Trigger"]["mean"]
  assert st["SFT + trigger"]["fixed_response_rate after trigger"] == \
      ev_sft["models"]["SFT+Trigger"]["fixed_response_rate"]
  assert st["LCDD + trigger"]["KL(SFT||Trig)"] == ev["kl"]["SFT||LCDD+Trigger"]["mean"]

  ab = _rows(_json(out / "tables" / "ablation.json"))
  sp_mask = _json(out / "lcdd_mask" / "sparsity.json")
  ev_mask = _json(out / "eraser_mask" / "eval.json")
  ev_out = _json(out / "eraser_output_only" / "eval.json")
  assert ab["LCDD mask-only"]["gate sparsity"] == sp_mask["gate_sparsity"]["overall"]
  assert ab["LCDD mask-only"]["KL(Base||Trig)"] == ev_mask["kl"]["Base||LCDD+Trigger"]["mean"]
  out_row = ab["LCDD joint, output-only trigger (no L_MSE)"]
  assert out_row["KL(SFT||Trig)"] == ev_out["kl"]["SFT||LCDD+Trigger"]["mean"]
  # The stages ran what they were told: mask-only froze dW, output-only dropped L_MSE.
  assert _json(out / "lcdd_mask" / "config.json")["mask_only"] is True
  assert _json(out / "eraser_output_only" / "config.json")["use_mse"] is False
  assert _json(out / "eraser_sft" / "config.json")["model_name"] == "SFT"
  for name in ("eraser_lcdd", "eraser_sft", "eraser_mask", "eraser_output_only"):
    assert (out / "tables" / f"{name}_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert "KL(SFT\\|\\|LCDD)" in (out / "tables" / "main.md").read_text()

  stage_files = [out / "sft" / "metrics.json", out / "lcdd" / "summary.json",
                 out / "lcdd_mask" / "summary.json", out / "eraser_lcdd" / "metrics.json"]
  before = [p.stat().st_mtime_ns for p in stage_files]
  again = _run(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert [p.stat().st_mtime_ns for p in stage_files] == before
  assert again.stdout.count("finished earlier, skipped") == 7
  assert _json(out / "tables" / "main.json") == main


def test_carrier_experiment_bad_behaviour_fails_before_writing(tmp_path):
  proc = _run("--behaviour=poetry", f"--workdir={tmp_path / 'bad'}", "--testbed")
  assert proc.returncode == 2 and "behaviour" in proc.stderr
  assert not (tmp_path / "bad").exists()
