"""The stages of launch/demo.py (no flags defined here): each one resumable, each writing into
its own dir of the demo's workdir, each returning the JSON-ready numbers the report reads.

  testbed    build_testbed (+ the aligned model), in this process
  diagnosis  launch.diagnose on the base model (a child process)
  buckets    the reduced CAST bucket experiment through cast_jax.tuning.runner, in this process
  sft        launch.sft on the fixed-response behaviour (a child)
  lcdd       launch.lcdd from the base and SFT models (a child)
  eraser     launch.eraser on the LCDD carrier, with the Base / SFT / LCDD / LCDD+Trigger
             evaluation (a child)

`run_stage` records a finished stage in <workdir>/stages/<name>.json (its settings, result and
seconds, written last and atomically), so a restarted demo skips it; the launch scripts' own
workdirs (train/ checkpoints, diagnosis stage caches) resume a stage killed half way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from launch import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _normal(obj: Any) -> Any:
  """`obj` as it reads back from JSON (tuples -> lists), for comparing recorded settings."""
  return json.loads(json.dumps(obj))


def run_stage(out: str, name: str, what: str, settings: dict, fn: Callable[[], dict],
              still_valid: Callable[[dict], bool] = lambda result: True,
              stage_dir: str | None = None) -> dict:
  """Runs `fn()` once per workdir: its record {settings, result, seconds} in stages/<name>.json.

  A recorded stage with the same settings is skipped (and `still_valid(result)` must hold, e.g.
  its checkpoint still exists). One recorded with other settings (another --config, a new
  testbed version, a changed upstream stage) is redone: its `stage_dir`, which only the demo
  writes, is discarded first, so the launch scripts do not resume the old run.
  """
  from cast_jax import workdir as wd
  from cast_jax.io_atomic import discard_dir
  path = os.path.join(out, "stages", f"{name}.json")
  settings = _normal(settings)
  if os.path.isfile(path):
    with open(path) as f:
      rec = json.load(f)
    if rec["settings"] != settings:
      diff = sorted(k for k in set(rec["settings"]) | set(settings)
                    if rec["settings"].get(k) != settings.get(k))
      common.stage(f"{name}: recorded with other settings ({', '.join(diff)}); redoing it"
                   + (f" (discarding {stage_dir})" if stage_dir else ""))
      os.remove(path)
      if stage_dir:
        discard_dir(stage_dir)
    elif still_valid(rec["result"]):
      common.stage(f"{name}: finished earlier ({rec['seconds']:.0f}s then), skipped")
      return rec
  common.stage(f"{name}: {what}")
  t = time.time()
  result = fn()
  rec = {"settings": settings, "result": _normal(result), "seconds": time.time() - t}
  wd.write_json(path, rec)
  common.stage(f"{name}: done in {rec['seconds']:.0f}s")
  return rec


def _pump(src, sink, log, tail: list, prefix: bytes) -> None:
  """Copies a child's stream to our console (stdout lines indented) and its log file."""
  at_line_start = True
  while True:
    chunk = os.read(src.fileno(), 4096)
    if not chunk:
      break
    log.write(chunk)
    log.flush()
    tail.append(chunk)
    del tail[:-64]
    if prefix:
      text = (prefix if at_line_start else b"") + chunk.replace(b"\n", b"\n" + prefix)
      at_line_start = text.endswith(prefix)
      if at_line_start:
        text = text[:-len(prefix)]
      chunk = text
    sink.write(chunk)
    sink.flush()


