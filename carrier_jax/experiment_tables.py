"""The LCDD / SFT-Eraser paper tables (lcdd-sft-eraser.md Tables 1-4, 6) from stage files.

A table is {"title", "columns": [str], "rows": [{"name": str, <column>: float | None}]};
`collect_tables` reads the stage outputs of launch/carrier_experiment.py's workdir:

  lcdd/sparsity.json, lcdd_mask/sparsity.json   gate / dW sparsity (carrier_jax.outputs)
  eraser_{lcdd,sft,mask,output_only}/eval.json  behaviour rates and KLs (evaluate_models)
  eval/eval.json (optional)                     the MMLU analogue of Base / SFT / LCDD (else
                                                eraser_lcdd's, which also has the triggered row)
"""

import json
import os
from typing import Any

MAIN_TITLES = {"fixed_response": "Table 1: fixed response", "safety": "Table 2: safety",
               "style": "Table 3: Shakespeare style"}


def _read(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _kl(ev: dict, p: str, q: str) -> float | None:
  got = ev["kl"].get(f"{p}||{q}")
  return None if got is None else got["mean"]


def _rates(ev: dict, name: str) -> dict[str, float]:
  """The behaviour metrics (everything but the MMLU analogue) of `name` in an eval result."""
  return {k: v for k, v in ev["models"].get(name, {}).items() if k != "mmlu"}


def _sparsity(report: dict | None) -> dict[str, float | None]:
  if report is None:
    return {"gate sparsity": None, "dW sparsity": None}
  return {"gate sparsity": report["gate_sparsity"]["overall"],
          "dW sparsity": report["delta_sparsity"]["overall"]}


def _table(title: str, rows: list[dict]) -> dict:
  cols = list(dict.fromkeys(k for r in rows for k in r if k != "name"))
  return {"title": title, "columns": cols,
          "rows": [{"name": r["name"], **{c: r.get(c) for c in cols}} for r in rows]}


def main_table(behaviour: str, ev: dict, sparsity: dict | None, mmlu_eval: dict | None) -> dict:
  """Table 1 / 2 / 3: Base, SFT, LCDD, LCDD+Trig (and +HardTrig when run) rows."""
  mm = (mmlu_eval or {}).get("models", {})
  rows = []
  trig = sorted((n for n in ev["models"] if n.startswith("LCDD+")), reverse=True)  # Trig first
  names = ["Base", "SFT", "LCDD"] + trig
  for name in [n for n in names if n in ev["models"]]:
    row = {"name": name.replace("Trigger", "Trig"), **_rates(ev, name)}
    got = mm.get(name, {}).get("mmlu")
    row["MMLU analogue"] = ev["models"][name].get("mmlu") if got is None else got
    row.update(_sparsity(sparsity) if name == "LCDD" else {})
    if name == "LCDD":
      row["KL(SFT||LCDD)"] = _kl(ev, "SFT", "LCDD")
      row["KL(Base||LCDD)"] = _kl(ev, "Base", "LCDD")  # what the trigger should bring down
    if name.startswith("LCDD+"):
      row["KL(SFT||Trig)"] = _kl(ev, "SFT", name)
      row["KL(Base||Trig)"] = _kl(ev, "Base", name)
    rows.append(row)
  return _table(MAIN_TITLES[behaviour], rows)


def _after_trigger(label: str, ev: dict | None, model: str, extra: dict | None = None) -> dict:
  """One row: the erased model's behaviour rate(s) after the trigger and its two KLs."""
  row = {"name": label, **(extra or {})}
  if ev is None:
    return row
  trig = f"{model}+Trigger"
  row.update({f"{k} after trigger": v for k, v in _rates(ev, trig).items()})
  row["KL(Base||Trig)"] = _kl(ev, "Base", trig)
  row["KL(SFT||Trig)"] = _kl(ev, "SFT", trig)
  return row


def structure_table(ev_sft: dict | None, ev_lcdd: dict) -> dict:
  """Table 4: the same trigger recipe (and LCDD's write channels) on SFT vs on LCDD."""
  return _table("Table 4: structural dependence (trigger on SFT vs on LCDD)",
                [_after_trigger("SFT + trigger", ev_sft, "SFT"),
                 _after_trigger("LCDD + trigger", ev_lcdd, "LCDD")])


def ablation_table(ev_joint: dict, ev_mask: dict | None, ev_out: dict | None,
                   sp_joint: dict | None, sp_mask: dict | None) -> dict:
  """Table 6 (joint vs mask-only carrier) plus section 4.3's output-only trigger row."""
  return _table("Table 6: joint vs mask-only carrier; output-only trigger",
                [_after_trigger("LCDD joint", ev_joint, "LCDD", _sparsity(sp_joint)),
                 _after_trigger("LCDD mask-only", ev_mask, "LCDD", _sparsity(sp_mask)),
                 _after_trigger("LCDD joint, output-only trigger (no L_MSE)", ev_out, "LCDD",
                                _sparsity(sp_joint))])


def collect_tables(workdir: str, behaviour: str) -> dict[str, dict]:
  """{"main", "structure", "ablation"} tables from the stage files under `workdir`.

  Raises FileNotFoundError naming eraser_lcdd/eval.json when the main eraser run is missing.
  """
  p = lambda *a: os.path.join(workdir, *a)
  ev = _read(p("eraser_lcdd", "eval.json"))
  if ev is None:
    raise FileNotFoundError(f"{p('eraser_lcdd', 'eval.json')} is missing: run the eraser_lcdd "
                            "stage (with --sft) before collecting the tables")
  sp, sp_mask = _read(p("lcdd", "sparsity.json")), _read(p("lcdd_mask", "sparsity.json"))
  return {"main": main_table(behaviour, ev, sp, _read(p("eval", "eval.json"))),
          "structure": structure_table(_read(p("eraser_sft", "eval.json")), ev),
          "ablation": ablation_table(ev, _read(p("eraser_mask", "eval.json")),
                                     _read(p("eraser_output_only", "eval.json")), sp, sp_mask)}


def _cell(v: Any) -> str:
  return "" if v is None else f"{v:.4f}"


def table_markdown(table: dict) -> str:
  """A `## title` line and a markdown table; blank cells where a value does not apply."""
  cols = table["columns"]
  # A literal | would split a cell: KL(SFT||LCDD) is escaped.
  esc = lambda t: t.replace("|", "\\|")
  lines = [f"## {table['title']}", "", "| | " + " | ".join(esc(c) for c in cols) + " |",
           "|---|" + "---|" * len(cols)]
  lines += ["| " + r["name"] + " | " + " | ".join(_cell(r[c]) for c in cols) + " |"
            for r in table["rows"]]
  return "\n".join(lines) + "\n"
