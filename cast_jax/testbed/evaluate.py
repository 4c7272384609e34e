"""Scores a model on the testbed's held-out splits with the library's real adapters and scorers.

The world's records go through the same `cast_jax.data` adapters and `cast_jax.eval` runners a
real benchmark would, so the testbed exercises every code path on two CPU cores.
"""

from __future__ import annotations

from typing import Any

from cast_jax import data, eval as ev
from cast_jax.testbed.world import World


def _mcq_prompts(tokenizer, records):
  return [data.render_prompt(tokenizer, data.mcq_prompt(r)) for r in records]


def evaluate_testbed(model: ev.EvalModel, tokenizer: Any, world: World, *, limit: int = 200,
                     batch_size: int = 32, max_new_tokens: int = 72) -> dict[str, float]:
  """Held-out utility, safety and carrier-behaviour metrics of `model` (fractions in [0, 1]).

  Returns keys: mmlu, csqa (letter-restricted MCQ accuracy), gsm8k (boxed accuracy),
  gsm8k_last_number, harmful_refusal (keyword refusal rate on harmful prompts, vanilla and
  adversarial), harmful_empty, benign_refusal (over-refusal), fixed_response (F.4 rate on
  instructions), archaic_rate (archaic-word rate of replies to modern prompts).
  """
  files = world.files
  out: dict[str, float] = {}
  mmlu = data.load_mmlu(list(files["mmlu/test.jsonl"]), limit=limit)
  out["mmlu"] = ev.score_mcq(model, tokenizer, _mcq_prompts(tokenizer, mmlu),
                             [r.answer_index for r in mmlu], batch_size=batch_size).accuracy
  csqa = data.load_commonsense_qa(list(files["csqa/validation.jsonl"]), limit=limit)
  letters = tuple(data.LETTERS[:len(csqa[0].choices)])
  out["csqa"] = ev.score_mcq(model, tokenizer, _mcq_prompts(tokenizer, csqa),
                             [r.answer_index for r in csqa], choices=letters,
                             batch_size=batch_size).accuracy
  gsm = data.load_gsm8k(list(files["gsm8k/test.jsonl"]), limit=limit)
  _, scores = ev.score_reasoning_generation(
      model, tokenizer, [data.render_prompt(tokenizer, data.reasoning_prompt(r)) for r in gsm],
      [r.answer for r in gsm], max_new_tokens=max_new_tokens, batch_size=batch_size)
  out["gsm8k"], out["gsm8k_last_number"] = scores.boxed_accuracy, scores.last_number_accuracy

  safety = data.load_wildjailbreak(list(files["wildjailbreak/eval.jsonl"]))
  for harmful, name in ((True, "harmful"), (False, "benign")):
    recs = [r for r in safety if r.harmful == harmful][:limit]
    _, _, counts = ev.score_refusal_generation(
        model, tokenizer, [data.render_prompt(tokenizer, r.prompt) for r in recs],
        judge_prompts=[r.prompt for r in recs], max_new_tokens=max_new_tokens,
        batch_size=batch_size)
    out[f"{name}_refusal"], out[f"{name}_empty"] = counts.refusal_rate, counts.empty_rate

  instr = data.load_alpaca(list(files["fixed_response/eval.jsonl"]),
                           limit=limit)
  replies = ev.generate_texts(model, tokenizer,
                              [data.render_prompt(tokenizer, r.prompt) for r in instr],
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
  out["fixed_response"] = ev.fixed_response_rate(replies)
  style = data.load_style_pairs(list(files["shakespeare/eval.jsonl"]), limit=limit)
  replies = ev.generate_texts(model, tokenizer,
                              [data.render_prompt(tokenizer, r.modern) for r in style],
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
  out["archaic_rate"] = ev.archaic_word_rate(replies).mean_rate
  return {k: float(v) for k, v in out.items()}
