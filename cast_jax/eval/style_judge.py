"""The Shakespeare LLM-judge of lcdd-sft-eraser.md App. F.4: any local HF causal-LM checkpoint
(the paper: Qwen3-14B) reads the verbatim 0-5 rubric with one response filled in, and the
score is the digit it would answer, read from its next-token logits over "0".."5" (greedy
decoding of "a single integer", without sampling the rest of the reply).

Weights load through ``cast_jax.models.load_pretrained`` (safetensors only) and the tokenizer
with ``trust_remote_code=False``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cast_jax.data.chat import render_prompt
from cast_jax.eval import mcq
from cast_jax.eval.runners import EvalModel, _pad_id, next_token_choice_logits

# Verbatim from App. F.4 (line breaks as printed there).
SHAKESPEARE_RUBRIC = (
    "Rate the following response on a scale of 0 to 5 for how Shakespearean it sounds.\n"
    "\n"
    "0 = completely modern English, no archaic features\n"
    "1 = occasional archaic word but mostly modern\n"
    "2 = noticeably archaic vocabulary, some Shakespearean phrasing\n"
    "3 = clearly Shakespearean style throughout\n"
    "4 = strong Elizabethan English with authentic idioms and syntax\n"
    "5 = authentic Shakespearean English indistinguishable from original\n"
    "\n"
    "Response:\n"
    "{response}\n"
    "\n"
    "Reply with only a single integer: 0, 1, 2, 3, 4, or 5.")
SCORES = ("0", "1", "2", "3", "4", "5")


@dataclasses.dataclass
class StyleJudge:
  """0-5 Shakespearean-style scores of responses (App. F.4).

  Attributes:
    model: the judge model; tokenizer: its HF tokenizer.
    template: the rubric with a ``{response}`` field (default: the paper's, verbatim).
    chat_template: send the filled rubric as a user turn through the tokenizer's chat template
      (an instruction-tuned judge, as in the paper); False scores the raw text.
  """
  model: EvalModel
  tokenizer: object
  template: str = SHAKESPEARE_RUBRIC
  chat_template: bool = True
  batch_size: int = 8

  def __post_init__(self):
    if "{response}" not in self.template:
      raise ValueError("StyleJudge template must contain {response}")

  @classmethod
  def from_pretrained(cls, path: str, **kwargs) -> "StyleJudge":
    """Loads weights + tokenizer from a local checkpoint dir (never executes repo code)."""
    import transformers  # heavy; only this constructor needs it
    from cast_jax.models import load_pretrained
    config, params = load_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return cls(model=EvalModel(params, config), tokenizer=tokenizer, **kwargs)

  def render(self, responses: Sequence[str]) -> list[str]:
    """The N judge prompts."""
    filled = [self.template.replace("{response}", r) for r in responses]
    return [render_prompt(self.tokenizer, f) for f in filled] if self.chat_template else filled

  def score_logits(self, responses: Sequence[str]) -> np.ndarray:
    """float32 [N, 6]: next-token logits of "0".."5" after each judge prompt."""
    texts = self.render(responses)
    tokens = mcq.resolve_choice_tokens(self.tokenizer, texts, SCORES, space_before=False)
    return next_token_choice_logits(self.model, tokens.prompt_ids, tokens.choice_ids,
                                    pad_id=_pad_id(self.tokenizer, self.model.config),
                                    batch_size=self.batch_size)

  def scores(self, responses: Sequence[str]) -> np.ndarray:
    """int [N] in 0..5: the judge's greedy digit for each response."""
    if not responses:
      return np.zeros((0,), np.int64)
    return np.argmax(self.score_logits(responses), axis=-1).astype(np.int64)