def child(module: str, args: list[str], log_path: str) -> None:
  """Runs `python -m <module> <args>` with the repo on PYTHONPATH, its stage lines indented on
  our console and its progress bars passed through; all of it also goes to `log_path`. A
  failure raises RuntimeError with the end of its stderr."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  flags = common.FLAGS
  if flags["verbosity"].present:  # -v given to the demo: the children show their logs too
    args = [*args, f"--verbosity={flags.verbosity}"]
  cmd = [sys.executable, "-m", module, *args]
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, "ab") as log:
    log.write(("$ " + " ".join(cmd) + "\n").encode())
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_tail, err_tail = [], []
    threads = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout.buffer, log,
                                                    out_tail, b"    | ")),
               threading.Thread(target=_pump, args=(proc.stderr, sys.stderr.buffer, log,
                                                    err_tail, b""))]
    for t in threads:
      t.start()
    code = proc.wait()
    for t in threads:
      t.join()
  if code != 0:
    err = b"".join(err_tail).decode(errors="replace")[-3000:]
    raise RuntimeError(f"{module} failed (exit {code}); its log: {log_path}\n{err}")


def _read(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def testbed(cfg) -> dict:
  """build_testbed (cached; ~6 min cold) and, with cfg.build_aligned, the aligned model."""
  from cast_jax.testbed.build import TestbedSpec, aligned_testbed, build_testbed
  spec = TestbedSpec()
  tb = build_testbed(spec, cfg.cache_dir or None, progress=True)
  if cfg.build_aligned:
    common.stage("testbed: alignment SFT of the base model (cached after the first run)")
    aligned_testbed(tb, progress=True)
  return {"key": spec.key(), "root": tb.root, "base_dir": tb.base_dir, "world_dir": tb.world_dir}


def diagnosis(cfg, tb: dict, out: str) -> dict:
  """launch.diagnose on the base model with the world's calibration sets."""
  d = cfg.diagnosis
  w = tb["world_dir"]
  child("launch.diagnose", [
      f"--workdir={out}", f"--model={tb['base_dir']}",
      f"--safe_data={os.path.join(w, 'calib', 'd_safe.jsonl')}",
      f"--util_data={os.path.join(w, 'calib', 'd_util.jsonl')}", f"--n_safe={d.n_safe}",
      f"--n_util={d.n_util}", f"--seed={d.seed}", f"--gen_len={d.gen_len}",
      f"--buckets={d.num_buckets}", f"--config.batch_size={d.batch_size}"],
      os.path.join(out, "console.log"))
  rec = _read(os.path.join(out, "conflict_map.json"))
  buckets = _read(os.path.join(out, "buckets.json"))["buckets"]
  c = [v for row in rec["heads"]["c"] for v in row]
  return {"base": rec["base"], "c_min": min(c), "c_max": max(c),
          "num_heads_total": rec["num_heads_total"], "calibration": {
              k: rec["calibration"][k] for k in ("n_safe", "n_util", "gen_len")},
          "buckets": [{"bucket": b["bucket"], "heads": b["heads"], "c_min": b["c_min"],
                       "c_max": b["c_max"]} for b in buckets]}


