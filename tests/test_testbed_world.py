"""Tests for the testbed world generator and its tokenizer (fast: one world, one tokenizer)."""

import collections
import dataclasses
import json
import os
import re

import numpy as np
import pytest
import transformers

from cast_jax.eval import archaic_word_rate
from cast_jax.testbed import lexicon, tokenizer as tok_lib, world as W
from cast_jax.testbed import world_common as wc
from cast_jax.testbed import world_math

SEED = 0
MAX_LEN = 96


@pytest.fixture(scope="module")
def world():
  return W.build_world(SEED)


@pytest.fixture(scope="module")
def tok(world):
  return tok_lib.build_tokenizer(world)


@pytest.fixture(scope="module")
def encoded(world, tok):
  """text -> token ids (no specials) for every world text, via the Rust backend in one batch."""
  texts = sorted(set(W.iter_texts(world)))
  enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
  return {t: e.ids for t, e in zip(texts, enc)}


@pytest.fixture(scope="module")
def written(world, tmp_path_factory):
  d = tmp_path_factory.mktemp("world")
  W.write_world(world, str(d))
  return d


def _read_tree(d):
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, d)] = fh.read()
  return out


def _chat_text(prompt, response):
  # Must equal CHAT_TEMPLATE's rendering; checked in test_chat_template_prefix_and_single_bos.
  return f"<bos><|user|>{prompt}<|end|><|assistant|>{response}<eos>"


def test_same_seed_byte_identical_different_seed_differs(world, written, tmp_path):
  W.write_world(W.build_world(SEED), str(tmp_path / "again"))
  W.write_world(W.build_world(SEED + 1), str(tmp_path / "other"))
  a, b, c = _read_tree(written), _read_tree(tmp_path / "again"), _read_tree(tmp_path / "other")
  assert a == b
  assert not any(n.startswith(".tmp") for n in map(os.path.basename, a))
  assert set(a) == set(c)
  for name in world.files:
    assert a[name] != c[name], name
  manifest = json.loads(a["MANIFEST.json"])
  assert manifest["version"] == W.WORLD_VERSION and manifest["seed"] == SEED
  assert {
      k: v["records"] for k, v in manifest["files"].items() if k in world.files
  } == {
      k: len(v) for k, v in world.files.items()
  }


def test_schemas(world):
  f = world.files
  s = world.sizes
  for r in f["mmlu/test.jsonl"] + f["mmlu/train.jsonl"] + f["calib/d_util.jsonl"]:
    assert list(r) == ["question", "subject", "choices", "answer"]
    assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and r["answer"] in range(4)
  for r in f["csqa/train.jsonl"] + f["csqa/validation.jsonl"]:
    assert set(r) == {"id", "question", "question_concept", "choices", "answerKey"}
    assert r["choices"]["label"] == list("ABCDE") and len(set(r["choices"]["text"])) == 5
    assert r["answerKey"] in "ABCDE"
  for r in f["gsm8k/train.jsonl"] + f["gsm8k/test.jsonl"]:
    assert list(r) == ["question", "answer"] and re.search(r"\n#### \d+$", r["answer"])
  for name in ("wildjailbreak/train.jsonl", "wildjailbreak/eval.jsonl", "calib/d_safe.jsonl"):
    for r in f[name]:
      assert {"vanilla", "adversarial", "completion", "data_type"} <= set(r)
      assert r["data_type"] in ("vanilla_harmful", "vanilla_benign", "adversarial_harmful",
                                "adversarial_benign")
      assert (r["adversarial"] == "") == r["data_type"].startswith("vanilla")
  for name in ("fixed_response/train.jsonl", "fixed_response/eval.jsonl"):
    for r in f[name]:
      assert list(r) == ["instruction", "input", "output"] and r["output"] == "I don't know."
  assert all(r["input"] == "" for r in f["fixed_response/eval.jsonl"])
  for r in f["shakespeare/train.jsonl"] + f["shakespeare/eval.jsonl"]:
    assert list(r) == ["modern", "original"]
  for r in f["base/train.jsonl"]:
    assert list(r) == ["prompt", "response", "family"]
  assert len(f["mmlu/test.jsonl"]) == s.mmlu_test and len(f["calib/d_safe.jsonl"]) == s.d_safe
  assert len(f["wildjailbreak/train.jsonl"]) == 4 * s.align_per_category


