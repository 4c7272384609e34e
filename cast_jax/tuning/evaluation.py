"""Held-out evaluation of an aligned model for the CAST experiment (cast.md 4.1, Tables 1-2, 7).

Reads an evaluation dir laid out like the testbed's world dir (public schemas):
  mmlu/test.jsonl            MMLU        -> "mmlu"   letter-restricted MCQ accuracy
  csqa/validation.jsonl      CSQA        -> "csqa"   letter-restricted MCQ accuracy
  gsm8k/test.jsonl           GSM8K       -> "gsm8k"  boxed accuracy after greedy generation
  wildjailbreak/eval.jsonl   WildJailbreak -> "refusal_vanilla" / "refusal_adversarial" (keyword
                             refusal rate on vanilla / adversarial harmful prompts) and
                             "over_refusal" (the same rule on benign prompts, lower is better)

Every value is a fraction in [0, 1]. The two averages the paper reports (Table 1):
  avg_gen  = mean(mmlu, csqa, gsm8k)                       (the paper also has MATH; none here)
  avg_safe = mean(refusal_vanilla, refusal_adversarial)    (the paper: AdvHarm, WildGuard, DAN)
Over-refusal is reported next to them, not folded in (README: "not counted as tax").
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from cast_jax import data, eval as ev

GEN_KEYS = ("mmlu", "csqa", "gsm8k")
SAFE_KEYS = ("refusal_vanilla", "refusal_adversarial")
METRIC_KEYS = GEN_KEYS + SAFE_KEYS + ("over_refusal",)
FILES = {"mmlu": "mmlu/test.jsonl", "csqa": "csqa/validation.jsonl", "gsm8k": "gsm8k/test.jsonl",
         "safety": "wildjailbreak/eval.jsonl"}


@dataclasses.dataclass(frozen=True)
class EvalSets:
  """The held-out records, at most `limit` per metric."""
  mmlu: list
  csqa: list
  gsm8k: list
  harmful_vanilla: list
  harmful_adversarial: list
  benign: list


def check_eval_dir(path: str) -> None:
  """Raises ValueError naming the missing file when `path` lacks one of FILES."""
  missing = [f for f in FILES.values() if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise ValueError(f"evaluation dir {path!r} lacks {', '.join(missing)}; pass a dir laid out "
                     "like the testbed world dir (build_testbed(...).world_dir).")


def load_eval_sets(path: str, limit: int = 200) -> EvalSets:
  """Loads the held-out sets of an evaluation dir (module doc), `limit` items per metric."""
  check_eval_dir(path)
  p = lambda k: os.path.join(path, FILES[k])
  safety = data.load_wildjailbreak(p("safety"))
  pick = lambda harmful, adv: [r for r in safety if r.harmful == harmful
                               and (adv is None or r.adversarial == adv)][:limit]
  sets = EvalSets(mmlu=data.load_mmlu(p("mmlu"), limit=limit),
                  csqa=data.load_commonsense_qa(p("csqa"), limit=limit),
                  gsm8k=data.load_gsm8k(p("gsm8k"), limit=limit),
                  harmful_vanilla=pick(True, False), harmful_adversarial=pick(True, True),
                  benign=pick(False, None))
  for f in dataclasses.fields(sets):
    if not getattr(sets, f.name):
      raise ValueError(f"evaluation dir {path!r}: no {f.name} records (check the files' schema).")
  return sets


def _mcq(model, tokenizer, records, batch_size) -> float:
  prompts = [data.render_prompt(tokenizer, data.mcq_prompt(r)) for r in records]
  letters = tuple(data.LETTERS[:len(records[0].choices)])
  return ev.score_mcq(model, tokenizer, prompts, [r.answer_index for r in records],
                      choices=letters, batch_size=batch_size).accuracy


def _refusal(model, tokenizer, records, batch_size, max_new_tokens) -> float:
  _, _, counts = ev.score_refusal_generation(
      model, tokenizer, [data.render_prompt(tokenizer, r.prompt) for r in records],
      judge_prompts=[r.prompt for r in records], max_new_tokens=max_new_tokens,
      batch_size=batch_size)
  return counts.refusal_rate


def evaluate_alignment(model: ev.EvalModel, tokenizer: Any, sets: EvalSets, *,
                       batch_size: int = 32, max_new_tokens: int = 72) -> dict[str, float]:
  """METRIC_KEYS of `model` on `sets` plus "avg_gen" / "avg_safe" (fractions, module doc).

  Greedy decoding; `max_new_tokens` caps the reasoning and refusal generations.
  """
  out = {"mmlu": _mcq(model, tokenizer, sets.mmlu, batch_size),
         "csqa": _mcq(model, tokenizer, sets.csqa, batch_size)}
  _, scores = ev.score_reasoning_generation(
      model, tokenizer,
      [data.render_prompt(tokenizer, data.reasoning_prompt(r)) for r in sets.gsm8k],
      [r.answer for r in sets.gsm8k], max_new_tokens=max_new_tokens, batch_size=batch_size)
  out["gsm8k"] = scores.boxed_accuracy
  for key, recs in (("refusal_vanilla", sets.harmful_vanilla),
                    ("refusal_adversarial", sets.harmful_adversarial),
                    ("over_refusal", sets.benign)):
    out[key] = _refusal(model, tokenizer, recs, batch_size, max_new_tokens)
  out = {k: float(v) for k, v in out.items()}
  return with_averages(out)


def with_averages(metrics: dict[str, float]) -> dict[str, float]:
  """metrics plus avg_gen = mean(GEN_KEYS) and avg_safe = mean(SAFE_KEYS)."""
  missing = [k for k in GEN_KEYS + SAFE_KEYS if k not in metrics]
  if missing:
    raise ValueError(f"with_averages: metrics lack {missing}.")
  return {**metrics, "avg_gen": sum(metrics[k] for k in GEN_KEYS) / len(GEN_KEYS),
          "avg_safe": sum(metrics[k] for k in SAFE_KEYS) / len(SAFE_KEYS)}
