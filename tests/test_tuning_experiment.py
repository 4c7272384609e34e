"""CAST experiment tables, plan, head-set specs and drift vs independent numpy / scipy."""

import json

import numpy as np
import pytest
from scipy import stats

from cast_jax.diagnosis import report, scores
from cast_jax.tuning import experiment, head_sets, runner

KEYS = ("mmlu", "csqa", "gsm8k", "refusal_vanilla", "refusal_adversarial", "over_refusal")


def _eval(rng):
  return {k: float(rng.rand()) for k in KEYS}


def _ref_row(run, base):
  """Percent metrics, averages and Eq. 7-8 costs, written out by hand."""
  pct = {k: 100 * run[k] for k in KEYS}
  pct["avg_gen"] = (pct["mmlu"] + pct["csqa"] + pct["gsm8k"]) / 3
  pct["avg_safe"] = (pct["refusal_vanilla"] + pct["refusal_adversarial"]) / 2
  b_gen = 100 * (base["mmlu"] + base["csqa"] + base["gsm8k"]) / 3
  b_safe = 100 * (base["refusal_vanilla"] + base["refusal_adversarial"]) / 2
  gain = pct["avg_safe"] - b_safe
  undefined = gain < 1.0  # experiment.MIN_SAFETY_GAIN: no measurable safety gain to price
  pct["ucr"] = np.nan if undefined else max(0.0, (b_gen - pct["avg_gen"]) / (gain + 1e-8))
  pct["mmlu_cr"] = np.nan if undefined else max(0.0, (100 * base["mmlu"] - pct["mmlu"])
                                                / (gain + 1e-8))
  return pct


def _mean_std(values):
  """(mean, sample std) over the defined values, None where too few."""
  ok = [v for v in values if not np.isnan(v)]
  return (np.mean(ok) if ok else None), (np.std(ok, ddof=1) if len(ok) > 1 else None)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.RandomState(0)
  L, H, M = 3, 4, 3
  tabs = {"c": rng.rand(L, H), "o": rng.rand(L, H)}
  specs = experiment.plan_runs(M, L * H, fractions=(25,), rankings=("c", "o"),
                               pcgrad_sets=("full", "safe"))
  seeds = (21, 42, 84)
  evals = {s: {sp.name: _eval(rng) for sp in specs} for s in seeds}
  base = _eval(rng)
  return tabs, specs, seeds, evals, base, M


def test_plan_names_budget_and_dedupe():
  specs = experiment.plan_runs(4, 32, fractions=(25, 50), rankings=("c", "s"),
                               pcgrad_sets=("full", "random", "risky", "safe"))
  names = [s.name for s in specs]
  assert names == ["full", "random", "c_b1", "c_b2", "c_b3", "c_b4", "s_b1", "s_b2", "s_b3",
                   "s_b4", "top25", "bottom25", "top50", "bottom50", "pcg_full", "pcg_random",
                   "pcg_risky", "pcg_safe"]
  assert specs[1].head_set == "random:n=8" and specs[-1].head_set == "bucket:4"
  assert [s.pcgrad for s in specs[-4:]] == ["one_sided"] * 4
  c = np.random.RandomState(1).rand(4, 8)
  tables = runner.ConflictTables(c, None, None, 4, "t")
  masks = {s.name: runner.head_set_mask(s.head_set, tables, 42, "c") for s in specs
           if s.ranking in ("c", "")}
  alias = experiment.dedupe([(n, m.tobytes()) for n, m in masks.items()])
  # With M = 4 and 32 heads, Top-25% is B1 and Bottom-25% is B4: trained once.
  assert alias["top25"] == "c_b1" and alias["bottom25"] == "c_b4"
  assert alias["top50"] == "top50" and alias["pcg_full"] == "full"
  with pytest.raises(ValueError, match="pcgrad_sets|PCGrad run"):
    experiment.plan_runs(4, 32, pcgrad_sets=("bogus",))
  # M does not divide N: the random run is budget-matched to bucket M's size.
  assert experiment.plan_runs(3, 10)[1].head_set == f"random:n={10 - (10 * 2) // 3}"


