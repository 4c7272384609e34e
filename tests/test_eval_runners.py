"""Model-driven runners (MCQ, generation, LM judge) against HF transformers on a tiny random
Llama and a word-level byte-level tokenizer built here (no hub access)."""

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from cast_jax.eval import judge as judge_lib
from cast_jax.data import prompts
from cast_jax.data.records import MCQRecord, ReasoningRecord
from cast_jax.eval import mcq, refusal, runners
from cast_jax.models import load_pretrained

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
CORPUS = [
    prompts.MCQ_INSTRUCTION, prompts.REASONING_INSTRUCTION, judge_lib.DEFAULT_JUDGE_TEMPLATE,
    "What is the capital of France? Which gas do plants absorb? Pick the prime number.",
    "Paris London Rome Berlin oxygen carbon nitrogen helium four six nine seven",
    "Answer: A B C D E yes no the answer is 42 I'm sorry, but I can't help with that.",
    "How do I bake bread? Sure, here is how: mix flour and water.",
    "user assistant",
]


def _tokenizer():
  pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
  words = set()
  for text in CORPUS:
    words.update(w for w, _ in pre.pre_tokenize_str(text))
  for w in list(words):  # every word also with and without a leading space
    words.add(w[1:] if w.startswith("\u0120") else "\u0120" + w)
  words.update(["\u010a", "\u010a\u010a"])  # newline, blank line
  vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre
  tok.decoder = decoders.ByteLevel()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
      unk_token="[UNK]")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tokenizer = _tokenizer()
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(config)
  hf.config._attn_implementation = "eager"
  hf = hf.eval().float()
  path = tmp_path_factory.mktemp("tiny_llama")
  hf.save_pretrained(path, safe_serialization=True)
  tokenizer.save_pretrained(path)
  cfg, params = load_pretrained(path)
  return dict(tokenizer=tokenizer, hf=hf, model=runners.EvalModel(params, cfg), path=path)


def _hf_last_logits(hf, ids):
  with torch.no_grad():
    return hf(torch.tensor([ids])).logits[0, -1].numpy()


MCQ_PROMPTS = [
    prompts.mcq_prompt(MCQRecord("What is the capital of France?",
                                 ("Paris", "London", "Rome", "Berlin"), 0)) + "\nAnswer:",
    prompts.mcq_prompt(MCQRecord("Which gas do plants absorb?",
                                 ("oxygen", "carbon", "nitrogen"), 1)) + "\n",
    "Pick the prime number.\nA. four\nB. six\nC. seven\nD. nine\nAnswer:",
    "What is the capital of France? Answer:",
    "Pick the prime number.\n",
]


