"""The LCDD / SFT-Eraser experiment (issue 12 item 6): SFT -> LCDD -> SFT-Eraser -> tables.

  python -m launch.carrier_experiment --testbed --workdir=/tmp/carrier_exp [--behaviour=safety]
  python -m launch.carrier_experiment --base=<HF dir> --data=<behaviour file>
      --heldout=<held-out file> [--mmlu=<MMLU file>] [--sft=<HF dir>] --workdir=...

--testbed fills --base / --data / --heldout / --mmlu from the cached testbed (world files
fixed_response/, wildjailbreak/ or shakespeare/ {train,eval}.jsonl and mmlu/test.jsonl).
Stages, each a child `python -m launch.X` in its own subdir, skipped when its last output exists
(a killed stage resumes through its own launch):
  sft/                 launch.sft (unless --sft)
  lcdd/, lcdd_mask/    launch.lcdd, the behaviour's preset (configs/lcdd.py), joint / mask-only
  eval/                launch.carrier_eval (only with --mmlu): the MMLU-analogue column
  eraser_lcdd/         launch.eraser on LCDD (the main row; with --mmlu, the triggered model's
                       MMLU-analogue cell too)
  eraser_sft/          ... on the SFT model with LCDD's channels (Table 4)
  eraser_mask/         ... on the mask-only carrier (Table 6)
  eraser_output_only/  ... on LCDD with --config.use_mse=False (section 4.3)
Then tables/{main,structure,ablation}.{md,json}, the trigger curves PNGs and tables.md
(`carrier_jax.experiment_tables`), config.json and summary.json (stage wall times).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from launch import common

_CONFIG, _WORKDIR = common.define_flags("carrier_experiment.py")
_TESTBED = flags.DEFINE_bool("testbed", False, "Take --base / --data / --heldout / --mmlu from "
                             "the cached testbed.")
_BEHAVIOUR = flags.DEFINE_string("behaviour", "fixed_response", "fixed_response | safety | style.")
_BASE = flags.DEFINE_string("base", None, "Base model: HF checkpoint dir with its tokenizer.")
_DATA = flags.DEFINE_string("data", None, "Behaviour training file (SFT, LCDD, trigger prompts).")
_HELDOUT = flags.DEFINE_string("heldout", None, "Held-out prompts of the behaviour.")
_MMLU = flags.DEFINE_string("mmlu", None, "MMLU-schema file: the utility column (optional).")
_SFT = flags.DEFINE_string("sft", None, "A finished SFT model (HF dir): skips the SFT stage.")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"fixed_response": "fixed_response_vicuna", "safety": "safety_qwen",
           "style": "shakespeare_deepseek"}
_WORLD = {"fixed_response": "fixed_response", "safety": "wildjailbreak", "style": "shakespeare"}


def _paths() -> dict:
  """base / data / heldout / mmlu, from the testbed with --testbed (explicit flags win)."""
  got = {f.name: f.value for f in (_BASE, _DATA, _HELDOUT, _MMLU)}
  if _TESTBED.value:
    from cast_jax.testbed import build
    tb = build.build_testbed(progress=False)
    w, d = tb.world_dir, _WORLD[_BEHAVIOUR.value]
    tbp = {"base": tb.base_dir, "data": os.path.join(w, d, "train.jsonl"),
           "heldout": os.path.join(w, d, "eval.jsonl"),
           "mmlu": os.path.join(w, "mmlu", "test.jsonl")}
    got = {**tbp, **{k: v for k, v in got.items() if v}}
  return got


def _validate(cfg) -> None:
  """Flags and config checked before anything runs (app.UsageError)."""
  if _BEHAVIOUR.value not in PRESETS:
    raise app.UsageError(f"--behaviour={_BEHAVIOUR.value!r}: use one of {tuple(PRESETS)}.")
  from configs.lcdd import PRESETS as LCDD_PRESETS
  if cfg.lcdd.preset and cfg.lcdd.preset not in LCDD_PRESETS:
    raise app.UsageError(f"--config.lcdd.preset={cfg.lcdd.preset!r}: use one of "
                         f"{sorted(LCDD_PRESETS)} or '' for the behaviour's.")
  for sec in ("sft", "lcdd", "lcdd_mask", "eraser"):
    n = cfg[sec].num_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise app.UsageError(f"--config.{sec}.num_steps={n!r}: use an integer >= 0 (0: the "
                           "launch's default).")
  if _SFT.value and not os.path.isfile(os.path.join(_SFT.value, "config.json")):
    raise app.UsageError(f"--sft={_SFT.value!r}: pass an HF checkpoint dir (with config.json).")
  if _TESTBED.value:
    return
  if not _BASE.value or not os.path.isfile(os.path.join(_BASE.value, "config.json")):
    raise app.UsageError(f"--base={_BASE.value!r}: pass an HF checkpoint dir (or --testbed).")
  for f in (_DATA, _HELDOUT) + ((_MMLU,) if _MMLU.value else ()):
    if not f.value or not os.path.isfile(f.value):
      raise app.UsageError(f"--{f.name}={f.value!r}: pass an existing file (or --testbed).")


def _child(module: str, out: str, args: list[str], extra: str) -> None:
  """`python -m launch.<module>` into `out` (quiet; its stderr tail on failure)."""
  cmd = [sys.executable, "-m", f"launch.{module}", f"--workdir={out}", *args, *extra.split()]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [_REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  got = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, check=False)
  if got.returncode != 0:
    raise RuntimeError(f"launch.{module} into {out} failed (exit {got.returncode}):\n"
                       f"{got.stderr[-3000:]}")


def _stage(name: str, done: str, run, times: dict) -> None:
  """Runs `run()` unless `done` exists (a finished stage: skipped on restart)."""
  if os.path.exists(done):
    common.stage(f"{name}: finished earlier, skipped")
    times[name] = "skipped"
    return
  t = time.time()
  common.stage(f"{name}: running")
  run()
  if not os.path.exists(done):
    raise RuntimeError(f"stage {name} finished without writing {done}")
  times[name] = time.time() - t
  common.stage(f"{name}: done ({times[name]:.0f}s)")


def _steps(n: int) -> list[str]:
  return [f"--config.num_steps={n}"] if n else []


def main(argv):
  del argv
  from carrier_jax import experiment_tables as T
  from cast_jax import workdir as wd

  cfg = _CONFIG.value
  out = os.path.abspath(_WORKDIR.value)
  beh = _BEHAVIOUR.value
  paths = _paths()
  preset = cfg.lcdd.preset or PRESETS[beh]
  common.write_config(out, cfg, **paths, behaviour=beh, sft=_SFT.value, testbed=_TESTBED.value,
                      lcdd_preset=preset)
  d = lambda *a: os.path.join(out, *a)
  times: dict = {}
  sft = os.path.abspath(_SFT.value) if _SFT.value else d("sft", "sft_model")
  if not _SFT.value:
    _stage("sft", d("sft", "metrics.json"), lambda: _child(
        "sft", d("sft"), [f"--base={paths['base']}", f"--data={paths['data']}",
                          f"--behaviour={beh}", *_steps(cfg.sft.num_steps)], cfg.sft.extra),
        times)
  lcdd_cfg = f"--config={os.path.join(_REPO, 'configs', 'lcdd.py')}:{preset}"
  common_lcdd = [f"--base={paths['base']}", f"--sft={sft}", f"--data={paths['data']}", lcdd_cfg,
                 f"--config.data.behaviour={beh}"]
  _stage("lcdd", d("lcdd", "summary.json"), lambda: _child(
      "lcdd", d("lcdd"), common_lcdd + _steps(cfg.lcdd.num_steps), cfg.lcdd.extra), times)
  _stage("lcdd_mask", d("lcdd_mask", "summary.json"), lambda: _child(
      "lcdd", d("lcdd_mask"), common_lcdd + ["--config.mask_only=True"]
      + _steps(cfg.lcdd_mask.num_steps), cfg.lcdd.extra + " " + cfg.lcdd_mask.extra), times)
  if paths.get("mmlu"):
    _stage("eval", d("eval", "eval.json"), lambda: _child(
        "carrier_eval", d("eval"), [f"--base={paths['base']}", f"--sft={sft}",
                                    f"--lcdd={d('lcdd', 'lcdd_model')}", f"--behaviour={beh}",
                                    f"--data={paths['heldout']}", f"--mmlu={paths['mmlu']}",
                                    f"--train_data={paths['data']}"],
        cfg.eval.extra), times)
  erasers = {"eraser_lcdd": ("lcdd", "lcdd", []),
             "eraser_sft": (None, "lcdd", ["--config.model_name=SFT"]),
             "eraser_mask": ("lcdd_mask", "lcdd_mask", []),
             "eraser_output_only": ("lcdd", "lcdd", ["--config.use_mse=False"])}
  for name, (model, carrier, more) in erasers.items():
    main_row = name == "eraser_lcdd"
    hard = ["--config.hard.enabled=True"] if cfg.eraser.hard and main_row else []
    mmlu = [f"--mmlu={paths['mmlu']}"] if paths.get("mmlu") and main_row else []
    args = [f"--base={paths['base']}", f"--model={d(model, 'lcdd_model') if model else sft}",
            f"--carrier={d(carrier)}", f"--data={paths['data']}",
            f"--heldout={paths['heldout']}", f"--sft={sft}", f"--config.behaviour={beh}",
            *_steps(cfg.eraser.num_steps), *more, *hard, *mmlu]
    _stage(name, d(name, "metrics.json"),
           lambda name=name, args=args: _child("eraser", d(name), args, cfg.eraser.extra), times)

  # The tables are a function of the finished stages: always rewritten.
  tables = T.collect_tables(out, beh)
  md = [f"# LCDD / SFT-Eraser experiment: {beh} (LCDD preset {preset})\n"]
  for key, table in tables.items():
    wd.write_json(d("tables", f"{key}.json"), table)
    text = T.table_markdown(table)
    wd.atomic_write_bytes(d("tables", f"{key}.md"), text.encode())
    md.append(text)
  for name in erasers:
    for png in ("curves.png", "hard_curves.png"):
      if os.path.isfile(d(name, png)):
        with open(d(name, png), "rb") as f:
          wd.atomic_write_bytes(d("tables", f"{name}_{png}"), f.read())
  wd.atomic_write_bytes(d("tables.md"), "\n".join(md).encode())
  prev = {}
  if os.path.isfile(d("summary.json")):  # a skipped stage keeps its first run's wall time
    with open(d("summary.json")) as f:
      prev = json.load(f).get("seconds", {})
  times = {k: prev.get(k, v) if v == "skipped" else v for k, v in times.items()}
  wd.write_json(d("summary.json"), {"seconds": times, "behaviour": beh, "lcdd_preset": preset})
  print("\n" + md[1])
  common.stage(f"wrote {d('tables.md')}")


if __name__ == "__main__":
  common.run(main, validate=_validate)
