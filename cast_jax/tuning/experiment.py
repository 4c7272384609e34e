"""The CAST experiment's plan, tables and plots (cast.md Tables 1, 2, 7, 8, 9; Figures 3-6), as
pure functions of per-run evaluations. The driver is launch/cast_experiment.py.

Inputs: `evals[seed][run name]` = a run's eval.json (fractions, `tuning.evaluation`), and the
base model's eval.json (`base[seed]`, the same for every seed: greedy decoding, no training).

Per seed, every metric is turned into percent (the paper's units) and the costs are added:
  UCR     = metrics.utility_cost_ratio(base avg_gen, avg_gen, base avg_safe, avg_safe)   (Eq. 7)
  MMLU-CR = metrics.mmlu_cost_ratio(base mmlu, mmlu, base avg_safe, avg_safe)            (Eq. 8)
A cost is undefined (NaN, stored null) when the run's Avg Safe gain over the base is under
MIN_SAFETY_GAIN percentage points (`metrics.utility_cost_ratio(min_gain=)`: the paper's eps
would price "utility lost, no safety gained" at loss / 1e-8). Every table cell is then mean +-
std over the seeds where it is defined (sample std, ddof 1; "n/a" for one seed; `n` says how
many). Costs are per-seed ratios averaged, not ratios of averaged metrics.

Table 8 correlates, per seed, the bucket-mean score (C, or O / S for the F.1 rankings; buckets
drawn by that score) with each bucket's UCR / MMLU-CR over the M buckets, then averages r over
seeds. It uses the buckets whose cost is defined and needs 3 of them; an undefined r (fewer
buckets, or a constant cost column, e.g. every UCR clipped to 0) is NaN, stored null.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from cast_jax.eval import metrics as em
from cast_jax.tuning import evaluation

# Avg Safe gain (percentage points) below which UCR / MMLU-CR are undefined (module doc).
MIN_SAFETY_GAIN = 1.0

COLUMNS = (("mmlu", "MMLU"), ("csqa", "CSQA"), ("gsm8k", "GSM8K"),
           ("refusal_vanilla", "Vanilla harm"), ("refusal_adversarial", "Adv harm"),
           ("over_refusal", "Over-refusal"), ("avg_gen", "Avg Gen"), ("avg_safe", "Avg Safe"),
           ("ucr", "UCR"), ("mmlu_cr", "MMLU-CR"))
RANKING_NAMES = {"c": "Unified conflict C", "o": "Gradient score O", "s": "Sensitivity score S"}
PCG_SETS = {"full": ("all", "FULL-PCG"), "random": (None, "Random-PCG"),
            "risky": ("bucket:1", "CAST-PCG (Risky, B1)"), "safe": (None, "CAST-PCG (Safe, BM)")}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One planned run. name: its dir under runs/seed<S>/; head_set: a `runner.head_set_mask`
  spec; ranking: the score it ranks by ("" for all / random); pcgrad: None or a mode."""
  name: str
  label: str
  head_set: str
  ranking: str = "c"
  pcgrad: str | None = None


def plan_runs(num_buckets: int, num_heads_total: int, *, fractions: Sequence[int] = (50, 75),
              rankings: Sequence[str] = ("c",), pcgrad_sets: Sequence[str] = (),
              pcgrad_mode: str = "one_sided") -> list[RunSpec]:
  """Every run of one seed: Full SFT, Random (budget-matched to bucket M), the M buckets of each
  ranking, the Top-p / Bottom-p trajectories (C; p in percent), and the PCGrad runs
  (`pcgrad_sets` from PCG_SETS' keys)."""
  m = int(num_buckets)
  if not 1 <= m <= num_heads_total:
    raise ValueError(f"num_buckets={num_buckets!r}: use 1..{num_heads_total} (the heads).")
  safe_size = num_heads_total - (num_heads_total * (m - 1)) // m  # bucket M's size
  random_spec = f"random:n={safe_size}"
  specs = [RunSpec("full", "FULL-SFT", "all", ""),
           RunSpec("random", f"Random-SFT ({safe_size} heads)", random_spec, "")]
  for r in rankings:
    if r not in RANKING_NAMES:
      raise ValueError(f"ranking {r!r}: use one of {sorted(RANKING_NAMES)}.")
    specs += [RunSpec(f"{r}_b{b}", f"{r.upper()} bucket B{b}", f"bucket:{b}", r)
              for b in range(1, m + 1)]
  for p in fractions:
    if not (isinstance(p, (int, float)) and 0 < p <= 100):
      raise ValueError(f"sparsity fraction {p!r}: use a percentage in (0, 100].")
    specs += [RunSpec(f"top{p:g}", f"Top-{p:g}%", f"top:{p:g}"),
              RunSpec(f"bottom{p:g}", f"Bottom-{p:g}%", f"bottom:{p:g}")]
  for key in pcgrad_sets:
    if key not in PCG_SETS:
      raise ValueError(f"PCGrad run {key!r}: use any of {sorted(PCG_SETS)}.")
    spec, label = PCG_SETS[key]
    spec = {"random": random_spec, "safe": f"bucket:{m}"}.get(key, spec)
    specs.append(RunSpec(f"pcg_{key}", label, spec, "" if key in ("full", "random") else "c",
                         pcgrad_mode))
  return specs


