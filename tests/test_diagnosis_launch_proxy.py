"""launch/diagnose.py's teacher-forced safety proxy: `safety_proxy=teacher_forced` puts the proxy
H_safe into S and C, `report_proxy_spearman=True` computes both H_safe (reusing the stages a
generation run cached) and writes their Spearman correlation."""

import json
import shutil

import numpy as np
import pytest

from cast_jax.diagnosis import scores
from cast_jax.diagnosis.safety_proxy import ProxySweep
from diagnosis_launch_fixtures import _args, _launch, _stage_lines


def test_teacher_forced_proxy_and_its_spearman(diag_files, diag_first):
  shutil.copytree(diag_files / "wd", diag_files / "wd_proxy")
  wd = diag_files / "wd_proxy"
  only = _launch(*_args("wd_proxy", "--config.safety_proxy=teacher_forced"), cwd=diag_files)
  assert only.returncode == 0, only.stderr[-3000:]
  lines = _stage_lines(only.stdout)
  # Same fingerprint as the generation run: its stages are reused, only the proxy runs, and
  # the generation stage is not part of a teacher-forced run.
  assert sum("cached" in line for line in lines) == 2, lines
  assert any("safety_proxy: done" in line for line in lines), lines
  assert not any("safety_sweep" in line for line in lines), lines
  record = json.loads((wd / "conflict_map.json").read_text())
  assert record["base"]["refusal_rate"] is None and "proxy_spearman" not in record
  with np.load(wd / "stages" / "safety_proxy.npz") as z:
    proxy = ProxySweep(z["base_logprob"], z["logprob"], z["n_targets"])
    assert z["logprob"].shape == (3, 4, 4)  # L, H, n_safe (one calibration refusal per prompt)
  np.testing.assert_allclose(record["heads"]["h_safe"], proxy.h_safe, atol=1e-12)
  assert record["base"]["refusal_logprob_per_token"] == pytest.approx(proxy.base_mean)
  assert record["calibration"]["safety_proxy"] == "teacher_forced"

  got = _launch(*_args("wd_proxy", "--config.safety_proxy=teacher_forced",
                       "--config.report_proxy_spearman=True"), cwd=diag_files)
  assert got.returncode == 0, got.stderr[-3000:]
  assert sum("cached" in line for line in _stage_lines(got.stdout)) == 4, got.stdout
  record = json.loads((wd / "conflict_map.json").read_text())
  with np.load(wd / "stages" / "safety_sweep.npz") as z:
    gen = np.abs(z["refused"].mean(-1) - z["base_refused"].mean())
  np.testing.assert_allclose(record["heads"]["h_safe"], proxy.h_safe, atol=1e-12)
  np.testing.assert_allclose(record["proxy_spearman"]["h_safe_teacher_forced"], proxy.h_safe)
  rho = record["proxy_spearman"]["spearman_teacher_forced_vs_generation_h_safe"]
  want = scores.spearman(proxy.h_safe, gen)
  assert (rho is None and np.isnan(want)) or rho == pytest.approx(want)
  assert record["base"]["refusal_rate"] is not None
  assert "Teacher-forced safety proxy" in (wd / "summary.md").read_text()


@pytest.mark.parametrize("flag, needle", [
    ("--config.safety_proxy=sampling", "--config.safety_proxy='sampling'"),
    ("--config.proxy_openings=I'm sorry||No", "--config.proxy_openings="),
])
def test_bad_proxy_setting_is_a_usage_error(diag_files, flag, needle):
  got = _launch(*_args("bad_proxy", flag), cwd=diag_files)
  assert got.returncode == 2 and needle in got.stderr, got.stderr[-2000:]
  assert not (diag_files / "bad_proxy").exists()
