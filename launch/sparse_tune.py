"""CAST sparse tuning of one head set (cast.md 3.5, 4.2): head-restricted LoRA on W_q over D_align.

  python -m launch.sparse_tune --workdir=/tmp/cast_b4 --model=<HF dir> \
      --align_data=<wildjailbreak-schema jsonl> --eval_data=<testbed world dir> \
      --conflict_map=<diagnosis dir>/conflict_map.json --head_set=bucket:4 --seed=42 \
      [--pcgrad=one_sided --util_data=<MMLU-schema jsonl>] [--config.recipe.learning_rate=...]

--head_set: bucket:<b> (B1 = highest C, Risky; BM = Safe) | top:<pct> | bottom:<pct> |
random:<pct> | random:n=<k> | all ("Full SFT": every head's W_q); --ranking c | o | s picks the
score that bucket / top / bottom sort by (conflict_map.json has all three; buckets.json only C).
all and random need no --conflict_map. --pcgrad one_sided (the paper's baseline) or symmetric
projects the D_align gradient off the gradient of a D_util batch (MMLU schema, --util_data)
drawn alongside it (`cast_jax.tuning.pcgrad`).

Defaults (configs/sparse_tune.py) are the paper's recipe: LoRA r 32 / alpha 32 / dropout 0, AdamW
lr 1e-4, 1 epoch, batch 4 x accumulation 2, max length 1024. The workdir gets train/ (metrics,
orbax checkpoints, fingerprint: a killed run resumes), adapter/ (PEFT: adapter_config.json +
adapter_model.safetensors, target q_proj), merged/ (HF checkpoint), run.json, eval.json (MMLU /
CSQA / GSM8K analogues, vanilla / adversarial harmful refusal, benign over-refusal, Avg Gen /
Avg Safe: `cast_jax.tuning.evaluation`), config.json and done.json (written last; a re-run with
the same settings prints the finished result, other settings are refused).
"""

import os

from absl import app, flags

from launch import common
from launch.tune_common import (KINDS, PCGRAD_MODES, check_file, check_model, check_recipe,
                                 lora_config, recipe, resolve_mask)

_CONFIG, _WORKDIR = common.define_flags("sparse_tune.py")
_MODEL = flags.DEFINE_string("model", None, "Base model: HF checkpoint dir with its tokenizer.")
_ALIGN = flags.DEFINE_string("align_data", None, "D_align: WildJailbreak-schema JSONL file.")
_EVAL = flags.DEFINE_string("eval_data", None, "Held-out evaluation dir (testbed world layout).")
_MAP = flags.DEFINE_string("conflict_map", None, "conflict_map.json / buckets.json / diagnosis "
                           "dir (launch/diagnose.py).")
_HEAD_SET = flags.DEFINE_string("head_set", None, "bucket:<b> | top:<pct> | bottom:<pct> | "
                                "random:<pct> | random:n=<k> | all")
_RANKING = flags.DEFINE_enum("ranking", "c", ["c", "o", "s"], "Score the head set ranks by.")
_SEED = flags.DEFINE_integer("seed", 42, "LoRA init, data order and random head sets.")
_PCGRAD = flags.DEFINE_string("pcgrad", "", "'' (plain SFT), one_sided or symmetric.")
_UTIL = flags.DEFINE_string("util_data", None, "D_util for PCGrad: MMLU-schema JSONL file.")

def _validate(cfg) -> None:
  check_model("model", _MODEL.value)
  check_file("align_data", _ALIGN.value)
  check_file("eval_data", _EVAL.value, kind="dir")
  spec = _HEAD_SET.value
  if not spec or spec.partition(":")[0] not in KINDS:
    raise app.UsageError(f"--head_set={spec!r}: use bucket:<b>, top:<pct>, bottom:<pct>, "
                         "random:<pct>, random:n=<k> or all.")
  if spec.partition(":")[0] in ("bucket", "top", "bottom"):
    if not _MAP.value:
      raise app.UsageError(f"--head_set={spec} ranks heads: pass --conflict_map.")
    if not os.path.exists(_MAP.value):
      raise app.UsageError(f"--conflict_map={_MAP.value!r} does not exist.")
  if _PCGRAD.value and _PCGRAD.value not in PCGRAD_MODES:
    raise app.UsageError(f"--pcgrad={_PCGRAD.value!r}: use one_sided or symmetric (or leave it "
                         "empty for plain SFT).")
  if bool(_PCGRAD.value) != bool(_UTIL.value):
    raise app.UsageError("--pcgrad and --util_data go together: PCGrad needs D_util batches, "
                         "and D_util is used only by PCGrad.")
  check_file("util_data", _UTIL.value, required=False)
  check_recipe(cfg)


def main(argv):
  del argv
  import transformers

  from cast_jax import models
  from cast_jax.tuning import evaluation, runner

  cfg = _CONFIG.value
  out = _WORKDIR.value
  common.stage(f"loading {_MODEL.value}")
  config, params = models.load_pretrained(_MODEL.value)
  tok = transformers.AutoTokenizer.from_pretrained(_MODEL.value)
  mask, _ = resolve_mask(_HEAD_SET.value, _MAP.value, config, _SEED.value, _RANKING.value)
  examples = runner.align_examples(tok, _ALIGN.value, cfg.recipe.max_len)
  util = runner.util_examples(tok, _UTIL.value, cfg.recipe.max_len) if _PCGRAD.value else None
  sets = evaluation.load_eval_sets(_EVAL.value, cfg.eval.limit)
  common.write_config(out, cfg, model=os.path.abspath(_MODEL.value), align_data=_ALIGN.value,
                      eval_data=_EVAL.value, conflict_map=_MAP.value, head_set=_HEAD_SET.value,
                      ranking=_RANKING.value, seed=_SEED.value, pcgrad=_PCGRAD.value or None,
                      util_data=_UTIL.value)
  rec = recipe(cfg)
  common.stage(f"head set {_HEAD_SET.value}: {int(mask.sum())} of {mask.size} heads; D_align "
               f"{len(examples)} examples, {rec.steps(len(examples))} steps at lr "
               f"{rec.learning_rate:g}" + (f", PCGrad {_PCGRAD.value}" if _PCGRAD.value else ""))
  got = runner.run_alignment(
      out, params=params, config=config, tokenizer=tok, examples=examples, mask=mask,
      seed=_SEED.value, recipe=rec, lora_config=lora_config(cfg), eval_sets=sets,
      eval_batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, util=util,
      pcgrad=_PCGRAD.value or None, export_merged=cfg.export_merged, progress=True,
      checkpoint_every=cfg.checkpoint_every or None,
      info={"head_set": _HEAD_SET.value, "ranking": _RANKING.value})
  print("\n" + " ".join(f"{k} {v:.3f}" for k, v in sorted(got.items())))
  common.stage(f"wrote {out}")


if __name__ == "__main__":
  common.run(main, validate=_validate)