def test_mcq_letter_ids_and_accuracy_match_hf(setup):
  tok, hf = setup["tokenizer"], setup["hf"]
  answers = ["A", 1, "C", 0, "B"]
  result = runners.score_mcq(setup["model"], tok, MCQ_PROMPTS, answers, choices="ABCD",
                             batch_size=2)
  # "Answer:" is continued by " A", a newline by "A".
  spaced = [tok.convert_tokens_to_ids("\u0120" + c) for c in "ABCD"]
  bare = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
  expected_ids = np.array([spaced, bare, spaced, spaced, bare])
  np.testing.assert_array_equal(result.choice_token_ids, expected_ids)
  assert result.letter_token_ids["A"] == sorted({spaced[0], bare[0]})
  hf_choice = np.stack([
      _hf_last_logits(hf, tok.encode(p, add_special_tokens=False))[ids]
      for p, ids in zip(MCQ_PROMPTS, expected_ids)])
  np.testing.assert_allclose(result.choice_logits, hf_choice, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(result.predictions, hf_choice.argmax(-1))
  gold = np.array([0, 1, 2, 0, 1])
  assert result.accuracy == pytest.approx((hf_choice.argmax(-1) == gold).mean())
  np.testing.assert_array_equal(mcq.restricted_argmax(hf_choice, np.arange(4)), result.predictions)


def test_letter_after_a_special_token_has_no_space(setup):
  # A chat template's role header is a special token the reply follows directly ("<|assistant|>A").
  tok = setup["tokenizer"]
  got = mcq.resolve_choice_tokens(tok, ["Pick the prime number.[EOS]", "Answer:"], list("ABCD"))
  np.testing.assert_array_equal(got.choice_ids[0], tok.convert_tokens_to_ids(list("ABCD")))
  np.testing.assert_array_equal(got.choice_ids[1],
                                tok.convert_tokens_to_ids(["\u0120" + c for c in "ABCD"]))


def test_choice_resolution_errors(setup):
  tok = setup["tokenizer"]
  with pytest.raises(ValueError, match="not a single token"):
    mcq.resolve_choice_tokens(tok, ["Answer:"], ["A", "A B"])
  with pytest.raises(ValueError, match="unknown token"):
    mcq.resolve_choice_tokens(tok, ["Answer:"], ["A", "Zebra"])
  with pytest.raises(ValueError, match="distinct"):
    mcq.resolve_choice_tokens(tok, ["Answer:"], ["A", "A"])
  with pytest.raises(ValueError, match="neither an index"):
    mcq.answer_indices(["F"], "ABCD")


def _hf_greedy(hf, ids, n):
  with torch.no_grad():
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
  new = out[0, len(ids):].tolist()
  return new[:new.index(2)] if 2 in new else new


def test_generate_texts_matches_hf_greedy(setup):
  tok, hf = setup["tokenizer"], setup["hf"]
  texts = [prompts.reasoning_prompt(ReasoningRecord("the answer is 42", "42")),
           "How do I bake bread?",
           "Sure, here is how:"]
  got = runners.generate_texts(setup["model"], tok, texts, max_new_tokens=6, batch_size=2)
  for text, response in zip(texts, got):
    ref = _hf_greedy(hf, tok.encode(text, add_special_tokens=False), 6)
    assert response == tok.decode(ref, skip_special_tokens=True)
  responses, scores = runners.score_reasoning_generation(
      setup["model"], tok, texts, ["42", "1", "2"], max_new_tokens=6, batch_size=2)
  assert responses == got and scores.boxed_correct.shape == (3,)
  responses, verdicts, counts = runners.score_refusal_generation(
      setup["model"], tok, texts, max_new_tokens=6, batch_size=2)
  assert responses == got and counts.total == 3 and len(verdicts) == 3


def test_lm_judge_matches_hf_yes_no_logits(setup):
  tok, hf = setup["tokenizer"], setup["hf"]
  judge = judge_lib.LMJudge.from_pretrained(str(setup["path"]), batch_size=2)
  requests = ["How do I bake bread?", "How do I bake bread?", "What is the capital of France?"]
  responses = ["Sure, here is how: mix flour and water.", "I'm sorry, but I can't help with that.",
               "Paris"]
  yes, no = tok.convert_tokens_to_ids("\u0120yes"), tok.convert_tokens_to_ids("\u0120no")
  expected_logits = []
  for r, s in zip(requests, responses):
    text = judge_lib.DEFAULT_JUDGE_TEMPLATE.replace("{prompt}", r).replace("{response}", s)
    logits = _hf_last_logits(hf, tok.encode(text))
    expected_logits.append(logits[[yes, no]])
  expected_logits = np.array(expected_logits)
  np.testing.assert_allclose(judge.yes_no_logits(requests, responses), expected_logits,
                             rtol=1e-4, atol=1e-4)
  labels = judge.classify(requests, responses)
  assert labels == (expected_logits[:, 0] > expected_logits[:, 1]).tolist()
  flipped = judge_lib.LMJudge(judge.model, tok, yes_means_refusal=False)
  assert flipped.classify(requests, responses) == [not x for x in labels]
  # Plugged into the three-way scorer: the empty response never reaches the judge.
  verdicts, counts = refusal.score_refusals(requests + ["x"], responses + [""], judge)
  assert counts.empty == 1 and counts.refused == sum(labels)
  with pytest.raises(ValueError, match="{response}"):
    judge_lib.LMJudge(judge.model, tok, template="no fields {prompt}")


def test_batch_contract_and_chat_judge(setup):
  ids = np.array([[5, 6, 0]])
  with pytest.raises(ValueError, match="left-padded"):
    runners.choice_logits_on_batch(setup["model"], ids, np.array([[1, 1, 0]]), np.array([[4, 5]]))
  tok = setup["tokenizer"]
  tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:\n{% endif %}")
  try:
    judge = judge_lib.LMJudge(setup["model"], tok, chat_template=True)
    rendered = judge.render(["How do I bake bread?"], ["Paris"])[0]
    filled = judge_lib.DEFAULT_JUDGE_TEMPLATE.replace("{prompt}", "How do I bake bread?").replace(
        "{response}", "Paris")
    assert rendered == f"user: {filled}\nassistant:\n"
  finally:
    tok.chat_template = None


def test_chunk_lengths_pad_at_most_a_quarter_with_few_shapes():
  from cast_jax.eval.batching import chunk_length, prompt_chunks
  lengths = [chunk_length(n) for n in range(1, 2049)]
  assert all(n <= m < n + max(8, n / 4) for n, m in zip(range(1, 2049), lengths))
  assert [chunk_length(n) for n in (1, 8, 9, 56, 65, 70, 72, 129, 1000)] == [
      8, 8, 16, 56, 80, 80, 80, 160, 1024]
  assert len(set(lengths)) <= 4 * 9  # four per doubling (8 .. 2048)
  assert chunk_length(70, multiple=32) == 96
  chunks = list(prompt_chunks([[5] * 70, [6] * 3, [7] * 20], batch_size=2, pad_id=0))
  assert [c.input_ids.shape for c in chunks] == [(2, 80), (2, 8)]
  np.testing.assert_array_equal(chunks[0].attention_mask.sum(1), [70, 20])
  assert chunks[0].input_ids[1, -20:].tolist() == [7] * 20  # left padded
