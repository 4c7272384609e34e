"""launch/diagnose.py end to end on a tiny random HF checkpoint (subprocess), its resume from
cached stages and refusal of a different run; `diagnosis.stage_cache` on its own."""

import json

import numpy as np
import pytest

from cast_jax.diagnosis import stage_cache
from cast_jax.train.fingerprint import FingerprintMismatchError, make_fingerprint
from diagnosis_launch_fixtures import _args, _launch, _stage_lines


def test_diagnose_writes_the_map_resumes_and_refuses_another_run(diag_files, diag_first):
  wd = diag_files / "wd"
  for name in ("config.json", "fingerprint.json", "conflict_map.json", "buckets.json",
               "heatmap_c.png", "heatmap_o.png", "heatmap_s.png", "summary.md", "times.json"):
    assert (wd / name).is_file(), name
  record = json.loads((wd / "conflict_map.json").read_text())
  L, H = 3, 4  # hf_models' llama case
  assert (record["num_layers"], record["num_heads"]) == (L, H)
  assert record["calibration"]["n_safe"] == 4 and record["calibration"]["n_util"] == 6
  # H_gen and the base accuracy, recomputed from the stored sweep predictions.
  with np.load(wd / "stages" / "mcq_sweep.npz") as z:
    base = (z["base_predictions"] == z["answers"]).mean()
    acc = (z["predictions"] == z["answers"][None, None]).mean(-1)
  assert record["base"]["accuracy"] == pytest.approx(base)
  np.testing.assert_allclose(record["heads"]["h_gen"], np.abs(acc - base), atol=1e-12)
  with np.load(wd / "stages" / "safety_sweep.npz") as z:
    assert z["refused"].shape == (L, H, 4)
    np.testing.assert_allclose(record["heads"]["h_safe"],
                               np.abs(z["refused"].mean(-1) - z["base_refused"].mean()))
  with np.load(wd / "stages" / "gradients.npz") as z:
    np.testing.assert_allclose(record["heads"]["o"], (1 - z["cos"]) / 2, atol=1e-12)
  sizes = [b["size"] for b in json.loads((wd / "buckets.json").read_text())["buckets"]]
  assert sizes == [3, 3, 3, 3]
  assert not any("cached" in line for line in _stage_lines(diag_first.stdout))

  again = _launch(*_args("wd"), cwd=diag_files)
  assert again.returncode == 0, again.stderr[-3000:]
  done = [line for line in _stage_lines(again.stdout) if "cached" in line]
  assert len(done) == 3, again.stdout
  assert (wd / "conflict_map.json").read_text() == json.dumps(record, indent=2,
                                                              sort_keys=True) + "\n"
  assert json.loads((wd / "times.json").read_text())["cached_stages"] == [
      "gradients", "mcq_sweep", "safety_sweep"]

  config_before = (wd / "config.json").read_text()
  other = _launch(*_args("wd", "--config.seed=1"), cwd=diag_files)
  assert other.returncode != 0
  assert "seed (recorded 0, now 1)" in other.stderr, other.stderr[-2000:]
  assert "Traceback" not in other.stderr
  assert (wd / "config.json").read_text() == config_before


@pytest.mark.parametrize("flags, needle", [
    (["--util_kind=essay"], "--config.util_kind='essay': use 'mcq'"),
    (["--target=x"], "--config.target='x': use one of q, k, v, o"),
    (["--target=o", "--config.include_bias=True"], "o_proj has no bias"),
    (["--refusal_prefixes=no_prefixes.txt"], "no_prefixes.txt: no refusal string"),
    (["--refusal_prefixes=missing.txt"], "'missing.txt' does not exist"),
    (["--config.reasoning_gen_len=0"], "--config.reasoning_gen_len=0: use an integer >= 1"),
    (["--config.gen_len=0"], "--config.gen_len=0: use an integer >= 1"),
    (["--n_util=0"], "--config.n_util=0: use an integer >= 1"),
    (["--config.safe_data=missing.jsonl"], "--config.safe_data='missing.jsonl' does not exist"),
    (["--util_data=gone/d_util.jsonl"], "--config.util_data='gone/d_util.jsonl' does not exist"),
    (["--config.compile_cache=d_safe.jsonl"], "--config.compile_cache='d_safe.jsonl': use a folder"),
])
def test_bad_config_is_a_one_line_usage_error_before_writing(diag_files, flags, needle):
  base = {"--model": "model", "--config.safe_data": "d_safe.jsonl", "--util_data": "d_util.jsonl"}
  for flag in flags:
    base[flag.split("=")[0]] = flag.split("=", 1)[1]
  got = _launch("--workdir=bad", *[f"{k}={v}" for k, v in base.items()], cwd=diag_files)
  assert got.returncode == 2 and needle in got.stderr, got.stderr[-2000:]
  assert len(got.stderr.strip().splitlines()) == 1
  assert not (diag_files / "bad").exists()


