"""The demo's report.md text from its stage records (pure: records in, markdown out).

Paths in the text are relative to the demo's workdir, so report.md renders in place and
`cast_jax.report.write_report` can inline its images into report.html.
"""

from __future__ import annotations

from typing import Mapping

STAGE_DIRS = {"diagnosis": "diagnosis", "buckets": "cast", "sft": "sft", "lcdd": "lcdd",
              "eraser": "eraser"}


def _f(x, digits: int = 3) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


def _heads(heads) -> str:
  return ", ".join(f"L{l}H{h}" for l, h in heads)


def _times(recs: Mapping[str, dict], total: float) -> str:
  rows = "\n".join(f"| {name} | {rec['seconds']:.0f} | "
                   + (f"[{STAGE_DIRS[name]}/]({STAGE_DIRS[name]}/)" if name in STAGE_DIRS
                      else f"`{rec['result']['root']}`") + " |" for name, rec in recs.items())
  return ("| stage | seconds (when it ran) | outputs |\n|---|---|---|\n" + rows
          + f"\n| sum of the stages | {sum(r['seconds'] for r in recs.values()):.0f} | |\n"
          f"| **this run, total** (skipped stages cost ~0) | {total:.0f} | |\n")


def _diagnosis(r: dict) -> str:
  b, m = r["buckets"], len(r["buckets"])
  cal = r["calibration"]
  return (
      "## 1. CAST conflict diagnosis of the base model\n\n"
      f"D_safe {cal['n_safe']} harmful prompts, D_util {cal['n_util']} MCQ items, "
      f"{cal['gen_len']} greedy tokens per safety generation. Base model: D_util accuracy "
      f"{_f(r['base']['accuracy'])}, D_safe refusal rate {_f(r['base'].get('refusal_rate'))}. "
      f"C = O * S spans {r['c_min']:.3f} - {r['c_max']:.3f} over {r['num_heads_total']} "
      "heads.\n\n"
      "![conflict map C (layers x heads)](diagnosis/heatmap_c.png)\n\n"
      f"- B1 (Risky, highest C, {b[0]['c_min']:.3f} - {b[0]['c_max']:.3f}): "
      f"{_heads(b[0]['heads'])}\n"
      f"- B{m} (Safe, lowest C, {b[-1]['c_min']:.3f} - {b[-1]['c_max']:.3f}): "
      f"{_heads(b[-1]['heads'])}\n\n"
      "Every per-head number: [diagnosis/conflict_map.json](diagnosis/conflict_map.json), "
      "[diagnosis/summary.md](diagnosis/summary.md); O and S maps: "
      "[heatmap_o.png](diagnosis/heatmap_o.png), [heatmap_s.png](diagnosis/heatmap_s.png).\n")


def _buckets(r: dict) -> str:
  rec = r["recipe"]
  return (
      "## 2. Reduced bucket experiment (CAST sparse tuning)\n\n"
      f"Head-restricted LoRA on W_q, one seed, the CAST experiment's recipe (lr "
      f"{rec['learning_rate']:g}, {rec['num_steps']} micro-batches of {rec['batch_size']} x "
      f"accumulation {rec['accum_steps']}); Random is budget-matched to the Safe bucket. "
      "Metrics in percent on held-out prompts; UCR / MMLU-CR are the paper's cost ratios "
      "(lower is better).\n\n" + r["table_markdown"].replace("### ", "#### ") + "\n"
      "![Pareto: Avg Safe vs Avg Gen](cast/pareto.png)\n\n"
      "Per-run files (adapter, eval.json): [cast/runs/](cast/runs/).\n")


def _carrier(sft: dict, lcdd: dict) -> str:
  return (
      "## 3. LCDD: the fixed-response carrier\n\n"
      f"SFT (W_ft): {sft['num_steps']} steps on {sft['num_examples']} fixed-response pairs, "
      f"loss {_f(sft['first_loss'])} -> {_f(sft['final_loss'])} ([sft/loss.png](sft/loss.png)). "
      f"LCDD stopped at step {lcdd['final_step']} ({lcdd['stop_reason']}): "
      f"**{100 * lcdd['gate_sparsity']:.1f} %** of the {lcdd['gates_total']} gates off, "
      f"{100 * lcdd['delta_sparsity']:.1f} % of the dW entries masked.\n\n"
      "![LCDD sparsity per layer](lcdd/sparsity_per_layer.png)\n\n"
      "![LCDD controller curves](lcdd/controller_curves.png)\n")


def _eraser(r: dict) -> str:
  ev = r["eval"]
  kl = ev["kl"]
  head = ev.get("headline", "fixed_response_rate")
  rate = {n: m.get(head) for n, m in ev["models"].items()}
  get = lambda k: kl.get(k, {}).get("mean")
  samples = ""
  for name, rows in ev.get("samples", {}).items():
    if rows:
      x = rows[0]
      samples += f"- **{name}**: {x['prompt']!r} -> {x['response']!r}\n"
  b = r["best_heldout"]
  return (
      "## 4. SFT-Eraser and the carrier evaluation\n\n"
      f"A 20-token soft trigger optimised against the LCDD model's write channels; the best "
      f"held-out trigger is from step {r['best_step']} (held-out loss {_f(b['loss'], 4)}: MSE "
      f"{_f(b['mse'], 4)}, KL(Base||Trig) {_f(b['kl'], 4)}).\n\n"
      "![trigger loss curves](eraser/curves.png)\n\n"
      f"Held-out evaluation ({ev['num_prompts']} prompts; KLs teacher-forced on the SFT "
      "model's greedy responses):\n\n" + _eval_table(ev) + "\n"
      "| | KL(SFT‖LCDD) | KL(SFT‖Trig) | KL(Base‖Trig) | KL(Base‖LCDD) |\n"
      "|---|---|---|---|---|\n"
      f"| nats/token | {_f(get('SFT||LCDD'), 4)} | {_f(get('SFT||LCDD+Trigger'), 4)} | "
      f"{_f(get('Base||LCDD+Trigger'), 4)} | {_f(get('Base||LCDD'), 4)} |\n\n"
      f"Fixed-response rate: LCDD {_f(rate.get('LCDD'))} -> LCDD+Trigger "
      f"{_f(rate.get('LCDD+Trigger'))} (Base {_f(rate.get('Base'))}, SFT {_f(rate.get('SFT'))})."
      "\n\nOne sample per model:\n\n" + samples + "\n"
      "Files: [eraser/eval.md](eraser/eval.md), [eraser/eval.json](eraser/eval.json), "
      "[eraser/trigger.npy](eraser/trigger.npy).\n")


def _eval_table(ev: dict) -> str:
  from carrier_jax import evaluation
  return evaluation.markdown_table(ev)


def report_markdown(recs: Mapping[str, dict], total_s: float) -> str:
  """report.md for the stage records `recs` (name -> {settings, result, seconds})."""
  r = {k: v["result"] for k, v in recs.items()}
  tb = r["testbed"]
  return (
      "# cast-jax end-to-end demo\n\n"
      f"Testbed `{tb['key']}`: base model `{tb['base_dir']}`, world `{tb['world_dir']}`. "
      "Every stage writes into its own dir below; "
      "config.json and metrics.json hold the settings and every number.\n\n"
      + _times(recs, total_s) + "\n" + _diagnosis(r["diagnosis"]) + "\n"
      + _buckets(r["buckets"]) + "\n" + _carrier(r["sft"], r["lcdd"]) + "\n"
      + _eraser(r["eraser"]))
