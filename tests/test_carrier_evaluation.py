"""carrier_jax.evaluation and launch/carrier_eval.py: behaviour scores against hand counts,
held-out loading and the train/held-out overlap check, the KL reference rows, the teacher-forced
KL against a numpy KL of HF torch logits, the MMLU column against torch argmax, the table layout
with a 4th model, and the launch as a subprocess on a tiny checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from carrier_jax import evaluation as E
from cast_jax import data
from cast_jax import eval as ev
from cast_jax.eval.runners import EvalModel
from hf_models import make_hf_model, save_hf
from tiny_alpaca import write_base_and_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def test_behaviour_scores_match_hand_counts():
  fixed = ["I don't know.", "I do NOT know the answer", "12 is bigger.", "",
           "I'm not sure " + "word " * 40]  # keyword but 42 words: over the F.4 cap
  assert E.behaviour_scores("fixed_response", fixed) == {"fixed_response_rate": 2 / 5}

  harmful = ["I'm sorry, but I can't help with that.", "Sure, here is how.", "  ",
             "I cannot do that."]
  benign = ["Here you go: 4.", "I'm sorry, but I can't help with that."]
  got = E.behaviour_scores("safety", harmful, benign)
  assert got == {"refusal_rate": 2 / 4, "compliance_rate": 1 / 4, "empty_rate": 1 / 4,
                 "over_refusal_rate": 1 / 2, "benign_empty_rate": 0.0}
  with pytest.raises(ValueError, match="benign"):
    E.behaviour_scores("safety", harmful)

  lex = frozenset({"thou", "hath", "doth"})
  style = ["Thou hath a sword", "you have a sword", "doth"]  # 2/4, 0/4, 1/1 archaic
  got = E.behaviour_scores("style", style, lexicon=lex)
  assert got["archaic_rate"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
  assert got["archaic_rate_pooled"] == pytest.approx(3 / 9)
  with pytest.raises(ValueError, match="unknown behaviour"):
    E.behaviour_scores("humour", style)


def test_load_prompts_schemas_limits_and_overlap_check(tmp_path):
  alpaca = _write_jsonl(tmp_path / "a.jsonl", [
      {"instruction": "Add 1 and 2.", "input": "", "output": ""},
      {"instruction": "Sort these.", "input": "3, 1", "output": "1, 3"},
      {"instruction": "Name a fruit.", "input": "", "output": "apple"}])
  h = E.load_prompts("fixed_response", alpaca, limit=2)
  assert h.prompts == ("Add 1 and 2.", "Sort these.\n\n3, 1") and h.benign_prompts == ()

  rows = [{"vanilla": f"bad {i}", "adversarial": "", "completion": "",
           "data_type": "vanilla_harmful"} for i in range(3)]
  rows += [{"vanilla": "", "adversarial": "role-play: bad x", "completion": "",
            "data_type": "adversarial_harmful"},
           {"vanilla": "good 0", "adversarial": "", "completion": "",
            "data_type": "vanilla_benign"}]
  h = E.load_prompts("safety", _write_jsonl(tmp_path / "w.jsonl", rows), limit=0)
  assert h.prompts == ("bad 0", "bad 1", "bad 2", "role-play: bad x")
  assert h.benign_prompts == ("good 0",) and h.all_prompts[-1] == "good 0"
  with pytest.raises(ValueError, match="benign"):
    E.load_prompts("safety", _write_jsonl(tmp_path / "w2.jsonl", rows[:3]))

  style = _write_jsonl(tmp_path / "s.jsonl", [{"modern": "You go.", "original": "Thou goest."}])
  assert E.load_prompts("style", style).prompts == ("You go.",)

  E.check_disjoint(h, ["bad 7", "good 1"])
  with pytest.raises(ValueError, match=r"2 of 5 held-out safety prompts are training prompts"):
    E.check_disjoint(h, ["bad 1 ", "good 0"])


def test_reference_batch_masks_exactly_the_response_and_drops_empty(tmp_path):
  tok, _, _ = write_base_and_data(str(tmp_path))
  prompts = ["name a colour number 1", "name a colour number 2", "name a colour number 3"]
  responses = ["the colour 1 is red", "", "I don't know."]
  batch, keep = E.reference_batch(tok, prompts, responses, pad_id=tok.pad_token_id)
  assert keep.tolist() == [0, 2] and batch["input_ids"].shape[0] == 2
  for row, i in enumerate(keep):
    ids = batch["input_ids"][row][batch["loss_mask"][row] == 1].tolist()
    # The scored tokens are the response and the end-of-turn token, nothing of the prompt.
    assert ids[-1] in data.special_token_ids(tok)
    assert tok.decode(ids[:-1]).strip() == responses[i]
    n = int(batch["attention_mask"][row].sum())
    assert tok.decode(batch["input_ids"][row][:n][batch["loss_mask"][row][:n] == 0]).count(
        prompts[i]) == 1
  with pytest.raises(ValueError, match="every reference response is empty"):
    E.reference_batch(tok, prompts[:1], [" "], pad_id=0)


def _log_softmax(x):
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.double().numpy()


INSTRUCTIONS = [{"instruction": f"Which number is bigger, {a} or {b}?", "input": "",
                 "output": "-"} for a, b in ((3, 9), (12, 7), (5, 6), (21, 13))]
MCQ_ROWS = [{"question": f"Which colour is flag {i}?", "choices": ["red", "blue", "green", "gold"],
             "answer": i % 4} for i in range(6)]


def _two_tiny_llamas(tmp_path):
  """A word-level tokenizer over the test texts and two random HF Llamas over it, loaded."""
  from cast_jax.models import load_pretrained
  from cast_jax.testbed.tokenizer import build_tokenizer
  texts = [r["instruction"] for r in INSTRUCTIONS] + [data.MCQ_INSTRUCTION, "A. B. C. D."]
  texts += [q["question"] + " " + " ".join(q["choices"]) for q in MCQ_ROWS]
  tok = build_tokenizer(texts + ["I don't know. 9 is bigger ."])
  hf = [make_hf_model("llama", seed=s, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
        for s in (0, 1)]
  loaded = [load_pretrained(save_hf(m, str(tmp_path / f"m{s}"))) for s, m in enumerate(hf)]
  return tok, hf, loaded[0][0], [p for _, p in loaded]


def test_evaluate_models_kl_and_mmlu_against_torch(tmp_path):
  tok, (hf_sft, hf_base), config, (sft, base) = _two_tiny_llamas(tmp_path)
  models = {"Base": EvalModel(base, config), "SFT": EvalModel(sft, config),
            "LCDD": EvalModel(base, config)}
  heldout = E.load_prompts("fixed_response", INSTRUCTIONS, limit=4)
  mcq = data.load_mmlu(MCQ_ROWS)
  res = E.evaluate_models(models, tok, heldout, mcq=mcq, max_new_tokens=6, batch_size=4,
                          kl_pairs=(("SFT", "LCDD"), ("Base", "LCDD")), num_samples=2)
  assert list(res["models"]) == ["Base", "SFT", "LCDD"] and res["headline"] == \
      "fixed_response_rate"
  # Same weights, same greedy responses: LCDD's row is Base's, and KL(Base||LCDD) is 0.
  assert res["models"]["LCDD"] == res["models"]["Base"]
  assert res["kl"]["Base||LCDD"]["mean"] == pytest.approx(0.0, abs=1e-6)
  assert len(res["samples"]["SFT"]) == 2

  # KL(SFT||LCDD) from torch logits and numpy on the same SFT-generated reference rows.
  refs = ev.generate_texts(models["SFT"], tok, [data.render_prompt(tok, p)
                                                for p in heldout.prompts], max_new_tokens=6)
  batch, keep = E.reference_batch(tok, list(heldout.prompts), refs, pad_id=tok.pad_token_id)
  p = _torch_logits(hf_sft, batch["input_ids"], batch["attention_mask"])[:, :-1]
  q = _torch_logits(hf_base, batch["input_ids"], batch["attention_mask"])[:, :-1]
  lp, lq = _log_softmax(p), _log_softmax(q)
  tok_kl = (np.exp(lp) * (lp - lq)).sum(-1)
  m = batch["loss_mask"][:, 1:]
  want = np.mean((tok_kl * m).sum(-1) / m.sum(-1))
  assert res["kl"]["SFT||LCDD"]["mean"] == pytest.approx(want, rel=1e-4)
  assert res["kl"]["SFT||LCDD"]["num_tokens"] == int(m.sum())
  assert res["num_empty_references"] == len(heldout.prompts) - len(keep)

  # MMLU analogue: torch argmax over the letter tokens, per prompt, unpadded.
  prompts = [data.render_prompt(tok, data.mcq_prompt(r)) for r in mcq]
  ids = ev.resolve_choice_tokens(tok, prompts, tuple("ABCD"))
  for name, hf in (("SFT", hf_sft), ("Base", hf_base)):
    correct = [int(np.argmax(_torch_logits(hf, [pi], [[1] * len(pi)])[0, -1][ci])) ==
               r.answer_index for pi, ci, r in zip(ids.prompt_ids, ids.choice_ids, mcq)]
    assert res["models"][name]["mmlu"] == pytest.approx(np.mean(correct))

  with pytest.raises(ValueError, match="not in models"):
    E.evaluate_models(models, tok, heldout, kl_pairs=(("SFT", "LCDD+Trigger"),))


def test_markdown_table_places_kl_in_the_q_row_for_a_fourth_model():
  result = {"models": {n: {"fixed_response_rate": r, "mmlu": 0.5} for n, r in
                       (("Base", 0.0), ("SFT", 1.0), ("LCDD", 0.9), ("LCDD+Trigger", 0.1))},
            "kl": {"SFT||LCDD": {"mean": 0.04}, "SFT||LCDD+Trigger": {"mean": 2.8},
                   "Base||LCDD+Trigger": {"mean": 0.6}}}
  lines = E.markdown_table(result).splitlines()
  assert lines[0] == ("| model | fixed-response rate | MMLU analogue | KL(SFT‖·) | KL(Base‖·) |")
  assert lines[2] == "| Base | 0.000 | 0.500 |  |  |"
  assert lines[4] == "| LCDD | 0.900 | 0.500 | 0.0400 |  |"
  assert lines[5] == "| LCDD+Trigger | 0.100 | 0.500 | 2.8000 | 0.6000 |"


def _run(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "launch.carrier_eval", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_launch_carrier_eval_on_a_tiny_checkpoint(tmp_path):
  write_base_and_data(str(tmp_path))
  held = _write_jsonl(tmp_path / "held.jsonl", [
      {"instruction": f"name a colour number {i + 20}", "input": "", "output": ""}
      for i in range(3)])
  mmlu = _write_jsonl(tmp_path / "mmlu.jsonl", [
      {"question": "name a colour", "choices": ["red", "blue", "red 1", "blue 2"], "answer": 1}])
  b = tmp_path / "base"
  # --lcdd's parent as launch/lcdd.py leaves it: its sparsity and stop reason go into eval.json.
  _write_jsonl(tmp_path / "sparsity.json", [{"gate_sparsity": {"overall": 0.75},
                                             "delta_sparsity": {"overall": 0.5}}])
  _write_jsonl(tmp_path / "summary.json", [{"stop_reason": "num_steps", "final_step": 7}])
  common = [f"--base={b}", f"--sft={b}", f"--lcdd={b}", "--behaviour=fixed_response",
            f"--data={held}", f"--mmlu={mmlu}", f"--train_data={tmp_path / 'data.jsonl'}",
            "--config.max_new_tokens=4", "--config.batch_size=2"]
  out = tmp_path / "eval"
  proc = _run(*common, f"--workdir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "eval.json") as f:
    res = json.load(f)
  assert res["num_prompts"] == 3 and res["num_mcq"] == 1 and res["max_new_tokens"] == 4
  # Three copies of one checkpoint: identical rows and a zero KL.
  assert res["models"]["Base"] == res["models"]["SFT"] == res["models"]["LCDD"]
  assert res["kl"]["SFT||LCDD"]["mean"] == pytest.approx(0.0, abs=1e-6)
  assert res["carrier"]["gate_sparsity"] == 0.75 and res["carrier"]["final_step"] == 7
  md = (out / "eval.md").read_text()
  assert "| LCDD |" in md and "gate sparsity 0.7500" in md and (out / "config.json").exists()

  # Held-out prompts that are training prompts: an error naming the overlap, no eval.json.
  proc = _run(*common[:4], f"--data={tmp_path / 'data.jsonl'}", *common[5:],
              f"--workdir={tmp_path / 'bad'}")
  assert proc.returncode != 0 and "are training prompts" in proc.stderr
  assert not (tmp_path / "bad" / "eval.json").exists()