def test_stage_cache_claims_computes_once_and_refuses_other_runs(tmp_path):
  wd = str(tmp_path)
  fp = make_fingerprint(seed=0, data=[np.arange(3)])
  assert stage_cache.claim(wd, fp) is False
  assert stage_cache.claim(wd, dict(fp)) is True
  with pytest.raises(FingerprintMismatchError, match=r"seed \(recorded 0, now 1\)"):
    stage_cache.claim(wd, make_fingerprint(seed=1, data=[np.arange(3)]))
  calls = []

  def compute():
    calls.append(1)
    return {"a": np.arange(6.0).reshape(2, 3), "b": np.array([True, False])}

  got, cached, secs = stage_cache.cached_stage(wd, "s", compute)
  assert not cached and secs >= 0 and len(calls) == 1
  again, cached, secs2 = stage_cache.cached_stage(wd, "s", compute)
  assert cached and len(calls) == 1 and secs2 == pytest.approx(secs)
  assert sorted(again) == ["a", "b"]
  np.testing.assert_array_equal(again["a"], np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(again["b"], [True, False])
  assert stage_cache.load_stage(wd, "never") is None


def test_kv_target_with_a_prefix_judge_is_recorded_and_fingerprinted(diag_files):
  """--target=v: units are KV heads (2 per layer, each removing 2 query heads), every per-unit
  table is [L, KV], the prefix rule is recorded; another target in the workdir is refused."""
  got = _launch(*_args("wd_v", "--target=v", "--refusal_prefixes=prefixes.txt"), cwd=diag_files)
  assert got.returncode == 0, got.stderr[-3000:]
  wd = diag_files / "wd_v"
  record = json.loads((wd / "conflict_map.json").read_text())
  L, KV = 3, 2  # hf_models' llama case: 4 query heads, 2 KV heads
  assert (record["target"], record["unit"], record["num_units"]) == ("v", "kv_head", KV)
  assert record["unit_query_heads"] == [[0, 1], [2, 3]]
  for name, table in record["heads"].items():
    assert np.shape(table) == (L, KV), name
  assert record["calibration"]["refusal_prefixes"] == ["I'm sorry", "I cannot"]
  assert "prefixes" in record["calibration"]["refusal_rule"]
  with np.load(wd / "stages" / "mcq_sweep.npz") as z:
    assert z["predictions"].shape == (L, KV, 6)
  with np.load(wd / "stages" / "safety_sweep.npz") as z:
    assert z["refused"].shape == (L, KV, 4)
  fingerprint = json.loads((wd / "fingerprint.json").read_text())["fingerprint"]
  assert fingerprint["target"] == "v" and fingerprint["judge"] != "keyword"
  assert "KV heads" in (wd / "summary.md").read_text()
  assert sum(b["size"] for b in json.loads((wd / "buckets.json").read_text())["buckets"]) == L * KV
  other = _launch(*_args("wd_v", "--target=k", "--refusal_prefixes=prefixes.txt"), cwd=diag_files)
  assert other.returncode != 0 and "target (recorded 'v', now 'k')" in other.stderr, \
      other.stderr[-2000:]


def test_reasoning_calibration_runs_end_to_end(diag_files):
  """--util_kind=reasoning: GSM8K-schema D_util, H_gen from generated answers per head."""
  got = _launch(*_args("wd_reason", "--util_kind=reasoning", "--util_data=d_gsm.jsonl",
                       "--config.reasoning_gen_len=6"), cwd=diag_files)
  assert got.returncode == 0, got.stderr[-3000:]
  wd = diag_files / "wd_reason"
  record = json.loads((wd / "conflict_map.json").read_text())
  cal = record["calibration"]
  assert (cal["util_kind"], cal["n_util"], cal["reasoning_gen_len"]) == ("reasoning", 6, 6)
  assert not (wd / "stages" / "mcq_sweep.npz").exists()
  with np.load(wd / "stages" / "reasoning_sweep.npz") as z:
    assert z["correct"].shape == (3, 4, 6)
    base = z["base_correct"].mean()
    np.testing.assert_allclose(record["heads"]["h_gen"], np.abs(z["correct"].mean(-1) - base))
  assert record["base"]["accuracy"] == pytest.approx(base)
  with np.load(wd / "stages" / "gradients.npz") as z:  # L_util = CE of the solutions
    assert z["util_tokens"] > 6 * 10
