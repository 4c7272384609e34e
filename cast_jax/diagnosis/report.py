"""The conflict map as files (CAST section 3.4-3.5, issue 9 item 7): one JSON record per run
with every per-head number, the M equal buckets, layers x heads heatmaps and a short summary.

`conflict_map` and `bucket_record` are pure functions from the library's outputs (arrays in,
JSON-ready dicts out); `write_report` writes them, each file atomically (`cast_jax.workdir`),
so a killed run never leaves a half-written artifact.

Units: the map is over the units of the diagnosed projection (`diagnosis.targets`): query heads
for target q / o (unit "head"), KV heads for k / v (unit "kv_head"). Tables are [L, U]; a unit
is addressed as (layer, unit), both 0-based, and "flat" indices are layer * U + unit, as in
`scores.ranking`. The record names the target and the unit; "num_heads" / "num_heads_total"
(kept for the paper's q case) count units, the same as "num_units" / "num_units_total", and
"unit_query_heads" lists the query heads ablating each unit removes.

Buckets follow `scores.buckets`: heads sorted by C descending (ties by flat index ascending);
bucket i (B1 = highest C) takes sorted positions [floor((i-1) N / M), floor(i N / M)), so when
M does not divide N the sizes differ by at most one and the larger buckets are spread evenly.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from cast_jax import workdir as wd
from cast_jax.diagnosis import scores as scores_lib

BUCKET_RULE = ("heads sorted by C descending, ties by flat index (layer * H + head) ascending; "
               "bucket i (1-based, B1 = highest C) takes sorted positions "
               "[floor((i-1) N / M), floor(i N / M)), so sizes differ by at most one when M does "
               "not divide N")
PER_HEAD_FIELDS = ("cos", "o", "conflict_fraction_safe", "conflict_fraction_util", "h_gen",
                   "h_safe", "rank_gen", "rank_safe", "s", "c", "bucket")


UNIT_LABELS = {"head": "H", "kv_head": "KV"}


def _flat_heads(order: np.ndarray, num_heads: int) -> list[list[int]]:
  return [[int(i) // num_heads, int(i) % num_heads] for i in order]


def _check_unit(unit: str, group: int) -> None:
  if unit not in UNIT_LABELS:
    raise ValueError(f"unit={unit!r}: use one of {', '.join(UNIT_LABELS)}")
  if isinstance(group, bool) or not isinstance(group, int) or group < 1:
    raise ValueError(f"group={group!r}: use an integer >= 1 (query heads per unit)")


def conflict_map(scores: scores_lib.ConflictScores, cos, fraction_safe, fraction_util, *,
                 base_accuracy: float, base_refusal_rate: float, num_buckets: int,
                 model: Mapping[str, Any], calibration: Mapping[str, Any], target: str = "q",
                 unit: str = "head", group: int = 1) -> dict[str, Any]:
  """The conflict-map record: run metadata plus every per-unit table as nested lists [L][U].

  Args:
    scores: `scores.score_heads(o, h_gen, h_safe, m=num_buckets)`, tables [L, U].
    cos: [L, U] cosine of the set gradients of L_safe and L_util (`optimization_conflict`).
    fraction_safe: [L, U] fraction of D_safe examples whose own gradient has cos < 0 with the
      L_util set gradient (`conflict_fraction`); fraction_util: the same for D_util vs L_safe.
    base_accuracy, base_refusal_rate: the unablated model on D_util / D_safe.
    num_buckets: M, as used for `scores.bucket`.
    model: e.g. {"name": ..., "num_layers": L, "num_heads": H, ...}.
    calibration: sizes and settings (n_safe, n_util, seed, gen_len, ...).
    target: the diagnosed projection, "q" | "k" | "v" | "o" (recorded as given).
    unit: "head" (q / o) or "kv_head" (k / v); group: query heads one unit's ablation zeroes.
  Returns:
    JSON-ready dict: "model", "calibration", "base", "target", "unit", "num_units(_total)",
    "num_heads(_total)" (= units, module doc), "unit_query_heads", "num_buckets",
    "bucket_rule", "heads" {field: [L][U]} for PER_HEAD_FIELDS, and "rankings" {"c", "o", "s"}
    as lists of [layer, unit], highest first.
  """
  _check_unit(unit, group)
  L, H = np.shape(scores.c)
  tables = {"cos": cos, "o": scores.o, "conflict_fraction_safe": fraction_safe,
            "conflict_fraction_util": fraction_util, "h_gen": scores.h_gen,
            "h_safe": scores.h_safe, "rank_gen": scores.rank_gen, "rank_safe": scores.rank_safe,
            "s": scores.s, "c": scores.c, "bucket": scores.bucket}
  heads = {}
  for name in PER_HEAD_FIELDS:
    a = np.asarray(tables[name])
    if a.shape != (L, H):
      raise ValueError(f"conflict_map: {name} has shape {a.shape}, want {(L, H)}")
    heads[name] = a.astype(np.int64 if name == "bucket" else np.float64).tolist()
  return {
      "model": dict(model), "calibration": dict(calibration),
      "base": {"accuracy": float(base_accuracy), "refusal_rate": float(base_refusal_rate)},
      "target": str(target), "unit": unit, "num_layers": int(L), "num_units": int(H),
      "num_units_total": int(L * H), "num_heads": int(H), "num_heads_total": int(L * H),
      "unit_query_heads": [list(range(u * group, (u + 1) * group)) for u in range(H)],
      "num_buckets": int(num_buckets), "bucket_rule": BUCKET_RULE, "heads": heads,
      "rankings": {k: _flat_heads(getattr(scores, f"ranking_{k}"), H) for k in ("c", "o", "s")},
  }


def bucket_record(c, num_buckets: int, unit: str = "head") -> dict[str, Any]:
  """buckets.json: the M equal buckets of units by C (rule in the module doc).

  Args: c [L, U] conflict scores; num_buckets M with 1 <= M <= L * U; unit as `conflict_map`.
  Returns: {"num_buckets", "unit", "num_units_total", "num_heads_total" (the same), "rule",
  "buckets": [{"bucket": i, "size", "heads": [[layer, unit], ...] in descending C, "c": [...],
  "c_min", "c_max"}, ...]}.
  """
  _check_unit(unit, 1)
  c = np.asarray(c, np.float64)
  H = c.shape[-1]
  flat = c.reshape(-1)
  out = []
  for i, heads in enumerate(scores_lib.buckets(c, num_buckets)):
    vals = flat[heads]
    out.append({"bucket": i + 1, "size": int(heads.size), "heads": _flat_heads(heads, H),
                "c": vals.tolist(), "c_max": float(vals.max()), "c_min": float(vals.min())})
  return {"num_buckets": int(num_buckets), "unit": unit, "num_units_total": int(flat.size),
          "num_heads_total": int(flat.size), "rule": BUCKET_RULE, "buckets": out}


def _fmt_heads(record: Mapping[str, Any], k: int, top: bool) -> str:
  c = np.asarray(record["heads"]["c"])
  order = record["rankings"]["c"]
  picked = order[:k] if top else order[::-1][:k]
  label = UNIT_LABELS[record.get("unit", "head")]
  return ", ".join(f"L{l}{label}{h} ({c[l, h]:.3f})" for l, h in picked)


def _base_safety(record: Mapping[str, Any]) -> str:
  base = record["base"]
  parts = []
  if base.get("refusal_rate") is not None:
    parts.append(f"D_safe refusal rate {base['refusal_rate']:.3f}")
  if base.get("refusal_logprob_per_token") is not None:
    parts.append(f"D_safe refusal log-prob per target token "
                 f"{base['refusal_logprob_per_token']:.3f}")
  return ", ".join(parts) + "."


def summary_markdown(record: Mapping[str, Any], times_s: Mapping[str, float] | None = None,
                     k: int = 5) -> str:
  """summary.md text: base metrics, the spread of C (min / quartiles / max, std, max/min),
  the top and bottom k heads by C, the teacher-forced proxy's Spearman when the record has
  one ("proxy_spearman"), and seconds per stage."""
  c = np.asarray(record["heads"]["c"], np.float64)
  q = np.quantile(c, [0.0, 0.25, 0.5, 0.75, 1.0])
  ratio = f"{q[4] / q[0]:.2f}" if q[0] > 0 else "inf"
  model = record["model"]
  cal = record["calibration"]
  unit = record.get("unit", "head")
  what = "query heads" if unit == "head" else "KV heads"
  lines = [
      "# Conflict map summary", "",
      f"Model: `{model.get('name', '?')}`; target `{record.get('target', 'q')}` projection, "
      f"{record['num_layers']} layers x {record['num_heads']} {what} = "
      f"{record['num_heads_total']} units ({unit}).",
      "Calibration: " + ", ".join(f"{k_}={v}" for k_, v in sorted(cal.items())) + ".",
      f"Base model: D_util accuracy {record['base']['accuracy']:.3f}, " + _base_safety(record),
      "",
      "## Spread of C = O * S", "",
      "| min | q25 | median | q75 | max | std | max/min |", "|---|---|---|---|---|---|---|",
      "| " + " | ".join(f"{v:.4f}" for v in q) + f" | {c.std():.4f} | {ratio} |", "",
      f"Top {k} units by C (Risky Zone): {_fmt_heads(record, k, True)}.", "",
      f"Bottom {k} units by C (Safe Zone): {_fmt_heads(record, k, False)}.", "",
      f"Buckets: M = {record['num_buckets']}; {record['bucket_rule']}.",
  ]
  rho = record.get("proxy_spearman")
  if rho is not None:
    r = rho["spearman_teacher_forced_vs_generation_h_safe"]
    lines += ["", "## Teacher-forced safety proxy", "",
              "Spearman rank correlation of H_safe from refusal-opening log-probs vs. from "
              f"generated refusals: {'undefined (a constant table)' if r is None else f'{r:.3f}'}"
              f"; S and C use the {rho['used_in_s_and_c']} H_safe."]
  if times_s:
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {float(t):.1f} |" for name, t in times_s.items()]
  return "\n".join(lines) + "\n"


def heatmap_figure(table, title: str, unit: str = "head"):
  """A matplotlib figure of a [L, U] table: layers on the y axis (0 at the top), units on x."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  t = np.asarray(table, np.float64)
  L, H = t.shape
  fig, ax = plt.subplots(figsize=(min(2 + 0.35 * H, 16), min(1.5 + 0.3 * L, 14)))
  im = ax.imshow(t, aspect="auto", cmap="viridis", interpolation="nearest")
  ax.set(title=title, xlabel=unit.replace("_", " "), ylabel="layer")
  fig.colorbar(im, ax=ax)
  return fig


def write_report(out_dir: str, record: Mapping[str, Any], buckets: Mapping[str, Any],
                 times_s: Mapping[str, float] | None = None) -> dict[str, str]:
  """Writes conflict_map.json, buckets.json, heatmap_{c,o,s}.png and summary.md into out_dir,
  each atomically. Returns {artifact name: path}."""
  paths = {"conflict_map": wd.write_json(os.path.join(out_dir, "conflict_map.json"), record),
           "buckets": wd.write_json(os.path.join(out_dir, "buckets.json"), buckets)}
  titles = {"c": "conflict score C = O * S", "o": "optimization conflict O",
            "s": "functional sensitivity S"}
  target = record.get("target", "q")
  unit = record.get("unit", "head")
  for key, title in titles.items():
    fig = heatmap_figure(record["heads"][key], f"{title} (target {target})", unit)
    paths[f"heatmap_{key}"] = wd.save_figure(fig, os.path.join(out_dir, f"heatmap_{key}.png"))
  text = summary_markdown(record, times_s)
  paths["summary"] = wd.atomic_write_bytes(os.path.join(out_dir, "summary.md"), text.encode())
  return paths