def dedupe(keys: Sequence[tuple[str, bytes]]) -> dict[str, str]:
  """{run name: the first run name with the same key} (e.g. Top-25% and B1 with M = 4 are the
  same head set: train it once). keys: (name, key bytes), in plan order."""
  first: dict[bytes, str] = {}
  return {name: first.setdefault(key, name) for name, key in keys}


def derived(run: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
  """One seed's row: COLUMNS' metrics in percent plus UCR and MMLU-CR (module doc)."""
  run, base = evaluation.with_averages(dict(run)), evaluation.with_averages(dict(base))
  out = {k: 100.0 * float(run[k]) for k, _ in COLUMNS if k not in ("ucr", "mmlu_cr")}
  b = {k: 100.0 * float(base[k]) for k in ("avg_gen", "avg_safe", "mmlu")}
  out["ucr"] = em.utility_cost_ratio(b["avg_gen"], out["avg_gen"], b["avg_safe"], out["avg_safe"],
                                     min_gain=MIN_SAFETY_GAIN)
  out["mmlu_cr"] = em.mmlu_cost_ratio(b["mmlu"], out["mmlu"], b["avg_safe"], out["avg_safe"],
                                      min_gain=MIN_SAFETY_GAIN)
  return out


def cell(values: Sequence[float]) -> dict:
  """{"mean", "std", "n", "values"} over the seeds where the value is defined (n of them); NaN ->
  None (JSON null); mean None when none is defined, std None for n < 2."""
  v = [float(x) for x in values]
  clean = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else x
  ok = [x for x in v if not math.isnan(x)]
  if not ok:
    return {"mean": None, "std": None, "n": 0, "values": [None] * len(v)}
  s = em.mean_std(ok)
  return {"mean": s.mean, "std": clean(s.std), "n": s.n, "values": [clean(x) for x in v]}


def _row(label: str, run: str, per_seed: Sequence[Mapping[str, float]], columns) -> dict:
  return {"label": label, "run": run,
          "cells": {k: cell([r[k] for r in per_seed]) for k in columns}}


def _seeds(evals: Mapping) -> list:
  return sorted(evals)


def _per_seed(evals, base, name) -> list[dict]:
  return [derived(evals[s][name], base[s]) for s in _seeds(evals)]


def method_table(title: str, evals: Mapping, base: Mapping, rows: Sequence[tuple[str, str]]
                 ) -> dict:
  """A Table-1/2-style table: rows (label, run name; "base" = the base model) x COLUMNS."""
  cols = [k for k, _ in COLUMNS]
  out = []
  for label, name in rows:
    per_seed = ([derived(base[s], base[s]) for s in _seeds(evals)] if name == "base"
                else _per_seed(evals, base, name))
    out.append(_row(label, name, per_seed, cols))
  return {"title": title, "columns": cols, "labels": dict(COLUMNS), "rows": out,
          "seeds": _seeds(evals)}


def bucket_scores(score, num_buckets: int) -> list[float]:
  """Mean score of each of the M buckets drawn by that score (B1 first): the paper's Avg Conf."""
  from cast_jax.diagnosis import scores
  flat = np.asarray(score, np.float64).reshape(-1)
  return [float(flat[b].mean()) for b in scores.buckets(score, num_buckets)]


def bucket_table(evals: Mapping, base: Mapping, tables: Mapping[str, np.ndarray],
                 num_buckets: int) -> dict:
  """Table 7: per ranking and bucket, the bucket-mean score ("avg_score") and COLUMNS."""
  cols = ["avg_score"] + [k for k, _ in COLUMNS]
  rows = []
  for r, score in tables.items():
    avg = bucket_scores(score, num_buckets)
    for b in range(1, num_buckets + 1):
      row = _row(f"{RANKING_NAMES[r]} B{b}", f"{r}_b{b}", _per_seed(evals, base, f"{r}_b{b}"),
                 cols[1:])
      row["cells"] = {"avg_score": cell([avg[b - 1]] * len(_seeds(evals))), **row["cells"]}
      row["ranking"], row["bucket"] = r, b
      rows.append(row)
  return {"title": "Table 7: buckets by score (B1 = highest)", "columns": cols,
          "labels": {"avg_score": "Avg score", **dict(COLUMNS)}, "rows": rows,
          "seeds": _seeds(evals)}


def correlation_table(evals: Mapping, base: Mapping, tables: Mapping[str, np.ndarray],
                      num_buckets: int) -> dict:
  """Table 8: per ranking, Pearson / Spearman of bucket-mean score with UCR and MMLU-CR."""
  cols = ["pearson_ucr", "spearman_ucr", "pearson_mmlu_cr", "spearman_mmlu_cr"]
  rows = []
  for r, score in tables.items():
    x = np.asarray(bucket_scores(score, num_buckets))
    per_seed = []
    for s in _seeds(evals):
      d = [derived(evals[s][f"{r}_b{b}"], base[s]) for b in range(1, num_buckets + 1)]
      got = {}
      for cost in ("ucr", "mmlu_cr"):
        y = np.asarray([row[cost] for row in d], np.float64)
        ok = np.isfinite(y)
        enough = ok.sum() >= 3
        got[f"pearson_{cost}"] = em.pearson(x[ok], y[ok]) if enough else float("nan")
        got[f"spearman_{cost}"] = em.spearman(x[ok], y[ok]) if enough else float("nan")
      per_seed.append(got)
    row = _row(RANKING_NAMES[r], r, per_seed, cols)
    row["ranking"] = r
    rows.append(row)
  return {"title": "Table 8: bucket-mean score vs. realised cost (r per seed, mean +- std)",
          "columns": cols, "labels": {"pearson_ucr": "UCR Pearson",
                                      "spearman_ucr": "UCR Spearman",
                                      "pearson_mmlu_cr": "MMLU-CR Pearson",
                                      "spearman_mmlu_cr": "MMLU-CR Spearman"},
          "rows": rows, "seeds": _seeds(evals)}


def _fmt(c: dict, digits: int) -> str:
  if c["mean"] is None:
    return "n/a"
  if c["std"] is None:
    return f"{c['mean']:.{digits}f}"
  return f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"


def table_markdown(table: Mapping) -> str:
  """A table dict (any of the builders above) as markdown: 'mean ± std' per cell."""
  cols = table["columns"]
  lines = [f"### {table['title']}", "",
           f"Seeds: {', '.join(str(s) for s in table['seeds'])} (mean ± sample std over seeds).",
           "", "| Method | " + " | ".join(table["labels"][k] for k in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
  for row in table["rows"]:
    digits = lambda k: 3 if k in ("ucr", "mmlu_cr", "avg_score") or "pearson" in k or \
        "spearman" in k else 2
    lines.append(f"| {row['label']} | " + " | ".join(_fmt(row["cells"][k], digits(k))
                                                     for k in cols) + " |")
  return "\n".join(lines) + "\n"


def _means(table: Mapping, key: str) -> tuple[list, list, list]:
  rows = [r for r in table["rows"] if r["cells"][key]["mean"] is not None]
  return ([r["label"] for r in rows], [r["cells"][key]["mean"] for r in rows],
          [r["cells"][key]["std"] or 0.0 for r in rows])


def pareto_figure(tables: Sequence[Mapping]):
  """Figures 3-4: Avg Safe (x) vs Avg Gen (y), one panel per method table, mean +- std bars."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.5), squeeze=False)
  for ax, t in zip(axes[0], tables):
    labels, xs, xe = _means(t, "avg_safe")
    _, ys, ye = _means(t, "avg_gen")
    for i, label in enumerate(labels):
      ax.errorbar(xs[i], ys[i], xerr=xe[i], yerr=ye[i], fmt="o", capsize=3, label=label)
    ax.set(title=t["title"], xlabel="Avg Safe (%)", ylabel="Avg Gen (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def correlation_figure(buckets: Mapping, correlations: Mapping, cost: str):
  """Figures 5-6: bucket-mean score (x) vs cost (y, "ucr" or "mmlu_cr"), one series per
  ranking, mean +- std over seeds, r in the legend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  name = dict(COLUMNS)[cost]
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  corr = {r["ranking"]: r["cells"] for r in correlations["rows"]}
  for r in corr:
    rows = [row for row in buckets["rows"] if row["ranking"] == r]
    x = [row["cells"]["avg_score"]["mean"] for row in rows]
    nan = lambda v: np.nan if v is None else v
    y = [nan(row["cells"][cost]["mean"]) for row in rows]
    ye = [row["cells"][cost]["std"] or 0.0 for row in rows]
    p = corr[r][f"pearson_{cost}"]["mean"]
    rho = corr[r][f"spearman_{cost}"]["mean"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    ax.errorbar(x, y, yerr=ye, fmt="o-", capsize=3,
                label=f"{RANKING_NAMES[r]} (Pearson {fmt(p)}, Spearman {fmt(rho)})")
    for row, xi, yi in zip(rows, x, y):
      if np.isfinite(yi):
        ax.annotate(f"B{row['bucket']}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
  ax.set(title=f"Bucket-mean score vs. {name}", xlabel="bucket-mean score", ylabel=name)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def choose_recipe_point(grid: Sequence[Mapping], safety_target: float) -> tuple[dict, str]:
  """The recipe rule of --choose_recipe over Full-SFT grid points {"learning_rate",
  "num_steps", "avg_safe", ...}: the fewest steps, then the lowest lr, whose Avg Safe reaches
  `safety_target`; if none does, the highest Avg Safe (ties: fewest steps, lowest lr). Utility
  is never consulted. Returns (the point, the rule as a sentence)."""
  if not grid:
    raise ValueError("choose_recipe_point: empty grid.")
  cost = lambda g: (g["num_steps"], g["learning_rate"])
  ok = sorted((g for g in grid if g["avg_safe"] >= safety_target), key=cost)
  if ok:
    return dict(ok[0]), (f"the fewest steps, then the lowest lr, whose Full-SFT held-out Avg "
                         f"Safe reaches {safety_target:g} ({ok[0]['avg_safe']:.3f}); utility "
                         "was not consulted")
  best = min(grid, key=lambda g: (-g["avg_safe"], *cost(g)))
  return dict(best), (f"no grid point reached Avg Safe {safety_target:g}; the highest Avg Safe "
                      f"({best['avg_safe']:.3f}) was taken; utility was not consulted")


def drift_stats(c_tables: Sequence, num_buckets: int) -> dict:
  """Conflict drift over checkpoints (issue 10 item 5): for C [L, H] at checkpoints 0..K,
  Spearman of C vs checkpoint 0 and vs the previous one, and bucket churn: the fraction of heads
  whose bucket differs from checkpoint 0's. Lists of K + 1 (the first entries are 1, 1, 0)."""
  from cast_jax.diagnosis import scores
  tabs = [np.asarray(c, np.float64) for c in c_tables]
  if not tabs:
    raise ValueError("drift_stats: no conflict tables.")
  b0 = scores.bucket_of(tabs[0], num_buckets)
  nan = lambda v: None if v != v else v
  return {"spearman_vs_first": [nan(scores.spearman(tabs[0], t)) for t in tabs],
          "spearman_vs_previous": [1.0] + [nan(scores.spearman(a, b))
                                           for a, b in zip(tabs, tabs[1:])],
          "bucket_churn": [float((scores.bucket_of(t, num_buckets) != b0).mean()) for t in tabs]}


def drift_figure(record: Mapping):
  """Drift plot: Spearman of C vs checkpoint 0 / the previous one, and bucket churn, by step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [r["step"] for r in record["checkpoints"]]
  nan = lambda v: float("nan") if v is None else v
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(steps, [nan(v) for v in record["spearman_vs_first"]], "o-",
          label="Spearman(C, C at step 0)")
  ax.plot(steps, [nan(v) for v in record["spearman_vs_previous"]], "s--",
          label="Spearman(C, C at previous checkpoint)")
  ax.plot(steps, record["bucket_churn"], "^-", label="bucket churn vs step 0")
  ax.set(title="Conflict drift during Full-SFT alignment", xlabel="train step", ylim=(-1.05, 1.05))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig
