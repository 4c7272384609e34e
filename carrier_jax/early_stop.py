"""When LCDD stops (lcdd-sft-eraser.md 3.2: "training halts when carrier sparsity stalls across
consecutive checkpoints or when utility degradation exceeds a threshold").

The paper gives no formula; these are the issue's two rules, over the metric rows the train loop
logs (one per log step, the rows of metrics.jsonl) after the warmup (budget fixed, > 0):
  * sparsity stall: the active-gate count fell by less than `stall_ratio` of its value
    `window` rows earlier, on `patience` consecutive rows;
  * budget breach: the median task loss of the last `window` rows exceeds the warmup baseline
    Lhat_{T_w} = budget / (1 + r) by more than `breach_ratio` of it.

`stop_reason` is a pure function of the rows, so a resumed run decides exactly as an
uninterrupted one when `make_stop_fn` is seeded with the rows already in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Iterable, Mapping

BUDGET_KEY = "extra/multiplier/budget"


@dataclasses.dataclass(frozen=True)
class StopConfig:
  """window, patience: in logged rows (evaluations); ratios as fractions (0.01 = 1%).

  stall_ratio or breach_ratio None disables that rule.
  """

  window: int = 5
  stall_ratio: float | None = 0.01
  patience: int = 3
  breach_ratio: float | None = 0.5

  def __post_init__(self):
    if int(self.window) != self.window or self.window < 1:
      raise ValueError(f"StopConfig.window={self.window!r}: use an integer >= 1.")
    if int(self.patience) != self.patience or self.patience < 1:
      raise ValueError(f"StopConfig.patience={self.patience!r}: use an integer >= 1.")
    for name in ("stall_ratio", "breach_ratio"):
      value = getattr(self, name)
      if value is not None and not value >= 0:
        raise ValueError(f"StopConfig.{name}={value!r}: use a value >= 0, or None.")


def stop_reason(rows: Iterable[Mapping], cfg: StopConfig, budget_ratio: float) -> str | None:
  """The reason to stop after the last of `rows`, or None.

  Args:
    rows: logged metric dicts in step order, each with "step", "active_gates", "task_loss"
      and "extra/multiplier/budget" (as `make_lcdd_train_step` logs them).
    cfg: the StopConfig.
    budget_ratio: the controller's r (budget = (1 + r) * baseline).

  Returns:
    "sparsity_stall: ..." or "budget_breach: ..." (a one-line explanation), or None.
  """
  post = [r for r in rows if float(r.get(BUDGET_KEY, 0.0)) > 0]
  w = cfg.window
  if cfg.breach_ratio is not None and len(post) >= w:
    baseline = float(post[-1][BUDGET_KEY]) / (1 + budget_ratio)
    median = statistics.median(float(r["task_loss"]) for r in post[-w:])
    if median > baseline * (1 + cfg.breach_ratio):
      return (f"budget_breach: median task loss {median:.4g} over the last {w} evaluations "
              f"exceeds the warmup baseline {baseline:.4g} by more than {cfg.breach_ratio:g}")
  if cfg.stall_ratio is not None and len(post) >= w + cfg.patience:
    active = [float(r["active_gates"]) for r in post]

    def stalled(i):
      before = active[i - w]
      return before - active[i] < cfg.stall_ratio * before

    n = len(active)
    if all(stalled(i) for i in range(n - cfg.patience, n)):
      return (f"sparsity_stall: active gates {active[n - 1 - w]:.0f} -> {active[-1]:.0f} over "
              f"{w} evaluations, a drop under {cfg.stall_ratio:g} on {cfg.patience} "
              f"evaluations in a row (step {post[-1].get('step')})")
  return None


def make_stop_fn(cfg: StopConfig, budget_ratio: float, history: Iterable[Mapping] = ()
                 ) -> Callable[[int, dict], str | None]:
  """`stop_fn(step, metrics) -> reason or None` for `cast_jax.train.train`.

  Args:
    cfg, budget_ratio: as for `stop_reason`.
    history: rows logged before this process started (metrics.jsonl up to the resumed step),
      so a resumed run sees the same window as an uninterrupted one.
  """
  rows = [dict(r) for r in history]

  def stop_fn(step, metrics):
    rows.append({"step": step, **metrics})
    return stop_reason(rows, cfg, budget_ratio)

  return stop_fn
