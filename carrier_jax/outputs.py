"""What an LCDD run leaves behind (issue 11, item 6): the carrier, the merged model, the active
channels, sparsity two ways, and plots.

  carrier/                orbax pytree {"carrier": {"gates", "delta"}, "controller": {...}}
  lcdd_model/             the merged model W_base + (m_row (x) m_col) * dW as an HF checkpoint
  active_channels.json    {group: [indices on, per layer]} (q / k / v flat as h * Dh + d)
  sparsity.json           `sparsity_report` plus the final controller values
  sparsity_per_layer.png  both sparsity measures per layer
  controller_curves.png   lambda, EMA / budget / task loss and gate sparsity per logged step

Sparsity is reported two ways (lcdd-sft-eraser.md 4 reports the first): `gate_sparsity`, the
fraction of gate elements off, and `delta_sparsity`, the fraction of the gated dW entries masked
out (m_row[i] * m_col[j] = 0). Norm deltas (ungated, `train_norms=True`) count in neither.
Every writer is atomic and refuses to replace existing output unless `overwrite=True`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from carrier_jax.delta import (GATE_GROUPS, NORM_WEIGHTS, active_channels, carrier_stats,
                               merge_carrier)
from carrier_jax.multiplier import MultiplierState
from cast_jax import workdir as wd
from cast_jax.models import ModelConfig
from cast_jax.train.checkpoint import export_hf, load_pytree, save_pytree

Params = dict[str, Any]
CURVE_KEYS = ("extra/multiplier/lam", "extra/multiplier/ema", "extra/multiplier/budget",
              "task_loss", "active_gates")


def _fractions(active: np.ndarray, total: int) -> dict[str, Any]:
  """Off-fraction per layer and overall from per-layer active counts of `total` elements each."""
  active = np.asarray(active, np.int64)
  return {"per_layer": (1.0 - active / total).tolist(),
          "overall": float(1.0 - active.sum() / (total * active.shape[0])),
          "active": int(active.sum()), "total": int(total * active.shape[0])}


def sparsity_report(carrier: Params) -> dict[str, Any]:
  """Sparsity of a carrier two ways, per layer and overall (host numpy, exact counts).

  Args:
    carrier: {"gates", "delta"} with leading L axes.

  Returns:
    {"gate_sparsity": S, "delta_sparsity": S, "gate_groups": {group: S},
     "delta_params": {name: S}, "train_norms": bool}, where each S is
    {"per_layer": [L floats, fraction off], "overall": float, "active": int, "total": int}.
  """
  s = carrier_stats(carrier)
  return {
      "gate_sparsity": _fractions(s["active_gates_layer"], s["num_gates_layer"]),
      "delta_sparsity": _fractions(s["active_delta_layer"], s["num_delta_layer"]),
      "gate_groups": {g: _fractions(s["active_gates"][g], s["num_gates"][g])
                      for g in GATE_GROUPS},
      "delta_params": {n: _fractions(a, s["num_delta"][n]) for n, a in s["active_delta"].items()},
      "train_norms": any(n in NORM_WEIGHTS for n in carrier["delta"]),
  }


def _controller_dict(controller: MultiplierState | Mapping[str, Any]) -> dict[str, Any]:
  return dict(controller._asdict() if isinstance(controller, MultiplierState) else controller)


def save_carrier(path: str | os.PathLike, carrier: Params,
                 controller: MultiplierState | Mapping[str, Any], *,
                 overwrite: bool = False) -> str:
  """Writes {"carrier": carrier, "controller": the controller's fields} as an orbax pytree.

  Args:
    path: the orbax dir (created atomically; see `cast_jax.train.save_pytree`).
    carrier: {"gates", "delta"} with leading L axes.
    controller: the MultiplierState (e.g. `find_multiplier_state(state.opt_state)`) or its dict.
    overwrite: replace an existing carrier dir.

  Returns:
    the absolute path.
  """
  return save_pytree(path, {"carrier": carrier, "controller": _controller_dict(controller)},
                     overwrite=overwrite)


def load_carrier(path: str | os.PathLike) -> tuple[Params, dict[str, Any]]:
  """Reads `save_carrier`'s dir -> (carrier, controller dict of scalars)."""
  tree = load_pytree(path)
  return tree["carrier"], tree["controller"]


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The rows of a metrics.jsonl (blank or cut-short lines skipped)."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def plot_layer_sparsity(report: Mapping[str, Any], path: str | os.PathLike) -> str:
  """Bar chart of both sparsity measures per layer (from `sparsity_report`) as a PNG."""
  from matplotlib.figure import Figure

  gate, delta = report["gate_sparsity"]["per_layer"], report["delta_sparsity"]["per_layer"]
  x = np.arange(len(gate))
  fig = Figure(figsize=(max(5.0, 0.5 * len(gate)), 3.5))
  ax = fig.subplots()
  ax.bar(x - 0.2, gate, 0.4, label="gate elements off")
  ax.bar(x + 0.2, delta, 0.4, label="dW entries masked")
  ax.set(xlabel="layer", ylabel="sparsity (fraction)", ylim=(0, 1), xticks=x)
  ax.legend()
  return wd.save_figure(fig, path)


def plot_controller_curves(rows: list[Mapping[str, Any]], num_gates: int,
                           path: str | os.PathLike) -> str:
  """lambda, EMA / budget / task loss and gate sparsity against the step, as a PNG.

  Args:
    rows: metrics.jsonl rows (`read_metrics`) of an LCDD run (`make_lcdd_train_step` metrics).
    num_gates: total gate elements, for sparsity = 1 - active_gates / num_gates.
    path: the PNG.
  """
  from matplotlib.figure import Figure

  rows = [r for r in rows if all(k in r for k in CURVE_KEYS)]
  step = [r["step"] for r in rows]
  col = lambda k: [r[k] for r in rows]
  fig = Figure(figsize=(12, 3.2))
  a, b, c = fig.subplots(1, 3)
  lam = col("extra/multiplier/lam")
  a.plot(step, lam)
  # lambda moves multiplicatively; a log axis needs it positive (lambda_min may be 0).
  a.set(title="lambda", xlabel="step", yscale="log" if lam and min(lam) > 0 else "linear")
  b.plot(step, col("task_loss"), alpha=0.4, label="task loss")
  b.plot(step, col("extra/multiplier/ema"), label="EMA")
  # The budget is 0 until it is fixed at the end of the warmup.
  b.plot(step, [v if v > 0 else np.nan for v in col("extra/multiplier/budget")], "--",
         label="budget")
  b.set(title="task loss", xlabel="step")
  b.legend()
  c.plot(step, [1 - g / num_gates for g in col("active_gates")])
  c.set(title="gate sparsity", xlabel="step", ylim=(0, 1))
  return wd.save_figure(fig, path)


def write_outputs(out_dir: str | os.PathLike, *, config: ModelConfig, base_params: Params,
                  carrier: Params, controller: MultiplierState | Mapping[str, Any],
                  metrics_path: str | os.PathLike | None = None, dtype: Any = None,
                  overwrite: bool = False) -> dict[str, str]:
  """Writes every artifact listed in the module docstring into `out_dir`.

  Args:
    out_dir: the output dir (created).
    config, base_params: the base model (docs/design.md layout).
    carrier: the trained carrier; controller: its final MultiplierState (or dict).
    metrics_path: the run's metrics.jsonl for the curves (None: no curves plot).
    dtype: storage dtype of the HF export (None: the params' dtype).
    overwrite: replace existing carrier / model dirs (the JSON and PNGs are always rewritten).

  Returns:
    {artifact name: path}.
  """
  out = os.fspath(out_dir)
  os.makedirs(out, exist_ok=True)
  report = sparsity_report(carrier)
  ctrl = {k: np.asarray(v).item() for k, v in _controller_dict(controller).items()}
  paths = {
      "carrier": save_carrier(os.path.join(out, "carrier"), carrier, controller,
                              overwrite=overwrite),
      "lcdd_model": export_hf(merge_carrier(base_params, carrier), config,
                              os.path.join(out, "lcdd_model"), dtype=dtype, overwrite=overwrite),
      "active_channels": wd.write_json(os.path.join(out, "active_channels.json"),
                                       active_channels(carrier)),
      "sparsity": wd.write_json(os.path.join(out, "sparsity.json"),
                                {**report, "controller": ctrl}),
      "sparsity_plot": plot_layer_sparsity(report, os.path.join(out, "sparsity_per_layer.png")),
  }
  if metrics_path is not None and os.path.exists(metrics_path):
    paths["controller_curves"] = plot_controller_curves(
        read_metrics(metrics_path), report["gate_sparsity"]["total"],
        os.path.join(out, "controller_curves.png"))
  return paths