def test_head_set_specs_match_head_sets_and_reject_bad_specs():
  c = np.random.RandomState(2).rand(3, 4)
  t = runner.ConflictTables(c, c * 2, None, 2, "x")
  order = np.argsort(-c.reshape(-1), kind="stable")
  np.testing.assert_array_equal(runner.head_set_mask("bucket:1", t, 0).reshape(-1)[order[:6]], 1)
  np.testing.assert_array_equal(runner.head_set_mask("top:25", t, 0),
                                head_sets.top_count_mask(c, 3))
  np.testing.assert_array_equal(runner.head_set_mask("bottom:50", t, 0),
                                head_sets.bottom_count_mask(c, 6))
  assert runner.head_set_mask("random:n=5", t, 7).sum() == 5
  np.testing.assert_array_equal(runner.head_set_mask("random:50", t, 7),
                                head_sets.random_mask((3, 4), 6, 7))
  assert runner.head_set_mask("all", t, 0).sum() == 12
  for bad, msg in (("bucket:3", "bucket:1..2"), ("top:0", r"\(0, 100\]"), ("side:1", "use bucket"),
                   ("random:n=13", "1 <= k <= 12")):
    with pytest.raises(ValueError, match=msg):
      runner.head_set_mask(bad, t, 0)
  with pytest.raises(ValueError, match="no per-head S table"):
    runner.head_set_mask("bucket:1", t, 0, ranking="s")


def test_conflict_map_and_buckets_json_give_the_same_c(tmp_path):
  rng = np.random.RandomState(3)
  sc = scores.score_heads(rng.rand(3, 4), rng.rand(3, 4), rng.rand(3, 4), m=4)
  rec = report.conflict_map(sc, rng.rand(3, 4), rng.rand(3, 4), rng.rand(3, 4),
                            base_accuracy=0.5, base_refusal_rate=0.1, num_buckets=4,
                            model={}, calibration={})
  (tmp_path / "conflict_map.json").write_text(json.dumps(rec))
  (tmp_path / "buckets.json").write_text(json.dumps(report.bucket_record(sc.c, 4)))
  full = runner.load_conflict_map(str(tmp_path))
  only_c = runner.load_conflict_map(str(tmp_path / "buckets.json"))
  np.testing.assert_allclose(full.c, sc.c)
  np.testing.assert_allclose(only_c.c, sc.c)
  np.testing.assert_allclose(full.o, sc.o)
  np.testing.assert_allclose(full.s, sc.s)
  assert full.num_buckets == only_c.num_buckets == 4 and only_c.o is None
  (tmp_path / "kv.json").write_text(json.dumps({**rec, "unit": "kv_head", "target": "k"}))
  with pytest.raises(ValueError, match="target q"):
    runner.load_conflict_map(str(tmp_path / "kv.json"))
  with pytest.raises(ValueError, match="does not exist"):
    runner.load_conflict_map(str(tmp_path / "nope.json"))


def test_method_and_bucket_tables_equal_numpy(setup):
  tabs, specs, seeds, evals, base, M = setup
  base_by_seed = {s: base for s in seeds}
  t = experiment.method_table("T1", evals, base_by_seed, [("Base", "base"), ("Full", "full"),
                                                          ("Safe", f"c_b{M}")])
  assert [r["label"] for r in t["rows"]] == ["Base", "Full", "Safe"]
  for row in t["rows"]:
    for k in t["columns"]:
      want = [_ref_row(base if row["run"] == "base" else evals[s][row["run"]], base)[k]
              for s in seeds]
      cell = row["cells"][k]
      assert cell["values"] == [None if np.isnan(w) else pytest.approx(w, rel=1e-9, abs=1e-9)
                                for w in want]
      mean, std = _mean_std(want)
      assert cell["mean"] == (None if mean is None else pytest.approx(mean, rel=1e-9, abs=1e-9))
      assert cell["std"] == (None if std is None else pytest.approx(std, rel=1e-9, abs=1e-9))
  b = experiment.bucket_table(evals, base_by_seed, tabs, M)
  assert len(b["rows"]) == 2 * M
  for row in b["rows"]:
    score = tabs[row["ranking"]].reshape(-1)
    members = np.argsort(-score, kind="stable")  # no ties in random data
    size = len(score) // M
    want_avg = score[members[(row["bucket"] - 1) * size:row["bucket"] * size]].mean()
    assert row["cells"]["avg_score"]["mean"] == pytest.approx(want_avg)
    want = [_ref_row(evals[s][f"{row['ranking']}_b{row['bucket']}"], base)["ucr"] for s in seeds]
    mean = _mean_std(want)[0]
    assert row["cells"]["ucr"]["mean"] == (None if mean is None else pytest.approx(mean))
  md = experiment.table_markdown(t)
  mean, std = t["rows"][1]["cells"]["mmlu"]["mean"], t["rows"][1]["cells"]["mmlu"]["std"]
  assert f"| Full | {mean:.2f} ± {std:.2f} |" in md


def test_correlations_equal_scipy(setup):
  tabs, specs, seeds, evals, base, M = setup
  t = experiment.correlation_table(evals, {s: base for s in seeds}, tabs, M)
  for row in t["rows"]:
    score = tabs[row["ranking"]].reshape(-1)
    order = np.argsort(-score, kind="stable")
    size = len(score) // M
    x = [score[order[i * size:(i + 1) * size]].mean() for i in range(M)]
    for cost in ("ucr", "mmlu_cr"):
      ys = [[_ref_row(evals[s][f"{row['ranking']}_b{b}"], base)[cost] for b in range(1, M + 1)]
            for s in seeds]
      # M = 3 buckets: r needs all three costs defined (and not constant).
      ok = lambda y: np.isfinite(y).all() and np.ptp(y) > 0
      p = [stats.pearsonr(x, y)[0] if ok(y) else np.nan for y in ys]
      r = [stats.spearmanr(x, y)[0] if ok(y) else np.nan for y in ys]
      for name, want in ((f"pearson_{cost}", p), (f"spearman_{cost}", r)):
        cell = row["cells"][name]
        mean, std = _mean_std(want)
        assert cell["mean"] == (None if mean is None else pytest.approx(mean, rel=1e-9, abs=1e-9))
        assert cell["std"] == (None if std is None else pytest.approx(std, rel=1e-9, abs=1e-9))


def test_one_seed_has_no_std_and_figures_render(setup, tmp_path):
  tabs, specs, seeds, evals, base, M = setup
  one = {seeds[0]: evals[seeds[0]]}
  t = experiment.method_table("T", one, {seeds[0]: base}, [("Full", "full")])
  assert t["rows"][0]["cells"]["mmlu"]["std"] is None
  assert "± " not in experiment.table_markdown(t).split("\n")[-2]
  b = experiment.bucket_table(evals, {s: base for s in seeds}, tabs, M)
  c = experiment.correlation_table(evals, {s: base for s in seeds}, tabs, M)
  from cast_jax import workdir as wd
  for name, fig in (("p.png", experiment.pareto_figure([t, t])),
                    ("c.png", experiment.correlation_figure(b, c, "ucr"))):
    wd.save_figure(fig, tmp_path / name)
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drift_stats_vs_scipy():
  rng = np.random.RandomState(5)
  c0 = rng.rand(3, 4)
  tabs = [c0, c0 + 0.01 * rng.rand(3, 4), rng.rand(3, 4)]
  got = experiment.drift_stats(tabs, 2)
  want_first = [stats.spearmanr(c0.reshape(-1), t.reshape(-1))[0] for t in tabs]
  assert got["spearman_vs_first"] == pytest.approx(want_first)
  assert got["spearman_vs_previous"][2] == pytest.approx(
      stats.spearmanr(tabs[1].reshape(-1), tabs[2].reshape(-1))[0])
  top = lambda t: set(np.argsort(-t.reshape(-1), kind="stable")[:6])
  churn = [len(top(c0) ^ top(t)) / 12 for t in tabs]  # a head that leaves B1 enters B2
  assert got["bucket_churn"] == pytest.approx(churn)


def test_choose_recipe_rule_ignores_utility():
  g = lambda lr, n, safe, gen: {"learning_rate": lr, "num_steps": n, "avg_safe": safe,
                                "avg_gen": gen}
  grid = [g(1e-3, 640, 0.9, 0.1), g(5e-4, 640, 0.85, 0.9), g(1e-3, 320, 0.81, 0.2),
          g(5e-4, 320, 0.5, 0.95)]
  pick, why = experiment.choose_recipe_point(grid, 0.8)
  assert (pick["learning_rate"], pick["num_steps"]) == (1e-3, 320)  # cheapest that aligns
  assert "reaches 0.8" in why and "not consulted" in why
  pick, why = experiment.choose_recipe_point(grid, 0.95)
  assert (pick["learning_rate"], pick["num_steps"]) == (1e-3, 640) and "no grid point" in why
  tie = [g(1e-3, 640, 0.0, 0.5), g(1e-3, 320, 0.0, 0.1), g(5e-4, 320, 0.0, 0.2)]
  assert experiment.choose_recipe_point(tie, 0.8)[0]["learning_rate"] == 5e-4
