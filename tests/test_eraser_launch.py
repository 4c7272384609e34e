"""launch/eraser.py as a subprocess on tiny checkpoints: the trigger, its meta, the curves, the
metrics and the Base / SFT / LCDD / LCDD+Trigger evaluation land in the workdir; bad flags
fail in one line before anything is written."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from carrier_jax.delta import init_carrier
from carrier_jax.evaluation import mcq_accuracy
from carrier_jax.outputs import save_carrier
from carrier_jax.trigger import triggered
from cast_jax import data
from cast_jax.eval import EvalModel
from cast_jax.models import init_params, save_pretrained
from tiny_alpaca import write_base_and_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "launch.eraser", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def test_launch_eraser_on_tiny_checkpoints(tmp_path):
  tok, config, base = write_base_and_data(str(tmp_path))
  sft = init_params(config, jax.random.PRNGKey(1), std=0.2)
  save_pretrained(sft, config, str(tmp_path / "sft"), tokenizer=tok)
  carrier = init_carrier(config, base, sft, jax.random.PRNGKey(2))
  save_carrier(tmp_path / "lcdd" / "carrier", carrier, {"lam": 0.0})
  rows = lambda lo, hi: [{"instruction": f"name a colour number {i}", "input": "", "output": ""}
                         for i in range(lo, hi)]
  train = _write_jsonl(tmp_path / "train.jsonl", rows(100, 112))
  held = _write_jsonl(tmp_path / "held.jsonl", rows(200, 207))
  mmlu = _write_jsonl(tmp_path / "mmlu.jsonl", [
      {"question": f"name a colour {i}", "choices": ["red", "blue", "red 1", "blue 2"],
       "answer": i % 4} for i in range(6)])
  out = tmp_path / "run"
  args = [f"--base={tmp_path / 'base'}", f"--model={tmp_path / 'sft'}",
          f"--carrier={tmp_path / 'lcdd'}", f"--data={train}", f"--heldout={held}",
          f"--sft={tmp_path / 'sft'}", "--config.length=2", "--config.batch_size=4",
          "--config.num_steps=6", "--config.eval_every=3", "--config.log_every=2",
          "--config.selection_prompts=4", "--config.max_new_tokens=3",
          "--config.eval_batch_size=2", "--config.tail_k=4", "--config.hard.enabled=True",
          "--config.hard.num_steps=2", "--config.hard.num_candidates=4", "--config.hard.top_k=4",
          "--config.hard.batch_size=4", "--config.hard.eval_every=1", f"--mmlu={mmlu}",
          "--config.mcq_limit=5"]
  proc = _run(*args, f"--workdir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  trig = np.load(out / "trigger.npy")
  assert trig.shape == (2, config.hidden_size)
  assert (np.linalg.norm(trig, axis=-1) <= 1.0 + 1e-5).all()
  meta = json.loads((out / "trigger.json").read_text())
  assert meta["best_step"] in (0, 3, 6) and meta["channels"].endswith("carrier")
  assert meta["channel_counts"]["attn_write"] == \
      (np.asarray(carrier["gates"]["attn_write"]) > 0).sum(1).tolist()
  curves = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]
  assert [r["step"] for r in curves if r["split"] == "heldout"] == [0, 3, 6]
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  metrics = json.loads((out / "metrics.json").read_text())
  ev = metrics["eval"]
  assert set(ev["models"]) == {"Base", "SFT", "LCDD", "LCDD+Trigger", "LCDD+HardTrigger"}
  assert ev["num_prompts"] == 3  # 7 held-out prompts minus the 4 that selected the trigger
  assert set(ev["kl"]) == {"SFT||LCDD", "SFT||LCDD+Trigger", "Base||LCDD", "Base||LCDD+Trigger",
                           "SFT||LCDD+HardTrigger", "Base||LCDD+HardTrigger"}
  # The MMLU-analogue column, the triggered row included: the library's own triggered MCQ scorer
  # (tested against HF in test_trigger) on the saved trigger, 5 of the 6 items.
  mcq = data.load_mmlu(mmlu)[:5]
  plain = EvalModel(sft, config)
  want = {"SFT": mcq_accuracy(plain, tok, mcq), "LCDD": mcq_accuracy(plain, tok, mcq),
          "LCDD+Trigger": mcq_accuracy(triggered(plain, jnp.asarray(trig), "after_bos",
                                                 tok.bos_token_id), tok, mcq)}
  assert ev["num_mcq"] == 5
  for name, acc in want.items():
    assert ev["models"][name]["mmlu"] == acc
  hard = json.loads((out / "hard_trigger.json").read_text())
  assert len(hard["token_ids"]) == 2 and hard["text_vs_rows_max_logit_diff"] < 1e-4
  assert (out / "hard_curves.png").read_bytes()[:4] == b"\x89PNG"
  # --model is the SFT checkpoint here: KL(SFT||LCDD) is 0, the trigger moves it off 0.
  assert abs(ev["kl"]["SFT||LCDD"]["mean"]) < 1e-6 and ev["kl"]["SFT||LCDD+Trigger"]["mean"] > 0
  assert "| LCDD+Trigger |" in (out / "eval.md").read_text()
  assert (out / "config.json").exists()

  bad = _run(*args, "--config.align=middle", f"--workdir={tmp_path / 'bad'}")
  assert bad.returncode == 2 and "align" in bad.stderr and not (tmp_path / "bad").exists()
  no_sft = [a for a in args if not a.startswith("--sft=")]
  bad = _run(*no_sft, f"--workdir={tmp_path / 'bad'}")
  assert bad.returncode == 2 and "--mmlu" in bad.stderr and not (tmp_path / "bad").exists()
