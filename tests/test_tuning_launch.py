"""launch/sparse_tune.py and launch/cast_experiment.py end to end on a tiny random Llama over the
testbed vocabulary (subprocesses): outputs, tables recomputed from the per-run eval.json files
with numpy / scipy, restart skipping finished runs, and one-line errors for bad flags."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy import stats

from cast_jax.diagnosis import report, scores
from cast_jax.testbed import build_tokenizer, build_world
from hf_models import make_hf_model, save_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("mmlu", "csqa", "gsm8k", "refusal_vanilla", "refusal_adversarial", "over_refusal")
L, H, M = 3, 4, 2  # hf_models' llama case; M buckets
SEEDS = (1, 2)
# Tiny and fast: rank-4 LoRA, a few steps at a large lr (so runs differ), 4 items per metric.
TINY = ["--config.lora.rank=4", "--config.lora.alpha=8", "--config.recipe.max_len=128",
        "--config.recipe.num_steps=4", "--config.recipe.learning_rate=0.5",
        "--config.eval.limit=4", "--config.eval.max_new_tokens=8"]


def _launch(module, *args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(
                 os.environ.get("CAST_JAX_CACHE", os.path.join(REPO, ".cache")),
                 "jax_compilation"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  env.pop("XLA_FLAGS", None)  # the tests' 8 simulated devices are not the launch default
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def _write(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Tiny model + tokenizer, a 16-row D_align, an eval dir of a few items per metric, D_util,
  and a conflict map with random O / H_gen / H_safe (M = 2)."""
  root = tmp_path_factory.mktemp("tune")
  world = build_world(0)
  tok = build_tokenizer(world)
  save_hf(make_hf_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id),
          root / "model")
  tok.save_pretrained(root / "model")
  f = world.files
  _write(root / "align.jsonl", f["wildjailbreak/train.jsonl"][::80])
  by_type = {}
  for r in f["wildjailbreak/eval.jsonl"]:
    by_type.setdefault(r["data_type"], []).append(r)
  _write(root / "eval" / "wildjailbreak" / "eval.jsonl", [r for v in by_type.values()
                                                          for r in v[:3]])
  for name, rel in (("mmlu", "mmlu/test.jsonl"), ("csqa", "csqa/validation.jsonl"),
                    ("gsm8k", "gsm8k/test.jsonl")):
    _write(root / "eval" / rel, f[rel][:4])
  _write(root / "d_safe.jsonl", f["calib/d_safe.jsonl"][:8])
  _write(root / "d_util.jsonl", f["calib/d_util.jsonl"][:8])
  rng = np.random.RandomState(0)
  sc = scores.score_heads(rng.rand(L, H), rng.rand(L, H), rng.rand(L, H), m=M)
  rec = report.conflict_map(sc, rng.rand(L, H), rng.rand(L, H), rng.rand(L, H),
                            base_accuracy=0.5, base_refusal_rate=0.0, num_buckets=M,
                            model={"name": "tiny"}, calibration={})
  (root / "diag").mkdir()
  (root / "diag" / "conflict_map.json").write_text(json.dumps(rec))
  return root


def _exp_args(workdir, *extra):
  return [f"--workdir={workdir}", "--model=model", "--align_data=align.jsonl",
          "--eval_data=eval", "--safe_data=d_safe.jsonl", "--util_data=d_util.jsonl",
          "--diagnosis=diag", f"--config.seeds={','.join(map(str, SEEDS))}",
          f"--config.num_buckets={M}", "--config.rankings=c,o", "--config.fractions=25",
          "--config.pcgrad_runs=safe", "--config.drift.checkpoints=0", *TINY, *extra]


@pytest.fixture(scope="module")
def experiment(files):
  got = _launch("cast_experiment", *_exp_args("exp"), cwd=files)
  assert got.returncode == 0, got.stderr[-3000:]
  return files / "exp"


def _eval(exp, seed, name):
  alias = json.loads((exp / "runs" / f"seed{seed}" / "aliases.json").read_text())
  return json.loads((exp / "runs" / f"seed{seed}" / alias[name] / "eval.json").read_text())


