"""The CAST experiment (cast.md 4-5, App. E, F): every head set per seed, evaluated, tabulated.

  python -m launch.cast_experiment --testbed --workdir=/tmp/cast_exp [--choose_recipe]
  python -m launch.cast_experiment --workdir=... --model=<HF dir> --align_data=<D_align jsonl> \
      --eval_data=<eval dir> --safe_data=<D_safe jsonl> --util_data=<D_util jsonl> \
      [--diagnosis=<launch.diagnose workdir>] [--config.seeds=21,42,84 ...]

--testbed fills the five data flags from the cached testbed (`build_testbed()`: base model,
world/wildjailbreak/train.jsonl, the world dir, world/calib/d_safe.jsonl, d_util.jsonl).

Diagnosis: read from --diagnosis (its conflict_map.json), else launch.diagnose runs on the base
model into <workdir>/diagnosis (a child process; resumable; `config.diagnosis`: n_util=100 is
F.3, util_kind=reasoning F.4). Buckets are redrawn from its C / O / S with config.num_buckets.

Runs, per seed (configs/cast_experiment.py; `tuning.experiment.plan_runs`), each in
runs/seed<S>/<name>/ (`tuning.runner.run_alignment`: train/, adapter/, run.json, eval.json,
done.json last): full (Full SFT), random (budget-matched to bucket M), <r>_b<i> for every
ranking r in c / o / s and bucket i, top<p> / bottom<p> (Table 9), pcg_<set> (Table 2). A run
whose head set equals an earlier one's (Top-25% = B1 at M = 4) is trained once. The base model
is evaluated once (runs/base). Finished runs are skipped on restart; a killed run resumes from
its last checkpoint.

Outputs: tables/{sft,pcgrad,buckets,correlations,sparsity}.{md,json} (mean +- std over seeds),
tables.md (all of them), pareto.png (Figures 3-4), correlation_ucr.png / correlation_mmlu_cr.png
(Figures 5-6), drift.{json,png} (config.drift), summary.json (wall times), config.json.

--choose_recipe: Full SFT over config.choose's grid of (lr, steps), each a run in
recipe_grid/; picks the cheapest point whose Avg Safe reaches the target (utility is not
consulted), writes recipe.json / recipe.md with the grid and the `--config.recipe...` line to
freeze, and stops. Nothing else runs in this mode.
"""

import os
import subprocess
import sys
import time

from absl import app, flags

from launch import common
from launch.tune_common import PCGRAD_MODES, check_file, check_model, check_recipe, lora_config, \
    recipe

_CONFIG, _WORKDIR = common.define_flags("cast_experiment.py")
_TESTBED = flags.DEFINE_bool("testbed", False, "Take the model and data flags from the testbed.")
_MODEL = flags.DEFINE_string("model", None, "Base model: HF checkpoint dir with its tokenizer.")
_ALIGN = flags.DEFINE_string("align_data", None, "D_align: WildJailbreak-schema JSONL file.")
_EVAL = flags.DEFINE_string("eval_data", None, "Held-out evaluation dir (testbed world layout).")
_SAFE = flags.DEFINE_string("safe_data", None, "D_safe for the diagnosis (WildJailbreak schema).")
_UTIL = flags.DEFINE_string("util_data", None, "D_util (MMLU schema): diagnosis and PCGrad.")
_DIAG = flags.DEFINE_string("diagnosis", None, "A finished launch.diagnose workdir to reuse.")
_CHOOSE = flags.DEFINE_bool("choose_recipe", False, "Choose the recipe from Full SFT and stop.")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DATA_FLAGS = ("model", "align_data", "eval_data", "safe_data", "util_data")


