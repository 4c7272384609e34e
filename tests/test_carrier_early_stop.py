"""LCDD early stop (sparsity stall, budget breach) on hand-made metric rows."""

import pytest

from carrier_jax.early_stop import StopConfig, make_stop_fn, stop_config, stop_reason

# budget 4 with r = 1: the warmup baseline is 2, a breach needs a median task loss above 3.
CFG = StopConfig(window=2, stall_ratio=0.1, patience=2, breach_ratio=0.5)
R = 1.0


def _rows(active, losses, warmup=2):
  rows = [{"step": 10 * (i + 1), "active_gates": 500.0, "task_loss": 99.0,
           "extra/multiplier/budget": 0.0} for i in range(warmup)]
  rows += [{"step": 10 * (warmup + i + 1), "active_gates": a, "task_loss": l,
            "extra/multiplier/budget": 4.0} for i, (a, l) in enumerate(zip(active, losses))]
  return rows


def _first_stop(rows):
  for n in range(1, len(rows) + 1):
    reason = stop_reason(rows[:n], CFG, R)
    if reason:
      return n, reason
  return None, None


def test_sparsity_stall_needs_patience_consecutive_small_drops():
  # Drops over 2 rows: 40, 23 (>= 10% of 100, 80), then 5 < 6 and 3 < 5.7: stalled twice.
  rows = _rows([100, 80, 60, 57, 55, 54], [2.0] * 6)
  n, reason = _first_stop(rows)
  assert n == 8 and reason.startswith("sparsity_stall")
  assert "57 -> 54" in reason
  # Warmup rows (budget 0) never count: their loss of 99 is no breach.
  assert stop_reason(rows[:2], CFG, R) is None


def test_budget_breach_on_the_window_median():
  # Medians over 2 rows: 2, 2.75, 3.0 (not above 3), 3.0, 3.75 -> breach at the 5th.
  rows = _rows([100, 50, 25, 12, 6, 3], [2.0, 2.0, 3.5, 2.5, 3.5, 4.0])
  n, reason = _first_stop(rows)
  assert n == 2 + 6 and reason.startswith("budget_breach")
  assert "3.75" in reason and "baseline 2" in reason


def test_disabled_rules_never_fire():
  rows = _rows([100, 100, 100, 100, 100], [9.0] * 5)
  off = StopConfig(window=2, stall_ratio=None, patience=1, breach_ratio=None)
  assert all(stop_reason(rows[:n], off, R) is None for n in range(1, len(rows) + 1))


def test_resumed_stop_fn_decides_like_an_uninterrupted_one():
  rows = _rows([100, 80, 60, 57, 55, 54], [2.0] * 6)
  whole = make_stop_fn(CFG, R)
  uninterrupted = [whole(r["step"], r) for r in rows]
  resumed = make_stop_fn(CFG, R, history=rows[:5])
  assert [resumed(r["step"], r) for r in rows[5:]] == uninterrupted[5:]
  assert uninterrupted[-1] is not None and uninterrupted[-2] is None


def test_each_rule_has_its_own_switch_and_both_reasons_are_logged():
  # Row 8: the stall rule fires (drops 5 < 6, 3 < 5.7) and the median loss 3.75 > 3 breaches.
  rows = _rows([100, 80, 60, 57, 55, 54], [2.0, 2.0, 2.0, 2.0, 3.5, 4.0])
  fields = dict(window=2, stall_ratio=0.1, patience=2, breach_ratio=0.5)
  both = stop_config(**fields)
  assert both == CFG
  reason = stop_reason(rows, both, R)
  assert reason.startswith("budget_breach: ") and "; sparsity_stall: " in reason
  stall_only = stop_config(breach_enabled=False, **fields)
  breach_only = stop_config(stall_enabled=False, **fields)
  assert stall_only.breach_ratio is None and breach_only.stall_ratio is None
  assert stop_reason(rows, stall_only, R).startswith("sparsity_stall: ")
  assert "budget_breach" not in stop_reason(rows, stall_only, R)
  assert stop_reason(rows, breach_only, R).startswith("budget_breach: ")
  assert "sparsity_stall" not in stop_reason(rows, breach_only, R)
  # One row earlier neither fires: median 2.75 (no breach), one stalled row of patience 2.
  assert stop_reason(rows[:-1], both, R) is None
  # The master switch wins; all three rules off leaves nothing that could stop the run.
  assert stop_config(enabled=False, **fields) is None
  assert stop_config(stall_enabled=False, breach_enabled=False, stop_when_empty=False,
                     **fields) is None
  assert stop_config(stall_enabled=False, breach_enabled=False, **fields).stop_when_empty
  with pytest.raises(ValueError, match="StopConfig.window"):
    stop_config(**{**fields, "window": 0})


def test_config_validation():
  for bad in (dict(window=0), dict(patience=0), dict(stall_ratio=-0.1), dict(breach_ratio=-1)):
    with pytest.raises(ValueError, match="StopConfig"):
      StopConfig(**bad)


def test_stall_arms_only_once_sparsification_started():
  # A flat count right after warmup is the controller still ramping lambda: no stall, however
  # long; once the count fell arm_ratio (1%) below the first row, windows start there.
  flat = _rows([100] * 12, [2.0] * 12)
  assert all(stop_reason(flat[:n], CFG, R) is None for n in range(1, len(flat) + 1))
  rows = _rows([100] * 6 + [85, 70, 69, 68.5], [2.0] * 10)
  n, reason = _first_stop(rows)
  # Armed at 85 (row 9 overall); windows from there: 85->69 (drop 16 >= 8.5), 70->68.5 (1.5 < 7)
  # is the first stalled row, so patience 2 is not met by the end.
  assert n is None
  n, reason = _first_stop(rows + _rows([68.3], [2.0], warmup=0)[-1:])
  assert reason.startswith("sparsity_stall") and "69 -> 68" in reason


def test_empty_carrier_stops_even_in_warmup():
  rows = _rows([], [])[:1] + [{"step": 20, "active_gates": 0.0, "task_loss": 5.0,
                                "extra/multiplier/budget": 0.0}]
  assert stop_reason(rows, CFG, R).startswith("empty_carrier")
  keep = StopConfig(window=2, stall_ratio=None, patience=2, breach_ratio=None,
                    stop_when_empty=False)
  assert stop_reason(rows, keep, R) is None