def _row(run, base):
  """Percent metrics, Avg Gen / Avg Safe and Eq. 7-8 costs, by hand."""
  p = {k: 100 * run[k] for k in KEYS}
  p["avg_gen"] = (p["mmlu"] + p["csqa"] + p["gsm8k"]) / 3
  p["avg_safe"] = (p["refusal_vanilla"] + p["refusal_adversarial"]) / 2
  b_gen = 100 * (base["mmlu"] + base["csqa"] + base["gsm8k"]) / 3
  b_safe = 100 * (base["refusal_vanilla"] + base["refusal_adversarial"]) / 2
  gain = p["avg_safe"] - b_safe
  undefined = gain < 1.0  # experiment.MIN_SAFETY_GAIN: no measurable safety gain to price
  p["ucr"] = np.nan if undefined else max(0.0, (b_gen - p["avg_gen"]) / (gain + 1e-8))
  p["mmlu_cr"] = np.nan if undefined else max(0.0, (100 * base["mmlu"] - p["mmlu"])
                                              / (gain + 1e-8))
  return p


def test_experiment_tables_equal_a_recomputation_from_the_run_evals(files, experiment):
  exp = experiment
  for name in ("tables.md", "pareto.png", "correlation_ucr.png", "correlation_mmlu_cr.png",
               "summary.json", "config.json"):
    assert (exp / name).is_file(), name
  for t in ("sft", "pcgrad", "buckets", "correlations", "sparsity"):
    assert (exp / "tables" / f"{t}.md").is_file() and (exp / "tables" / f"{t}.json").is_file()
  base = json.loads((exp / "runs" / "base" / "eval.json").read_text())
  for t in ("sft", "pcgrad", "sparsity", "buckets"):
    table = json.loads((exp / "tables" / f"{t}.json").read_text())
    assert table["seeds"] == list(SEEDS)
    for row in table["rows"]:
      per_seed = [_row(base if row["run"] == "base" else _eval(exp, s, row["run"]), base)
                  for s in SEEDS]
      for k in table["columns"]:
        if k == "avg_score":
          continue
        want = [r[k] for r in per_seed if not np.isnan(r[k])]  # over the seeds it is defined
        tol = dict(rel=1e-9, abs=1e-9)
        cell = row["cells"][k]
        assert cell["n"] == len(want), (t, row, k)
        assert cell["mean"] == (pytest.approx(np.mean(want), **tol) if want else None), (t, row, k)
        assert cell["std"] == (pytest.approx(np.std(want, ddof=1), **tol) if len(want) > 1
                               else None)
  sft = json.loads((exp / "tables" / "sft.json").read_text())
  # The check means something only if the runs differ (lr 0.5 moves the tiny model's answers).
  assert len({r["cells"]["avg_gen"]["mean"] for r in sft["rows"]}) > 1
  assert [r["run"] for r in sft["rows"]] == ["base", "full", "random", "c_b1", "c_b2"]
  pcg = json.loads((exp / "tables" / "pcgrad.json").read_text())
  assert [r["run"] for r in pcg["rows"]] == ["base", "pcg_safe"]
  # Table 8 vs scipy, from the map's C / O and the bucket runs' evals.
  heads = json.loads((files / "diag" / "conflict_map.json").read_text())["heads"]
  corr = json.loads((exp / "tables" / "correlations.json").read_text())
  for row in corr["rows"]:
    score = np.asarray(heads[row["ranking"]]).reshape(-1)
    order = np.argsort(-score, kind="stable")
    x = [score[order[:6]].mean(), score[order[6:]].mean()]
    for cost in ("ucr", "mmlu_cr"):
      ys = [[_row(_eval(exp, s, f"{row['ranking']}_b{b}"), base)[cost] for b in (1, 2)]
            for s in SEEDS]
      # r needs 3 buckets with a defined cost; with M = 2 it is never defined.
      assert np.shape(ys) == (len(SEEDS), 2) and len(x) == 2
      assert row["cells"][f"pearson_{cost}"]["mean"] is None
  # The runs' head sets: buckets of C, budget-matched random, each its own LoRA run.
  c = np.asarray(heads["c"])
  run = json.loads((exp / "runs" / "seed1" / "c_b2" / "run.json").read_text())
  assert sorted(run["heads"]) == sorted(np.argsort(-c.reshape(-1), kind="stable")[6:].tolist())
  assert json.loads((exp / "runs" / "seed2" / "random" / "run.json").read_text())[
      "num_heads"] == 6
  assert (exp / "runs" / "seed1" / "c_b1" / "adapter" / "adapter_model.safetensors").is_file()