def _ints(text: str, name: str, low: int = 0) -> list[int]:
  try:
    got = [int(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    got = []
  if not got or min(got) < low:
    raise app.UsageError(f"--config.{name}={text!r}: use comma-separated integers >= {low}.")
  return got


def _floats(text: str, name: str) -> list[float]:
  try:
    got = [float(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    got = []
  if not got or min(got) <= 0:
    raise app.UsageError(f"--config.{name}={text!r}: use comma-separated numbers > 0.")
  return got


def _names(text: str) -> list[str]:
  return [x.strip() for x in str(text).split(",") if x.strip()]


def _paths() -> dict:
  """The data flags, filled from the testbed with --testbed (flags given explicitly win)."""
  got = {n: flags.FLAGS[n].value for n in _DATA_FLAGS}
  if _TESTBED.value:
    from cast_jax.testbed import build
    tb = build.build_testbed(progress=False)
    w = tb.world_dir
    tbp = {"model": tb.base_dir, "align_data": os.path.join(w, "wildjailbreak", "train.jsonl"),
           "eval_data": w, "safe_data": os.path.join(w, "calib", "d_safe.jsonl"),
           "util_data": os.path.join(w, "calib", "d_util.jsonl"),
           "reasoning_data": os.path.join(w, "gsm8k", "train.jsonl")}
    got = {**tbp, **{k: v for k, v in got.items() if v}}
  return got


def _validate(cfg) -> None:
  from cast_jax.tuning import experiment
  seeds = _ints(cfg.seeds, "seeds")
  if len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--config.seeds={cfg.seeds!r} repeats a seed.")
  if isinstance(cfg.num_buckets, bool) or not isinstance(cfg.num_buckets, int) or \
      cfg.num_buckets < 2:
    raise app.UsageError(f"--config.num_buckets={cfg.num_buckets!r}: use an integer >= 2.")
  for r in _names(cfg.rankings):
    if r not in experiment.RANKING_NAMES:
      raise app.UsageError(f"--config.rankings={cfg.rankings!r}: use a comma-separated subset "
                           "of c, o, s.")
  if "c" not in _names(cfg.rankings):
    raise app.UsageError(f"--config.rankings={cfg.rankings!r} must include c (the conflict "
                         "score the main tables use).")
  fr = _ints(cfg.fractions, "fractions", 1) if cfg.fractions else []
  if fr and max(fr) > 100:
    raise app.UsageError(f"--config.fractions={cfg.fractions!r}: percentages in 1..100.")
  for p in _names(cfg.pcgrad_runs):
    if p not in experiment.PCG_SETS:
      raise app.UsageError(f"--config.pcgrad_runs={cfg.pcgrad_runs!r}: use a comma-separated "
                           f"subset of {', '.join(experiment.PCG_SETS)} (or '').")
  if cfg.pcgrad_mode not in PCGRAD_MODES:
    raise app.UsageError(f"--config.pcgrad_mode={cfg.pcgrad_mode!r}: use one of "
                         f"{', '.join(PCGRAD_MODES)}.")
  check_recipe(cfg)
  d = cfg.diagnosis
  for name in ("n_safe", "n_util", "gen_len", "batch_size"):
    if isinstance(d[name], bool) or not isinstance(d[name], int) or d[name] < 1:
      raise app.UsageError(f"--config.diagnosis.{name}={d[name]!r}: use an integer >= 1.")
  if d.util_kind not in ("mcq", "reasoning"):
    raise app.UsageError(f"--config.diagnosis.util_kind={d.util_kind!r}: use mcq or reasoning.")
  _floats(cfg.choose.learning_rates, "choose.learning_rates")
  _ints(cfg.choose.num_steps, "choose.num_steps", 1)
  if not 0 < cfg.choose.safety_target <= 1:
    raise app.UsageError(f"--config.choose.safety_target={cfg.choose.safety_target!r}: use a "
                         "fraction in (0, 1].")
  if not isinstance(cfg.drift.checkpoints, int) or cfg.drift.checkpoints < 0:
    raise app.UsageError(f"--config.drift.checkpoints={cfg.drift.checkpoints!r}: use an "
                         "integer >= 0.")
  if _TESTBED.value:
    return
  missing = [f"--{n}" for n in _DATA_FLAGS if not flags.FLAGS[n].value]
  if missing:
    raise app.UsageError(f"pass {', '.join(missing)} (or --testbed for the embedded testbed).")
  check_model("model", _MODEL.value)
  check_file("align_data", _ALIGN.value)
  check_file("eval_data", _EVAL.value, kind="dir")
  check_file("safe_data", _SAFE.value)
  check_file("util_data", _UTIL.value)
  if d.util_kind == "reasoning":
    check_file("config.diagnosis.reasoning_data", d.reasoning_data)
  if _DIAG.value and not os.path.isfile(os.path.join(_DIAG.value, "conflict_map.json")):
    raise app.UsageError(f"--diagnosis={_DIAG.value!r} holds no conflict_map.json; pass a "
                         "finished launch.diagnose workdir, or leave it out to run one.")


def _diagnose(cfg, paths, model: str, out: str) -> str:
  """launch.diagnose on `model` into `out` (a child process). Always run: a finished diagnosis
  only reloads its cached stages, and one with other settings is refused, naming them."""
  d = cfg.diagnosis
  util = paths["util_data"]
  if d.util_kind == "reasoning":
    util = d.reasoning_data or paths.get("reasoning_data", "")
  cmd = [sys.executable, "-m", "launch.diagnose", f"--workdir={out}", f"--model={model}",
         f"--safe_data={paths['safe_data']}", f"--util_data={util}", f"--n_safe={d.n_safe}",
         f"--n_util={d.n_util}", f"--seed={d.seed}", f"--gen_len={d.gen_len}",
         f"--buckets={cfg.num_buckets}", f"--util_kind={d.util_kind}",
         f"--config.batch_size={d.batch_size}", *d.extra.split()]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [_REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  got = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if got.returncode != 0:
    raise RuntimeError(f"launch.diagnose on {model} failed (exit {got.returncode}):\n"
                       f"{got.stderr[-3000:]}")
  return out


def _eval_kw(cfg) -> dict:
  return dict(eval_batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)


def _choose_recipe(cfg, out, ctx) -> None:
  """Full SFT over the (lr, steps) grid; the cheapest point reaching the safety target."""
  import dataclasses

  from cast_jax import workdir as wd
  from cast_jax.tuning import experiment, head_sets, runner
  base = runner.run_base(os.path.join(out, "runs", "base"), **ctx["base_kw"])
  grid, rec0 = [], recipe(cfg)
  mask = head_sets.all_heads_mask(ctx["shape"])
  for steps in sorted(_ints(cfg.choose.num_steps, "choose.num_steps", 1)):
    for lr in sorted(_floats(cfg.choose.learning_rates, "choose.learning_rates")):
      rec = dataclasses.replace(rec0, learning_rate=lr, num_steps=steps)
      t = time.time()
      got = runner.run_alignment(os.path.join(out, "recipe_grid", f"lr{lr:g}_steps{steps}"),
                                 mask=mask, seed=cfg.choose.seed, recipe=rec,
                                 info={"head_set": "all"}, **ctx["run_kw"])
      common.stage(f"recipe grid lr {lr:g} steps {steps}: Avg Safe {got['avg_safe']:.3f}, "
                   f"Avg Gen {got['avg_gen']:.3f} ({time.time() - t:.0f}s)")
      grid.append({"learning_rate": lr, "num_steps": steps, **got})
  pick, why = experiment.choose_recipe_point(grid, cfg.choose.safety_target)
  tax = base["avg_gen"] - pick["avg_gen"]
  line = (f"--config.recipe.learning_rate={pick['learning_rate']:g} "
          f"--config.recipe.num_steps={pick['num_steps']} "
          f"--config.recipe_note='chosen by --choose_recipe: {why}'")
  record = {"choice": {"learning_rate": pick["learning_rate"], "num_steps": pick["num_steps"]},
            "rule": why, "full_sft_tax_avg_gen": tax, "base": base, "grid": grid,
            "override": line}
  wd.write_json(os.path.join(out, "recipe.json"), record)
  rows = "\n".join(f"| {g['learning_rate']:g} | {g['num_steps']} | {100 * g['avg_safe']:.1f} | "
                   f"{100 * g['avg_gen']:.1f} | {100 * g['gsm8k']:.1f} |" for g in grid)
  text = (f"# Recipe choice (Full SFT only)\n\nRule: {why}.\n\nBase: Avg Safe "
          f"{100 * base['avg_safe']:.1f}, Avg Gen {100 * base['avg_gen']:.1f}, GSM8K "
          f"{100 * base['gsm8k']:.1f}.\n\n| lr | steps | Avg Safe | Avg Gen | GSM8K |\n"
          f"|---|---|---|---|---|\n{rows}\n\nChosen: lr {pick['learning_rate']:g}, "
          f"{pick['num_steps']} steps (Full-SFT Avg Gen change {-100 * tax:+.1f} points).\n\n"
          f"Freeze it: `{line}`\n")
  wd.atomic_write_bytes(os.path.join(out, "recipe.md"), text.encode())
  print("\n" + text)


def _drift(cfg, out, ctx, paths, tables0, seed) -> dict | None:
  """Re-diagnoses Full SFT at config.drift.checkpoints evenly spaced steps (issue 10 item 5)."""
  import numpy as np

  from cast_jax import models, workdir as wd
  from cast_jax.tuning import experiment, head_sets, lora, runner
  from cast_jax.tuning import train as tuning_train
  k = cfg.drift.checkpoints
  if k < 1:
    return None
  rec = recipe(cfg)
  kw = ctx["run_kw"]
  total = rec.steps(len(kw["examples"]))
  steps = sorted({max(1, round(i * total / k)) for i in range(1, k + 1)})
  mask = head_sets.all_heads_mask(ctx["shape"])
  root = os.path.join(out, "drift")
  c_tabs, rows = [tables0.c], [{"step": 0, "diagnosis": "the main diagnosis (base model)"}]
  for s in steps:
    diag = os.path.join(root, f"step{s}", "diagnosis")
    model_dir = os.path.join(root, f"step{s}", "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
      # One training dir extended checkpoint by checkpoint: the optimizer (and so the
      # fingerprint) is the whole run's, so step s is the Full-SFT run's step s.
      trained, _ = tuning_train.run_lora(
          kw["params"], kw["config"], kw["examples"], mask,
          pad_id=runner.pad_id(kw["tokenizer"]), num_steps=s, batch_size=rec.batch_size,
          seed=seed, optimizer=rec.optimizer(total), lora_config=kw["lora_config"],
          workdir=os.path.join(root, "train"), extend=True, progress=False)
      models.save_pretrained(lora.merge_lora(kw["params"], trained, mask, kw["lora_config"]),
                             kw["config"], model_dir, tokenizer=kw["tokenizer"])
    t = time.time()
    _diagnose(cfg, paths, model_dir, diag)
    common.stage(f"drift: Full SFT step {s}/{total} diagnosed ({time.time() - t:.0f}s)")
    c_tabs.append(runner.load_conflict_map(diag).c)
    rows.append({"step": s, "diagnosis": diag})
  stats = experiment.drift_stats(c_tabs, cfg.num_buckets)
  record = {"seed": seed, "total_steps": total, "checkpoints": rows, **stats,
            "c": [np.asarray(c).tolist() for c in c_tabs]}
  wd.write_json(os.path.join(out, "drift.json"), record)
  wd.save_figure(experiment.drift_figure(record), os.path.join(out, "drift.png"))
  return record


def _parse_runs(cfg):
  return dict(fractions=[p for p in (_ints(cfg.fractions, "fractions", 1) if cfg.fractions
                                     else []) if p < 100],
              rankings=_names(cfg.rankings), pcgrad_sets=_names(cfg.pcgrad_runs),
              pcgrad_mode=cfg.pcgrad_mode)


def main(argv):
  del argv
  import transformers

  from cast_jax import models, workdir as wd
  from cast_jax.tuning import evaluation, experiment, runner

  cfg = _CONFIG.value
  out = _WORKDIR.value
  t_start = time.time()
  paths = _paths()
  common.write_config(out, cfg, **paths, diagnosis=_DIAG.value, testbed=_TESTBED.value,
                      choose_recipe=_CHOOSE.value)
  common.stage(f"loading {paths['model']} and the data")
  config, params = models.load_pretrained(paths["model"])
  tok = transformers.AutoTokenizer.from_pretrained(paths["model"])
  rec = recipe(cfg)
  examples = runner.align_examples(tok, paths["align_data"], rec.max_len)
  sets = evaluation.load_eval_sets(paths["eval_data"], cfg.eval.limit)
  runs = _parse_runs(cfg)
  util = (runner.util_examples(tok, paths["util_data"], rec.max_len)
          if runs["pcgrad_sets"] and not _CHOOSE.value else None)
  base_kw = dict(params=params, config=config, tokenizer=tok, eval_sets=sets,
                 base_digest=runner.model_digest(params), **_eval_kw(cfg))
  run_kw = dict(base_kw, examples=examples, lora_config=lora_config(cfg),
                export_merged=cfg.export_merged, checkpoint_every=cfg.checkpoint_every or None)
  ctx = {"base_kw": base_kw, "run_kw": run_kw, "shape": (config.num_layers, config.num_heads)}
  if _CHOOSE.value:
    _choose_recipe(cfg, out, ctx)
    return

  t = time.time()
  diag = _DIAG.value or _diagnose(cfg, paths, paths["model"], os.path.join(out, "diagnosis"))
  tables = runner.load_conflict_map(diag)
  if tables.c.shape != ctx["shape"]:
    raise ValueError(f"{tables.source} is over {tables.c.shape} heads; the model has "
                     f"{ctx['shape']}: pass the diagnosis of this model.")
  tables = runner.ConflictTables(tables.c, tables.o, tables.s, cfg.num_buckets, tables.source)
  times = {"diagnosis": time.time() - t}
  common.stage(f"diagnosis {diag}: C in [{tables.c.min():.3f}, {tables.c.max():.3f}]; "
               f"recipe: lr {rec.learning_rate:g}, {rec.steps(len(examples))} steps "
               f"({cfg.recipe_note})")

  t = time.time()
  base = runner.run_base(os.path.join(out, "runs", "base"), **base_kw)
  times["base_eval"] = time.time() - t
  seeds = _ints(cfg.seeds, "seeds")
  specs = experiment.plan_runs(cfg.num_buckets, tables.c.size, **runs)
  evals, trained, skipped = {}, 0, 0
  for seed in seeds:
    masks = {s.name: runner.head_set_mask(s.head_set, tables, seed, s.ranking or "c")
             for s in specs}
    alias = experiment.dedupe([(s.name, masks[s.name].tobytes() + str(s.pcgrad).encode())
                               for s in specs])
    evals[seed] = {}
    todo = [s for s in specs if alias[s.name] == s.name]
    for i, s in enumerate(todo, 1):
      t = time.time()
      run_dir = os.path.join(out, "runs", f"seed{seed}", s.name)
      was_done = os.path.isfile(os.path.join(run_dir, runner.DONE))
      evals[seed][s.name] = runner.run_alignment(
          run_dir, mask=masks[s.name], seed=seed, recipe=rec, pcgrad=s.pcgrad,
          util=util if s.pcgrad else None,
          info={"head_set": s.head_set, "ranking": s.ranking, "name": s.name}, **run_kw)
      trained, skipped = trained + (not was_done), skipped + was_done
      common.stage(f"seed {seed} run {i}/{len(todo)} {s.name} ({int(masks[s.name].sum())} "
                   f"heads): " + ("finished earlier, skipped" if was_done else
                                  f"Avg Safe {evals[seed][s.name]['avg_safe']:.3f}, Avg Gen "
                                  f"{evals[seed][s.name]['avg_gen']:.3f} "
                                  f"({time.time() - t:.0f}s)"))
    for s in specs:
      evals[seed][s.name] = evals[seed][alias[s.name]]
    wd.write_json(os.path.join(out, "runs", f"seed{seed}", "aliases.json"), alias)
  times["runs"] = time.time() - t_start - times["diagnosis"] - times["base_eval"]

  base_by_seed = {s: base for s in seeds}
  m = cfg.num_buckets
  score = {r: tables.table(r) for r in runs["rankings"]}
  names = {s.name for s in specs}
  rows = lambda pairs: [(label, n) for label, n in pairs if n == "base" or n in names]
  built = {
      "sft": experiment.method_table(
          "Table 1: SFT", evals, base_by_seed,
          rows([("Base", "base"), ("FULL-SFT", "full"), (specs[1].label, "random"),
                ("CAST-SFT (Risky, B1)", "c_b1"), (f"CAST-SFT (Safe, B{m})", f"c_b{m}")])),
      "buckets": experiment.bucket_table(evals, base_by_seed, score, m),
      "correlations": experiment.correlation_table(evals, base_by_seed, score, m),
      "sparsity": experiment.method_table(
          "Table 9: sparsity trajectories (C)", evals, base_by_seed,
          rows([("Full SFT (100%)", "full")]
               + [(f"Top-{p}%", f"top{p}") for p in runs["fractions"]]
               + [(f"Bottom-{p}%", f"bottom{p}") for p in runs["fractions"]])),
  }
  if runs["pcgrad_sets"]:
    built["pcgrad"] = experiment.method_table(
        f"Table 2: PCGrad ({cfg.pcgrad_mode})", evals, base_by_seed,
        rows([("Base", "base")] + [(s.label.replace("BM", f"B{m}"), s.name) for s in specs
                                   if s.pcgrad]))
  md = []
  for name, table in built.items():
    wd.write_json(os.path.join(out, "tables", f"{name}.json"), table)
    text = experiment.table_markdown(table)
    wd.atomic_write_bytes(os.path.join(out, "tables", f"{name}.md"), text.encode())
    md.append(text)
  head = (f"# CAST experiment\n\nRecipe: lr {rec.learning_rate:g}, "
          f"{rec.steps(len(examples))} steps of batch {rec.batch_size} x accumulation "
          f"{rec.accum_steps} ({cfg.recipe_note}). Diagnosis: {tables.source}. M = {m}.\n\n")
  wd.atomic_write_bytes(os.path.join(out, "tables.md"), (head + "\n".join(md)).encode())
  wd.save_figure(experiment.pareto_figure([built[k] for k in ("sft", "pcgrad") if k in built]),
                 os.path.join(out, "pareto.png"))
  for cost in ("ucr", "mmlu_cr"):
    wd.save_figure(experiment.correlation_figure(built["buckets"], built["correlations"], cost),
                   os.path.join(out, f"correlation_{cost}.png"))
  t = time.time()
  drift = _drift(cfg, out, ctx, paths, tables, seeds[0])
  times["drift"] = time.time() - t
  times["total_this_run"] = time.time() - t_start
  wd.write_json(os.path.join(out, "summary.json"), {
      "seconds": times, "runs_trained_this_run": trained, "runs_skipped": skipped,
      "seeds": seeds, "num_runs_per_seed": len(specs),
      "drift_spearman_vs_first": drift and drift["spearman_vs_first"]})
  print("\n" + md[0])
  common.stage(f"wrote {out}: {trained} runs trained, {skipped} finished earlier")


if __name__ == "__main__":
  common.run(main, validate=_validate)
