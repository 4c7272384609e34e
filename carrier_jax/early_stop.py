"""When LCDD stops (lcdd-sft-eraser.md 3.2: "training halts when carrier sparsity stalls across
consecutive checkpoints or when utility degradation exceeds a threshold").

The paper gives no formula; these are the issue's two rules, over the metric rows the train loop
logs (one per log step, the rows of metrics.jsonl) after the warmup (budget fixed, > 0):
  * sparsity stall: the active-gate count fell by less than `stall_ratio` of its value
    `window` rows earlier, on `patience` consecutive rows. The rule arms only once the count
    has fallen `arm_ratio` below its first post-warmup value, and its windows start there:
    before any gate closed, the controller is still ramping lambda (with lambda_0 = 0.01 and a
    small eta_up that takes hundreds of steps on the testbed), which is not a stall;
  * budget breach: the median task loss of the last `window` rows exceeds the warmup baseline
    Lhat_{T_w} = budget / (1 + r) by more than `breach_ratio` of it;
  * empty carrier (`stop_when_empty`): every gate is off on the last row, warmup or not. The
    carrier is then the base model, the loss can no longer move the gates' Heaviside forward,
    and with lambda_max = inf nothing brings them back.

Each rule has its own switch (`StopConfig.stall_ratio` / `breach_ratio` None, or
`stop_config(stall_enabled=False / breach_enabled=False)`, the launch config's
`stop.stall_enabled` / `stop.breach_enabled` under the master `stop.enabled`). When both fire on
the same row, the reason names both ("budget_breach: ...; sparsity_stall: ...").

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

  stall_ratio or breach_ratio None disables that rule; stop_when_empty the empty-carrier rule;
  arm_ratio 0 arms the stall rule from the first post-warmup row.
  """

  window: int = 5
  stall_ratio: float | None = 0.01
  patience: int = 3
  breach_ratio: float | None = 0.5
  stop_when_empty: bool = True
  arm_ratio: float = 0.01

  def __post_init__(self):
    if int(self.window) != self.window or self.window < 1:
      raise ValueError(f"StopConfig.window={self.window!r}: use an integer >= 1.")
    if int(self.patience) != self.patience or self.patience < 1:
      raise ValueError(f"StopConfig.patience={self.patience!r}: use an integer >= 1.")
    if not 0 <= self.arm_ratio < 1:
      raise ValueError(f"StopConfig.arm_ratio={self.arm_ratio!r}: use a value in [0, 1).")
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
    "budget_breach: ...", "sparsity_stall: ..." or "empty_carrier: ..." (one-line
    explanations), joined by "; " when several rules fire, or None.
  """
  rows = list(rows)
  post = [r for r in rows if float(r.get(BUDGET_KEY, 0.0)) > 0]
  w = cfg.window
  reasons = []
  if cfg.stop_when_empty and rows and float(rows[-1]["active_gates"]) == 0:
    reasons.append(f"empty_carrier: every gate is off at step {rows[-1].get('step')} (the "
                   "model is the base model; lower lambda_init / eta or raise the budget)")
  if cfg.breach_ratio is not None and len(post) >= w:
    baseline = float(post[-1][BUDGET_KEY]) / (1 + budget_ratio)
    median = statistics.median(float(r["task_loss"]) for r in post[-w:])
    if median > baseline * (1 + cfg.breach_ratio):
      reasons.append(f"budget_breach: median task loss {median:.4g} over the last {w} "
                     f"evaluations exceeds the warmup baseline {baseline:.4g} by more than "
                     f"{cfg.breach_ratio:g}")
  if cfg.stall_ratio is not None and post:
    active = [float(r["active_gates"]) for r in post]
    armed = 0 if cfg.arm_ratio == 0 else next(
        (i for i, a in enumerate(active) if a < active[0] * (1 - cfg.arm_ratio)), len(active))
    active = active[armed:]
    n = len(active)

    def stalled(i):
      before = active[i - w]
      return before - active[i] < cfg.stall_ratio * before

    if n >= w + cfg.patience and all(stalled(i) for i in range(n - cfg.patience, n)):
      reasons.append(f"sparsity_stall: active gates {active[n - 1 - w]:.0f} -> "
                     f"{active[-1]:.0f} over {w} evaluations, a drop under {cfg.stall_ratio:g} "
                     f"on {cfg.patience} evaluations in a row (step {post[-1].get('step')})")
  return "; ".join(reasons) or None


def stop_config(*, enabled: bool = True, stall_enabled: bool = True,
                breach_enabled: bool = True, **fields) -> StopConfig | None:
  """A StopConfig from the launch config's switches, or None when nothing can stop the run.

  Args:
    enabled: the master switch (False: None, whatever the others say).
    stall_enabled, breach_enabled: each rule's switch (False sets its ratio to None).
    **fields: StopConfig fields (window, stall_ratio, patience, breach_ratio).
  """
  if not enabled:
    return None
  if not stall_enabled:
    fields["stall_ratio"] = None
  if not breach_enabled:
    fields["breach_ratio"] = None
  cfg = StopConfig(**fields)
  idle = cfg.stall_ratio is None and cfg.breach_ratio is None and not cfg.stop_when_empty
  return None if idle else cfg


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