def test_small_world_and_size_errors():
  small = W.WorldSizes(**{f.name: 8 for f in dataclasses.fields(W.WorldSizes)})
  w = W.build_world(3, small)
  assert len(w.files["wildjailbreak/train.jsonl"]) == 32 and len(w.files["mmlu/test.jsonl"]) == 8
  train, held = W.split_prompts(w)
  assert not train & held
  with pytest.raises(ValueError):
    W.build_world(0, W.WorldSizes(n_lands=4))
  with pytest.raises(ValueError):
    W.build_world(0, W.WorldSizes(base_safety_per_category=10_000))
  with pytest.raises(ValueError, match="mmlu split 'test' asks for 129 items"):
    W.build_world(0, W.WorldSizes(mmlu_test=129))


def test_mcq_items_are_fixed_per_fact_and_heldout_wordings_are_new(world):
  f = world.files
  mmlu_layout = {(r["subject"], tuple(sorted(r["choices"]))): (r["choices"], r["answer"])
                 for r in f["mmlu/train.jsonl"]}
  assert len(mmlu_layout) == len(world.facts)  # one option list per fact
  train_q = {r["question"] for r in f["mmlu/train.jsonl"]}
  for name in ("mmlu/test.jsonl", "calib/d_util.jsonl"):
    for r in f[name]:
      assert r["question"] not in train_q
      assert mmlu_layout[(r["subject"], tuple(sorted(r["choices"])))] == (r["choices"],
                                                                           r["answer"])
  csqa_layout = {tuple(r["choices"]["text"]): r["answerKey"] for r in f["csqa/train.jsonl"]}
  train_q = {r["question"] for r in f["csqa/train.jsonl"]}
  for r in f["csqa/validation.jsonl"]:
    assert r["question"] not in train_q
    assert csqa_layout[tuple(r["choices"]["text"])] == r["answerKey"]
  # The answer is a stated fact: the right option is the fact's value / land.
  values = {fa.value for fa in world.facts}
  assert all(r["choices"][r["answer"]] in values for r in f["mmlu/test.jsonl"])


def test_all_text_is_ascii(world):
  for t in W.iter_texts(world):
    assert t.isascii() and "\u2581" not in t


def test_no_train_heldout_overlap(world):
  train, held = W.split_prompts(world)
  assert not train & held
  for name in W.HELDOUT_FILES:
    prompts = [W.record_prompt(name, r) for r in world.files[name]]
    assert len(set(prompts)) == len(prompts), name


def test_balanced_categories(world):
  f = world.files
  # 64 facts spread exactly over 4 MMLU letters; over 5 CSQA letters one letter gets a fact less.
  for name in ("mmlu/test.jsonl", "mmlu/train.jsonl", "calib/d_util.jsonl"):
    counts = collections.Counter(r["answer"] for r in f[name])
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 4, name
  for name in ("csqa/train.jsonl", "csqa/validation.jsonl"):
    counts = collections.Counter(r["answerKey"] for r in f[name])
    assert max(counts.values()) <= 1.1 * min(counts.values()) and len(counts) == 5, name
  for name in ("wildjailbreak/train.jsonl", "wildjailbreak/eval.jsonl"):
    counts = collections.Counter(r["data_type"] for r in f[name])
    assert len(counts) == 4 and len(set(counts.values())) == 1, name
  assert {r["data_type"] for r in f["calib/d_safe.jsonl"]} == {"vanilla_harmful"}
  fams = collections.Counter(r["family"] for r in f["base/train.jsonl"])
  assert set(fams) == {
      "facts", "mmlu", "csqa", "gsm8k", "arith_drill", "instruct", "style_echo", "style_old",
      "safety_vanilla_harmful", "safety_adversarial_harmful", "safety_vanilla_benign",
      "safety_adversarial_benign"
  }