def test_restart_skips_finished_runs_and_redoes_an_unfinished_one(files, experiment):
  exp = experiment
  tables = (exp / "tables.md").read_text()
  n = json.loads((exp / "summary.json").read_text())["runs_trained_this_run"]
  distinct = sum(len(set(json.loads((exp / "runs" / f"seed{s}" / "aliases.json").read_text())
                         .values())) for s in SEEDS)
  assert n == distinct >= 2 * 8  # full, random, c_b*, o_b*, top25, bottom25, pcg_safe per seed
  again = _launch("cast_experiment", *_exp_args("exp"), cwd=files)
  assert again.returncode == 0, again.stderr[-3000:]
  summary = json.loads((exp / "summary.json").read_text())
  assert (summary["runs_trained_this_run"], summary["runs_skipped"]) == (0, n)
  assert (exp / "tables.md").read_text() == tables
  # A run killed after training but before its done marker: only it runs again (training
  # resumes from its final checkpoint, so the result is the same).
  (exp / "runs" / "seed2" / "c_b1" / "done.json").unlink()
  again = _launch("cast_experiment", *_exp_args("exp"), cwd=files)
  assert again.returncode == 0, again.stderr[-3000:]
  summary = json.loads((exp / "summary.json").read_text())
  assert (summary["runs_trained_this_run"], summary["runs_skipped"]) == (1, n - 1)
  assert (exp / "tables.md").read_text() == tables
  # Other settings in the same workdir are refused, naming the field.
  other = _launch("cast_experiment", *_exp_args("exp", "--config.recipe.num_steps=5"),
                  cwd=files)
  assert other.returncode != 0 and "recipe" in other.stderr


