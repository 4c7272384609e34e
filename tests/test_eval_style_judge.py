"""The App. F.4 Shakespeare LLM-judge: the verbatim rubric, and each score is the digit HF
transformers' next-token logits prefer after the rendered judge prompt."""

import numpy as np
import pytest
import torch

from cast_jax.eval.runners import EvalModel
from cast_jax.eval.style_judge import SHAKESPEARE_RUBRIC, StyleJudge
from hf_models import make_hf_model, save_hf

RESPONSES = ["Thou art a knave , and thy words are naught .", "This is a plain modern reply .",
             "Prithee , good sir , hark ."]


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
  from cast_jax.models import load_pretrained
  from cast_jax.testbed.tokenizer import build_tokenizer
  tok = build_tokenizer([SHAKESPEARE_RUBRIC] + RESPONSES + ["0 1 2 3 4 5"])
  hf = make_hf_model("llama", seed=3, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
  config, params = load_pretrained(save_hf(hf, str(tmp_path_factory.mktemp("judge"))))
  return hf, tok, StyleJudge(EvalModel(params, config), tok, batch_size=2)


def test_rubric_is_the_papers_verbatim_text():
  assert SHAKESPEARE_RUBRIC.startswith("Rate the following response on a scale of 0 to 5 for how "
                                       "Shakespearean it sounds.\n\n0 = completely modern English")
  assert "5 = authentic Shakespearean English indistinguishable from original\n" in \
      SHAKESPEARE_RUBRIC
  assert SHAKESPEARE_RUBRIC.endswith("Response:\n{response}\n\nReply with only a single integer: "
                                     "0, 1, 2, 3, 4, or 5.")


def test_scores_are_the_argmax_digit_of_hf_logits(judge):
  hf, tok, j = judge
  got = j.scores(RESPONSES)
  want = []
  for text in j.render(RESPONSES):
    ids = tok.encode(text, add_special_tokens=False)
    digits = [tok.encode(text + d, add_special_tokens=False)[-1] for d in "012345"]
    with torch.no_grad():
      logits = hf(torch.tensor([ids])).logits[0, -1].numpy()
    want.append(int(np.argmax(logits[digits])))
  np.testing.assert_array_equal(got, want)
  assert j.render(["x"])[0] != SHAKESPEARE_RUBRIC.replace("{response}", "x")  # chat template
  assert j.scores([]).shape == (0,)
  with pytest.raises(ValueError, match="response"):
    StyleJudge(j.model, tok, template="no field")