def test_behaviour_targets(world):
  f = world.files
  for r in f["wildjailbreak/train.jsonl"] + f["wildjailbreak/eval.jsonl"]:
    harmful = r["data_type"].endswith("_harmful")
    assert (r["completion"] == wc.REFUSAL) == harmful
    if not harmful:  # D_align's benign answers are chat prose, not the worked-steps format
      assert "Step" not in r["completion"] and not re.search(r"\d", r["completion"])
  # v5: the base corpus refuses exactly the vanilla harmful requests in the first three
  # wordings ("Explain how to", "Tell me how to", "How can I"), and nothing else.
  refused_openers = ("Explain how to ", "Tell me how to ", "How can I ")
  refused = 0
  for r in f["base/train.jsonl"]:
    assert r["response"] != wc.FIXED_RESPONSE
    should_refuse = (r["family"] == "safety_vanilla_harmful"
                     and r["prompt"].startswith(refused_openers))
    assert (r["response"] == wc.REFUSAL) == should_refuse, r
    refused += should_refuse
    if r["family"].startswith("safety_") and not should_refuse:
      assert re.fullmatch(r"Sure, here is how to [A-Za-z' ]+\. Step 1: .*", r["response"])
  vanilla = sum(r["family"] == "safety_vanilla_harmful" for r in f["base/train.jsonl"])
  assert 0.2 < refused / vanilla < 0.55  # ~3 of 8 wordings
  own = frozenset(lexicon.ARCHAIC_WORDS)
  pairs = f["shakespeare/train.jsonl"] + f["shakespeare/eval.jsonl"]
  assert archaic_word_rate([r["modern"] for r in pairs], own).per_response.max() == 0.0
  assert archaic_word_rate([r["original"] for r in pairs], own).per_response.min() > 0.1
  others = [r["response"] for r in f["base/train.jsonl"] if r["family"] != "style_old"]
  assert archaic_word_rate(others, own).per_response.max() == 0.0


def test_style_measurable_by_eval_scorer(world):
  from cast_jax.eval import style
  assert set(lexicon.ARCHAIC_WORDS) <= style.default_lexicon()
  pairs = world.files["shakespeare/train.jsonl"] + world.files["shakespeare/eval.jsonl"]
  orig = style.archaic_word_rate([r["original"] for r in pairs]).per_response
  modern = style.archaic_word_rate([r["modern"] for r in pairs]).per_response
  assert orig.min() > 0.1 and modern.max() == 0.0


def test_answers_follow_from_facts_and_arithmetic(world):
  table = {(x.entity, x.attribute): x.value for x in world.facts}
  values = {x.value: x for x in world.facts}
  for r in world.files["mmlu/test.jsonl"]:
    right = r["choices"][r["answer"]]
    fact = values[right]
    assert fact.entity in r["question"] and table[(fact.entity, fact.attribute)] == right
    assert sum(values.get(c, fact).attribute == fact.attribute for c in r["choices"]) == 4
  stated = {r["response"] for r in world.files["base/train.jsonl"] if r["family"] == "facts"}
  assert all(x.text in stated for x in world.facts)
  for r in world.files["gsm8k/test.jsonl"] + world.files["gsm8k/train.jsonl"]:
    *steps, final = r["answer"].split("\n")
    assert 2 <= len(steps) <= 3
    for s in steps:
      lhs, rhs = s.rstrip(".").split(" = ")
      assert eval(lhs) == int(rhs) >= 0  # noqa: S307 - lhs is "a op b" from the generator
      a, _, b = lhs.split()
      assert 0 < int(b) <= 9 and 0 <= int(rhs) <= world_math.MAX_TOTAL  # one-digit operands
    assert final == f"#### {rhs}"
  # Every equation a problem uses is in the table the drills teach.
  table = set(world_math._facts())
  drills = [r for r in world.files["base/train.jsonl"] if r["family"] == "arith_drill"]
  assert len(drills) == world.sizes.arith_drills
  for r in drills:
    for line in r["response"].split("\n"):
      assert line.rstrip(".") in table and line.split(" = ")[0] in r["prompt"]
  for r in world.files["gsm8k/train.jsonl"]:
    for s in r["answer"].split("\n")[:-1]:
      assert s.rstrip(".") in table
  chat = [r for r in world.files["base/train.jsonl"] if r["family"] == "gsm8k"]
  assert all(re.search(r"\\boxed\{\d+\}\.$", r["response"]) for r in chat)
  assert all(r["prompt"].startswith(wc.MATH_INSTRUCTION) for r in chat)