def _experiment_config():
  """configs/cast_experiment.py's config (the recipe and LoRA the experiment freezes)."""
  path = os.path.join(REPO, "configs", "cast_experiment.py")
  spec = importlib.util.spec_from_file_location("_cast_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def buckets(cfg, tb: dict, diag_dir: str, out: str) -> dict:
  """Base, Full SFT, Random (budget-matched), B1 (Risky) and BM (Safe) for one seed, with the
  CAST experiment's recipe; Table 1 (reduced) as markdown + JSON and the Pareto plot."""
  import dataclasses

  import transformers

  from cast_jax import models, workdir as wd
  from cast_jax.tuning import LoraConfig, evaluation, experiment, runner
  b, m = cfg.buckets, cfg.diagnosis.num_buckets
  exp = _experiment_config()
  rec = dataclasses.replace(runner.Recipe(**exp.recipe.to_dict()),
                            learning_rate=b.learning_rate, num_steps=b.num_steps)
  config, params = models.load_pretrained(tb["base_dir"])
  tok = transformers.AutoTokenizer.from_pretrained(tb["base_dir"])
  w = tb["world_dir"]
  examples = runner.align_examples(tok, os.path.join(w, "wildjailbreak", "train.jsonl"),
                                   rec.max_len)
  sets = evaluation.load_eval_sets(w, b.eval_limit)
  tables = runner.load_conflict_map(diag_dir)
  tables = runner.ConflictTables(tables.c, tables.o, tables.s, m, tables.source)
  base_kw = dict(params=params, config=config, tokenizer=tok, eval_sets=sets,
                 eval_batch_size=b.eval_batch_size, max_new_tokens=b.max_new_tokens,
                 base_digest=runner.model_digest(params))
  common.stage(f"buckets: evaluating the base model on {b.eval_limit} prompts per metric")
  base = runner.run_base(os.path.join(out, "runs", "base"), **base_kw)
  keep = ("full", "random", "c_b1", f"c_b{m}")
  specs = [s for s in experiment.plan_runs(m, tables.c.size, fractions=(), rankings=("c",))
           if s.name in keep]
  evals = {}
  for i, s in enumerate(specs, 1):
    mask = runner.head_set_mask(s.head_set, tables, b.seed, "c")
    t = time.time()
    common.stage(f"buckets: run {i}/{len(specs)} {s.name} ({int(mask.sum())} heads, "
                 f"{rec.num_steps} steps at lr {rec.learning_rate:g})")
    evals[s.name] = runner.run_alignment(
        os.path.join(out, "runs", s.name), mask=mask, seed=b.seed, recipe=rec,
        lora_config=LoraConfig(**exp.lora.to_dict()), examples=examples, export_merged=False,
        info={"head_set": s.head_set, "ranking": s.ranking, "name": s.name}, progress=True,
        **base_kw)
    common.stage(f"buckets: {s.name}: Avg Safe {evals[s.name]['avg_safe']:.3f}, Avg Gen "
                 f"{evals[s.name]['avg_gen']:.3f} ({time.time() - t:.0f}s)")
  rows = [("Base", "base"), ("FULL-SFT", "full"), (specs[1].label, "random"),
          ("CAST-SFT (Risky, B1)", "c_b1"), (f"CAST-SFT (Safe, B{m})", f"c_b{m}")]
  table = experiment.method_table("Table 1 (reduced: one seed)", {b.seed: evals},
                                  {b.seed: base}, rows)
  text = experiment.table_markdown(table)
  wd.write_json(os.path.join(out, "table.json"), table)
  wd.atomic_write_bytes(os.path.join(out, "table.md"), text.encode())
  wd.save_figure(experiment.pareto_figure([table]), os.path.join(out, "pareto.png"))
  return {"table_markdown": text, "base": base, "runs": evals,
          "recipe": dataclasses.asdict(rec), "masks": {
              s.name: runner.head_set_mask(s.head_set, tables, b.seed, "c").astype(int).tolist()
              for s in specs}}


def sft(cfg, tb: dict, out: str) -> dict:
  """launch.sft: full fine-tuning of the base model on the fixed-response pairs (W_ft)."""
  s = cfg.sft
  child("launch.sft", [
      f"--workdir={out}", f"--base={tb['base_dir']}", "--behaviour=fixed_response",
      f"--data={os.path.join(tb['world_dir'], 'fixed_response', 'train.jsonl')}",
      f"--config.num_steps={s.num_steps}", f"--config.batch_size={s.batch_size}",
      f"--config.optimizer.learning_rate={s.learning_rate}", f"--config.data.max_len={s.max_len}"],
      os.path.join(out, "console.log"))
  m = _read(os.path.join(out, "metrics.json"))
  return {k: m[k] for k in ("num_examples", "num_steps", "first_loss", "final_loss")} | {
      "model": os.path.join(out, "sft_model")}


def lcdd(cfg, tb: dict, sft_model: str, out: str) -> dict:
  """launch.lcdd between the base and the SFT model on the same fixed-response pairs."""
  c = cfg.lcdd
  child("launch.lcdd", [
      f"--workdir={out}", f"--base={tb['base_dir']}", f"--sft={sft_model}",
      f"--data={os.path.join(tb['world_dir'], 'fixed_response', 'train.jsonl')}",
      f"--config={os.path.join(REPO, 'configs', 'lcdd.py')}:{c.preset}",
      f"--config.num_steps={c.num_steps}", f"--config.multiplier.warmup_steps={c.warmup_steps}",
      f"--config.stop.stall_enabled={c.stall_enabled}", f"--config.data.max_len={c.max_len}"],
      os.path.join(out, "console.log"))
  sp = _read(os.path.join(out, "sparsity.json"))
  summary = _read(os.path.join(out, "summary.json"))
  return {"gate_sparsity": sp["gate_sparsity"]["overall"],
          "delta_sparsity": sp["delta_sparsity"]["overall"],
          "gates_total": sp["gate_sparsity"]["total"],
          "stop_reason": summary.get("stop_reason"), "final_step": summary.get("final_step"),
          "model": os.path.join(out, "lcdd_model")}


def eraser(cfg, tb: dict, sft_model: str, lcdd_dir: str, out: str) -> dict:
  """launch.eraser on the LCDD model (C_write from its carrier), then Base / SFT / LCDD /
  LCDD+Trigger on held-out prompts with the KLs."""
  e = cfg.eraser
  w = os.path.join(tb["world_dir"], "fixed_response")
  child("launch.eraser", [
      f"--workdir={out}", f"--base={tb['base_dir']}",
      f"--model={os.path.join(lcdd_dir, 'lcdd_model')}", f"--carrier={lcdd_dir}",
      f"--sft={sft_model}", f"--data={os.path.join(w, 'train.jsonl')}",
      f"--heldout={os.path.join(w, 'eval.jsonl')}", "--config.behaviour=fixed_response",
      f"--config.num_steps={e.num_steps}", f"--config.eval_every={e.eval_every}",
      f"--config.num_prompts={e.num_prompts}",
      f"--config.selection_prompts={e.selection_prompts}",
      f"--config.eval_limit={e.eval_limit}", f"--config.max_new_tokens={e.max_new_tokens}"],
      os.path.join(out, "console.log"))
  m = _read(os.path.join(out, "metrics.json"))
  return {"best_step": m["best_step"], "best_heldout": m["best_heldout"], "eval": m["eval"]}
