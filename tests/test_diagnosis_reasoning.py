"""Reasoning calibration (cast.md F.4, `diagnosis.reasoning`) on the testbed's trained base model:
the L_util targets against the testbed's own solution format, and the reasoning sweep's
per-unit correctness against HF transformers greedy `generate` with an o_proj forward pre-hook
zeroing the unit's query heads, scored by `score_reasoning`."""

import numpy as np
import pytest
import torch
import transformers

from cast_jax import data
from cast_jax.data.records import ReasoningRecord
from cast_jax.diagnosis import reasoning, targets
from cast_jax.eval.answer_extraction import score_reasoning
from cast_jax.testbed import build as tbuild
from cast_jax.testbed import world_math

N, GEN_LEN = 6, 40


@pytest.fixture(scope="module")
def setup():
  tb = tbuild.build_testbed(tbuild.TestbedSpec(), progress=False)
  raw = tb.world.files["gsm8k/test.jsonl"][:N]
  records = data.load_gsm8k(list(raw))
  rset, examples = reasoning.reasoning_calibration(tb.tokenizer, records, max_len=160)
  return dict(tb=tb, raw=raw, records=records, rset=rset, examples=examples)


def test_targets_are_the_worked_solution_with_a_boxed_answer(setup):
  tok = setup["tb"].tokenizer
  assert len(setup["examples"]) == N
  for raw, rec, (ids, mask), prompt in zip(setup["raw"], setup["records"], setup["examples"],
                                           setup["rset"].prompt_ids):
    want = world_math.gsm8k_chat(raw)["response"]  # the format the base model was trained on
    assert reasoning.reasoning_response(rec) == want
    assert tok.decode(ids[mask == 1], skip_special_tokens=True).strip() == want
    assert ids[mask == 1][-1] == tok.eos_token_id  # the end of turn is trained too
    assert list(ids[:len(prompt)]) == prompt and not mask[:len(prompt)].any()
    assert data.REASONING_INSTRUCTION in tok.decode(prompt)
  assert setup["rset"].references == [str(world_math.gsm8k_final_answer(r)) for r in setup["raw"]]
  # Real GSM8K: calculator annotations dropped, "#### N" becomes the box.
  gsm = ReasoningRecord("Q?", "24", "Half of 48 is 48/2 = <<48/2=24>>24.\nSo 24.")
  assert reasoning.reasoning_response(gsm) == ("Half of 48 is 48/2 = 24.\nSo 24.\n"
                                               "The answer is \\boxed{24}.")
  assert reasoning.reasoning_response(ReasoningRecord("Q?", "7")) == "The answer is \\boxed{7}."
  with pytest.raises(ValueError, match="no final answer"):
    reasoning.reasoning_response(ReasoningRecord("Q?", " "))
  with pytest.raises(ValueError, match="answer='exact'"):
    reasoning.score_texts(["1"], ["1"], answer="exact")


def _hf_correct(model, tok, rset, zero_heads, head_dim, answer):
  """Correctness [N] of HF greedy generations with query heads {layer: [heads]} zeroed at
  o_proj's input (left-padded batch)."""
  handles = []
  for layer, heads in zero_heads.items():
    def hook(module, args, heads=heads):
      x = args[0].clone()
      for h in heads:
        x[..., h * head_dim:(h + 1) * head_dim] = 0.0
      return (x,)
    handles.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook))
  try:
    T = max(len(p) for p in rset.prompt_ids)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in rset.prompt_ids])
    attn = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in rset.prompt_ids])
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=GEN_LEN,
                           do_sample=False, pad_token_id=0, eos_token_id=tok.eos_token_id)
  finally:
    for h in handles:
      h.remove()
  texts = [tok.decode(row[T:], skip_special_tokens=True) for row in out]
  got = score_reasoning(texts, rset.references)
  return got.boxed_correct if answer == "boxed" else got.last_number_correct


def test_sweep_equals_hf_generate_with_units_zeroed(setup):
  tb, rset = setup["tb"], setup["rset"]
  config, tok = tb.config, tb.tokenizer
  group = targets.unit_group(config, "k")  # KV-head units: the grouped case
  L, U = config.num_layers, config.num_heads // group
  blocks = {}
  kw = dict(group=group, max_new_tokens=GEN_LEN, pad_id=0, batch_size=N, mask_block=6)
  sweep = reasoning.reasoning_sweep(tb.base_params, config, tok, rset,
                                    on_block=blocks.__setitem__, **kw)
  assert sweep.correct.shape == (L, U, N)
  assert len(blocks) == 3  # 1 + 16 masks in blocks of 6
  hf = transformers.AutoModelForCausalLM.from_pretrained(tb.base_dir, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
  Dh = config.head_dim
  base = _hf_correct(hf, tok, rset, {}, Dh, "boxed")
  np.testing.assert_array_equal(sweep.base_correct, base)
  assert sweep.base_accuracy >= 0.5  # the base model reasons: a meaningful reference
  # HF generation is the slow half: every unit of the first and the third layer (on this model
  # layer 0's KV heads break most answers, layer 2's break some or none).
  checked = (0, 2)
  want = np.zeros((len(checked), U, N), bool)
  for i, l in enumerate(checked):
    for u in range(U):
      want[i, u] = _hf_correct(hf, tok, rset, {l: list(range(u * group, (u + 1) * group))}, Dh,
                               "boxed")
  np.testing.assert_array_equal(sweep.correct[list(checked)], want)
  np.testing.assert_allclose(sweep.h_gen[list(checked)], np.abs(want.mean(-1) - base.mean()))
  assert want.mean(-1).min() < base.mean() and (want == base).all(-1).any()

  # Resume: blocks an earlier run stored are taken as they are, only the others are decoded.
  first = sorted(blocks)[:2]
  recomputed = {}
  resumed = reasoning.reasoning_sweep(tb.base_params, config, tok, rset,
                                      done={k: blocks[k] for k in first},
                                      on_block=recomputed.__setitem__, **kw)
  assert sorted(recomputed) == sorted(blocks)[2:]
  np.testing.assert_array_equal(resumed.correct, sweep.correct)
  with pytest.raises(ValueError, match="belongs to another run"):
    reasoning.reasoning_sweep(tb.base_params, config, tok, rset,
                              done={first[0]: blocks[first[0]][:, :2]}, **kw)