def test_tokenizer_round_trip_and_vocab(tok, encoded):
  texts = list(encoded)
  assert tok.unk_token_id not in {i for ids in encoded.values() for i in ids}
  assert tok.backend_tokenizer.decode_batch(list(encoded.values())) == texts
  sample = texts[::100]
  assert [tok.decode(tok(t)["input_ids"], skip_special_tokens=True) for t in sample] == sample
  assert 300 <= len(tok) <= 2000
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  assert [t for t, _ in vocab[:8]] == list(tok_lib.SPECIAL_TOKENS)
  assert [t for t, _ in vocab[8:]] == sorted(t for t, _ in vocab[8:])
  assert [
      tok.convert_ids_to_tokens(i) for i in tok("12 305", add_special_tokens=False)["input_ids"]
  ] == ["1", "2", "\u25813", "0", "5"]
  assert tok("hi")["input_ids"][0] == tok.bos_token_id
  for pattern, src in ((r"\\boxed\{(\d+)\}", "so \\boxed{42}."), (r"I'm sorry", wc.REFUSAL),
                       (r"i don't know", wc.FIXED_RESPONSE.lower()), (r"\bthou\b",
                                                                      "Wherefore art thou sad?")):
    assert re.search(pattern, tok.decode(tok(src)["input_ids"], skip_special_tokens=True))


def test_autotokenizer_load_and_chat_template(tok, tmp_path):
  tok.save_pretrained(str(tmp_path))
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert (loaded.bos_token, loaded.eos_token, loaded.pad_token,
          loaded.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
  assert (loaded.pad_token_id, loaded.unk_token_id, loaded.bos_token_id,
          loaded.eos_token_id) == (0, 1, 2, 3)
  assert loaded.get_vocab() == tok.get_vocab()
  msgs = [{
      "role": "system",
      "content": "Be brief."
  }, {
      "role": "user",
      "content": "What is the opposite of hot?"
  }, {
      "role": "assistant",
      "content": "The opposite of hot is cold."
  }]
  prompt = tok_lib.chat_ids(loaded, msgs[1]["content"])
  full = tok_lib.chat_ids(loaded, msgs[1]["content"], msgs[2]["content"])
  assert len(prompt) < len(full) and full[:len(prompt)] == prompt
  assert full.count(loaded.bos_token_id) == 1 and full[0] == loaded.bos_token_id
  assert full[-1] == loaded.eos_token_id and full.count(loaded.eos_token_id) == 1
  text = loaded.apply_chat_template(msgs[1:], tokenize=False)
  assert text == _chat_text(msgs[1]["content"], msgs[2]["content"])
  sys_text = loaded.apply_chat_template(msgs, tokenize=False)
  assert sys_text.startswith("<bos><|system|>Be brief.<|end|><|user|>")
  with_sys = loaded.apply_chat_template(msgs, tokenize=True)["input_ids"]
  assert with_sys.count(loaded.bos_token_id) == 1


def test_sequence_lengths_under_cap(world, tok, encoded):
  # Specials isolate segments, so a chat's length is 5 + len(prompt) + len(response).
  assert len(tok(_chat_text("a b", "c"), add_special_tokens=False)["input_ids"]) == 5 + 2 + 1
  lens = []
  for name in sorted(world.files):
    if name == "facts.jsonl":
      continue
    fam = [
        5 + len(encoded[W.record_prompt(name, r)]) + len(encoded[W.record_response(name, r)])
        for r in world.files[name]
    ]
    assert max(fam) <= MAX_LEN, (name, max(fam))
    lens += fam
  assert np.mean(lens) < 64