def test_sparse_tune_changes_only_the_tuned_heads_wq(files):
  got = _launch("sparse_tune", "--workdir=st", "--model=model", "--align_data=align.jsonl",
                "--eval_data=eval", "--conflict_map=diag/conflict_map.json",
                "--head_set=bucket:2", "--seed=3", "--pcgrad=one_sided",
                "--util_data=d_util.jsonl", *TINY, cwd=files)
  assert got.returncode == 0, got.stderr[-3000:]
  st = files / "st"
  for name in ("config.json", "run.json", "eval.json", "done.json", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors", "merged/config.json"):
    assert (st / name).is_file(), name
  assert set(json.loads((st / "eval.json").read_text())) >= set(KEYS) | {"avg_gen", "avg_safe"}
  c = np.asarray(json.loads((files / "diag" / "conflict_map.json").read_text())["heads"]["c"])
  tuned = np.zeros(L * H, bool)
  tuned[np.argsort(-c.reshape(-1), kind="stable")[6:]] = True
  tuned = tuned.reshape(L, H)
  base, merged = load_file(files / "model" / "model.safetensors"), {}
  for p in sorted((st / "merged").glob("*.safetensors")):
    merged.update(load_file(p))
  assert set(base) == set(merged)
  for k, w in base.items():
    if "q_proj.weight" not in k:
      np.testing.assert_array_equal(merged[k], w, err_msg=k)  # bit-identical
      continue
    l = int(k.split(".layers.")[1].split(".")[0])
    rows = merged[k].reshape(H, -1, w.shape[1]) != w.reshape(H, -1, w.shape[1])
    assert not rows[~tuned[l]].any(), k  # frozen heads' rows: bit-identical
    assert rows[tuned[l]].any(axis=(1, 2)).all(), k  # every tuned head moved
  again = _launch("sparse_tune", "--workdir=st", "--model=model", "--align_data=align.jsonl",
                  "--eval_data=eval", "--conflict_map=diag/conflict_map.json",
                  "--head_set=bucket:2", "--seed=3", "--pcgrad=one_sided",
                  "--util_data=d_util.jsonl", *TINY, cwd=files)
  assert again.returncode == 0 and "train:" not in again.stderr  # finished: nothing trained


@pytest.mark.parametrize("module, args, message", [
    ("sparse_tune", ["--head_set=side:1"], "--head_set='side:1'"),
    ("sparse_tune", ["--head_set=bucket:1"], "pass --conflict_map"),
    ("sparse_tune", ["--head_set=all", "--pcgrad=one_sided"], "go together"),
    ("sparse_tune", ["--head_set=all", "--config.recipe.batch_size=0"],
     "--config.recipe.batch_size=0"),
    ("cast_experiment", ["--config.seeds=1,1"], "repeats a seed"),
    ("cast_experiment", ["--config.rankings=o"], "must include c"),
    ("cast_experiment", ["--diagnosis=eval"], "no conflict_map.json"),
    ("cast_experiment", ["--model=nowhere"], "--model='nowhere'"),
])
def test_bad_flags_fail_in_one_line_before_writing(files, module, args, message):
  if module == "sparse_tune":
    base = ["--workdir=bad", "--model=model", "--align_data=align.jsonl", "--eval_data=eval"]
  else:
    base = ["--workdir=bad", "--model=model", "--align_data=align.jsonl", "--eval_data=eval",
            "--safe_data=d_safe.jsonl", "--util_data=d_util.jsonl"]
  got = _launch(module, *base, *args, cwd=files)
  assert got.returncode == 2, got.stderr[-2000:]
  assert message in got.stderr and "Traceback" not in got.stderr, got.stderr[-2000:]
  assert len(got.stderr.strip().splitlines()) == 1
  assert not (files / "bad").exists()


def test_diagnosis_and_drift_run_in_child_processes(files):
  """No --diagnosis: launch.diagnose runs on the base model; drift re-diagnoses Full SFT."""
  got = _launch("cast_experiment", "--workdir=exd", "--model=model", "--align_data=align.jsonl",
                "--eval_data=eval", "--safe_data=d_safe.jsonl", "--util_data=d_util.jsonl",
                "--config.seeds=5", f"--config.num_buckets={M}", "--config.rankings=c",
                "--config.fractions=", "--config.pcgrad_runs=", "--config.drift.checkpoints=1",
                "--config.diagnosis.n_safe=4", "--config.diagnosis.n_util=6",
                "--config.diagnosis.gen_len=4", "--config.diagnosis.batch_size=4", *TINY,
                cwd=files)
  assert got.returncode == 0, got.stderr[-3000:]
  exd = files / "exd"
  c = np.asarray(json.loads((exd / "diagnosis" / "conflict_map.json").read_text())["heads"]["c"])
  run = json.loads((exd / "runs" / "seed5" / "c_b1" / "run.json").read_text())
  assert sorted(run["heads"]) == sorted(np.argsort(-c.reshape(-1), kind="stable")[:6].tolist())
  drift = json.loads((exd / "drift.json").read_text())
  assert [r["step"] for r in drift["checkpoints"]] == [0, 4] and (exd / "drift.png").is_file()
  c4 = np.asarray(json.loads((exd / "drift" / "step4" / "diagnosis" / "conflict_map.json")
                             .read_text())["heads"]["c"])
  assert drift["spearman_vs_first"][1] == pytest.approx(
      stats.spearmanr(c.reshape(-1), c4.reshape(-1))[0])
  moved = (np.argsort(np.argsort(-c.reshape(-1), kind="stable")) < 6) != \
      (np.argsort(np.argsort(-c4.reshape(-1), kind="stable")) < 6)
  assert drift["bucket_churn"] == pytest.approx([0.0, moved.mean()])
  # The drift checkpoint at step 4 is the Full-SFT run of the same seed at step 4.
  last = lambda p: json.loads(p.read_text().strip().splitlines()[-1])["loss"]
  assert last(exd / "drift" / "train" / "metrics.jsonl") == last(
      exd / "runs" / "seed5" / "full" / "train" / "metrics.jsonl")


def test_choose_recipe_runs_full_sft_over_the_grid_and_stops(files):
  got = _launch("cast_experiment", "--workdir=choose", "--choose_recipe", "--model=model",
                "--align_data=align.jsonl", "--eval_data=eval", "--safe_data=d_safe.jsonl",
                "--util_data=d_util.jsonl", "--config.choose.learning_rates=0.5,0.05",
                "--config.choose.num_steps=2", *TINY, cwd=files)
  assert got.returncode == 0, got.stderr[-3000:]
  out = files / "choose"
  rec = json.loads((out / "recipe.json").read_text())
  runs = {(g["learning_rate"], g["num_steps"]): g for g in rec["grid"]}
  assert set(runs) == {(0.05, 2), (0.5, 2)}
  for (lr, n), g in runs.items():
    ev = json.loads((out / "recipe_grid" / f"lr{lr:g}_steps{n}" / "eval.json").read_text())
    assert all(g[k] == ev[k] for k in ev)
    run = json.loads((out / "recipe_grid" / f"lr{lr:g}_steps{n}" / "run.json").read_text())
    assert run["num_heads"] == L * H and run["recipe"]["learning_rate"] == lr
  best = max(g["avg_safe"] for g in rec["grid"])
  want = min((g for g in rec["grid"] if g["avg_safe"] == best),
             key=lambda g: (g["num_steps"], g["learning_rate"]))
  assert rec["choice"] == {"learning_rate": want["learning_rate"], "num_steps": 2}
  assert rec["override"] in (out / "recipe.md").read_text()
  assert not (out / "runs" / "seed21").exists() and not (out / "tables.md").exists()
