"""The end-to-end demo's pieces that run without the testbed: the markdown -> self-contained
HTML report writer (`cast_jax.report`), the resumable stage records (`launch.demo_stages`), the
report text (`launch.demo_report`) and the config checks. The whole demo runs in CI as the
README's main command (.ci/run)."""

import base64
import html.parser
import json
import os
import subprocess
import sys

import pytest

from cast_jax import report
from launch import demo_report, demo_stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest valid PNG (1x1, one grey pixel), written byte for byte.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                    "3a7e9b550000000a49444154789c63680000008200816e2a8e2f0000000049454e44ae426082")


class _Collect(html.parser.HTMLParser):
  """Tags, attributes and text of an HTML page (the stdlib parser as the reference)."""

  def __init__(self):
    super().__init__()
    self.tags, self.imgs, self.links, self.text = [], [], [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    a = dict(attrs)
    if tag == "img":
      self.imgs.append(a)
    if tag == "a":
      self.links.append(a["href"])

  def handle_data(self, data):
    self.text.append(data)


def _parse(page: str) -> _Collect:
  p = _Collect()
  p.feed(page)
  return p


def test_html_inlines_images_and_renders_tables_links_and_escapes(tmp_path):
  (tmp_path / "fig").mkdir()
  (tmp_path / "fig" / "a.png").write_bytes(PNG)
  md = ("# Title <script>\n\nSome **bold** and `x < y` [a link](sub/file.json).\n\n"
        "![the figure](fig/a.png)\n\n![gone](fig/missing.png)\n\n"
        "| model | rate |\n|---|---|\n| Base | 0.000 |\n| LCDD | 1.000 |\n\n"
        "- one\n- two\n\n```\ncode <b>\n```\n")
  md_path, html_path = report.write_report(str(tmp_path), md, title="t")
  assert open(md_path).read() == md
  page = open(html_path).read()
  p = _parse(page)
  # The existing image is the file's bytes as a data URI; the missing one keeps its path.
  assert p.imgs[0]["src"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
  assert p.imgs[0]["alt"] == "the figure"
  assert p.imgs[1]["src"] == "fig/missing.png"
  assert p.links == ["sub/file.json"]
  assert p.tags.count("table") == 1 and p.tags.count("tr") == 3 and p.tags.count("td") == 4
  assert p.tags.count("li") == 2 and "strong" in p.tags and "pre" in p.tags
  assert "script" not in p.tags and "b" not in p.tags  # markdown text is escaped
  text = "".join(p.text)
  assert "Title <script>" in text and "x < y" in text and "code <b>" in text
  assert "LCDD" in text and "1.000" in text


def test_run_stage_records_skips_and_redoes_changed_settings(tmp_path, capsys):
  out = str(tmp_path)
  calls = []
  stage_dir = tmp_path / "x"

  def fn():
    calls.append(1)
    stage_dir.mkdir()
    (stage_dir / "made.txt").write_text(str(len(calls)))
    return {"value": (1, 2)}

  rec = demo_stages.run_stage(out, "x", "doing x", {"n": 1}, fn)
  assert rec["result"] == {"value": [1, 2]} and len(calls) == 1
  with open(tmp_path / "stages" / "x.json") as f:
    assert json.load(f)["settings"] == {"n": 1}
  again = demo_stages.run_stage(out, "x", "doing x", {"n": 1}, fn)
  assert again["result"] == rec["result"] and len(calls) == 1  # skipped
  assert "finished earlier" in capsys.readouterr().out
  with pytest.raises(FileExistsError):  # not valid any more: redone into the same dir
    demo_stages.run_stage(out, "x", "doing x", {"n": 1}, fn, still_valid=lambda r: False)
  assert len(calls) == 2
  capsys.readouterr()
  # Other settings: the old stage dir is discarded and the stage redone.
  rec = demo_stages.run_stage(out, "x", "doing x", {"n": 2}, fn, stage_dir=str(stage_dir))
  assert len(calls) == 3 and (stage_dir / "made.txt").read_text() == "3"
  assert rec["settings"] == {"n": 2} and "other settings (n)" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == ["stages", "x"]


def _records():
  kl = lambda v: {"mean": v, "num_prompts": 4, "num_tokens": 20}
  table = "### Table 1 (reduced: one seed)\n\n| Method | Avg Safe |\n|---|---|\n| Base | 16.00 |\n"
  return {
      "testbed": {"result": {"key": "k1", "root": "/c/t", "base_dir": "/c/t/base",
                             "world_dir": "/c/t/world"}, "seconds": 370.0},
      "diagnosis": {"result": {
          "base": {"accuracy": 1.0, "refusal_rate": 0.36}, "c_min": 0.28, "c_max": 0.9,
          "num_heads_total": 4, "calibration": {"n_safe": 10, "n_util": 8, "gen_len": 32},
          "buckets": [{"bucket": 1, "heads": [[0, 1], [1, 0]], "c_min": 0.5, "c_max": 0.9},
                      {"bucket": 2, "heads": [[0, 0], [1, 1]], "c_min": 0.28, "c_max": 0.4}]},
          "seconds": 30.0},
      "buckets": {"result": {"table_markdown": table, "recipe": {
          "learning_rate": 1e-3, "num_steps": 640, "batch_size": 4, "accum_steps": 2}},
          "seconds": 120.0},
      "sft": {"result": {"num_steps": 300, "num_examples": 600, "first_loss": 9.3,
                         "final_loss": 0.07}, "seconds": 30.0},
      "lcdd": {"result": {"final_step": 1000, "stop_reason": "num_steps", "gate_sparsity": 0.045,
                          "delta_sparsity": 0.085, "gates_total": 4608}, "seconds": 40.0},
      "eraser": {"result": {"best_step": 250, "best_heldout": {"loss": 1.0, "mse": 0.7,
                                                               "kl": 0.36},
                            "eval": {"behaviour": "fixed_response",
                                     "headline": "fixed_response_rate", "num_prompts": 4,
                                     "models": {n: {"fixed_response_rate": r} for n, r in (
                                         ("Base", 0.0), ("SFT", 0.98), ("LCDD", 1.0),
                                         ("LCDD+Trigger", 0.08))},
                                     "kl": {"SFT||LCDD": kl(0.0878),
                                            "SFT||LCDD+Trigger": kl(1.3252),
                                            "Base||LCDD": kl(9.2871),
                                            "Base||LCDD+Trigger": kl(6.6864)},
                                     "samples": {"LCDD": [{"prompt": "p", "response": "r"}]}}},
                 "seconds": 60.0}}


def test_report_markdown_carries_every_stage_number_and_link():
  text = demo_report.report_markdown(_records(), 650.0)
  for needle in ("diagnosis/heatmap_c.png", "cast/pareto.png", "eraser/curves.png",
                 "lcdd/sparsity_per_layer.png", "[diagnosis/](diagnosis/)", "[cast/](cast/)",
                 "[sft/](sft/)", "[lcdd/](lcdd/)", "[eraser/](eraser/)", "| 650 |",
                 "L0H1, L1H0", "L0H0, L1H1", "4.5 %", "| Base | 16.00 |",
                 "| 0.0878 | 1.3252 | 6.6864 | 9.2871 |", "LCDD 1.000 -> LCDD+Trigger 0.080",
                 "step 250"):
    assert needle in text, needle
  # It converts to one table per markdown table (timing, Table 1, carrier eval, the KLs).
  assert _parse(report.markdown_to_html(text, "/nonexistent")).tags.count("table") == 4


@pytest.mark.parametrize("flag, needle", [
    ("--config.eraser.eval_every=500", "--config.eraser.eval_every=500 exceeds num_steps"),
    ("--config.sft.num_steps=0", "--config.sft.num_steps=0: use an integer >= 1"),
    ("--config.lcdd.preset=nope", "--config.lcdd.preset='nope'"),
])
def test_demo_config_is_checked_before_anything_runs(tmp_path, flag, needle):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  got = subprocess.run([sys.executable, "-m", "launch.demo", "--workdir=out", flag],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert got.returncode == 2 and needle in got.stderr, got.stderr[-2000:]
  assert len(got.stderr.strip().splitlines()) == 1
  assert os.listdir(tmp_path) == []
