"""Fault table (issue 13), inputs: token ids, shapes, config.json, safetensors, CSV / JSONL fields
and MCQ answers are checked where they enter, with the offending thing and the fix named."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cast_jax.data import adapters
from cast_jax.data.readers import DataError
from cast_jax.eval import EvalModel, mcq, runners
from cast_jax.generate import generate
from cast_jax.models import (CheckpointError, ConfigError, ModelConfig, forward, init_params,
                             load_pretrained, save_pretrained)
from cast_jax.models.inputs import InputError
from cast_jax.train import OptimizerConfig, NonFiniteLossError
from cast_jax.train.sft import run_sft

CONFIG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, eos_token_ids=(2,),
                     pad_token_id=0)


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)


# --- token ids -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [(32, r"input_ids\[0, 2\] = 32 .*\[0, 32\).*tokenizer"),
                                        (-1, r"input_ids\[0, 2\] = -1 .*Negative ids")])
def test_forward_refuses_ids_outside_the_vocabulary(params, bad, match):
  with pytest.raises(InputError, match=match):
    forward(params, CONFIG, np.array([[1, 5, bad, 7]]))
  with pytest.raises(InputError, match=match):
    forward(params, CONFIG, jnp.array([[1, 5, bad, 7]]))  # concrete jax arrays too


def test_generate_refuses_bad_ids_instead_of_returning_zeros(params):
  with pytest.raises(InputError, match=r"generate: input_ids\[0, 1\] = 40 .*vocab"):
    generate(params, CONFIG, np.array([[3, 40, 5]]), max_new_tokens=4)
  with pytest.raises(InputError, match="pad_token_id = 99"):
    generate(params, CONFIG, np.array([[3, 4, 5]]), max_new_tokens=4, pad_token_id=99)


def test_generate_max_new_tokens_zero_and_negative(params):
  out = generate(params, CONFIG, np.array([[3, 4, 5], [6, 7, 8]]), max_new_tokens=0)
  assert out.tokens.shape == (2, 0) and out.tokens.dtype == np.int32
  assert out.lengths.tolist() == [0, 0] and out.trimmed() == [[], []]
  for bad in (-1, 2.5, True):
    with pytest.raises(InputError, match=f"max_new_tokens={bad!r}.*integer >= 0"):
      generate(params, CONFIG, np.array([[3, 4, 5]]), max_new_tokens=bad)


def test_run_sft_names_the_bad_example_not_the_learning_rate(params, tmp_path):
  examples = [(np.array([3, 4, 5, 6]), np.array([0, 0, 1, 1]))] * 3
  examples.append((np.array([3, 4, 50, 6]), np.array([0, 0, 1, 1])))
  opt = OptimizerConfig(learning_rate=1e-2, schedule="constant")
  with pytest.raises(InputError, match=r"examples\[3\] input_ids\[2\] = 50") as err:
    run_sft(params, CONFIG, examples, pad_id=0, num_steps=2, batch_size=2, seed=0,
            optimizer=opt, workdir=tmp_path / "w", progress=False)
  assert not isinstance(err.value, NonFiniteLossError)
  assert not (tmp_path / "w").exists()  # checked before anything is written
  with pytest.raises(InputError, match="pad_id = -1"):
    run_sft(params, CONFIG, examples[:3], pad_id=-1, num_steps=2, batch_size=2, seed=0,
            optimizer=opt, progress=False)


class _CharTokenizer:
  """Byte ids (up to 127): a tokenizer larger than the 32-token model."""

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    return [ord(c) for c in text]


def test_scorers_check_ids_at_entry(params):
  model = EvalModel(params, CONFIG)
  with pytest.raises(InputError, match=r"prompt_ids\[0\]\[0\] = 81 .*outside the vocabulary"):
    runners.score_mcq(model, _CharTokenizer(), ["Q: 1+1?\n"], [0], choices=("A", "B"))
  with pytest.raises(InputError, match=r"prompt_ids\[1\]\[2\] = 40"):
    runners.next_token_choice_logits(model, [[3, 4], [5, 6, 40]], np.array([[5, 6], [5, 6]]),
                                     pad_id=0)
  with pytest.raises(InputError, match=r"choice_ids\[1, 0\] = 32"):
    runners.next_token_choice_logits(model, [[3, 4], [5, 6]], np.array([[5, 6], [32, 6]]),
                                     pad_id=0)


# --- shapes ----------------------------------------------------------------------------------

def test_shapes_are_named_with_what_was_expected(params):
  ids = np.array([[3, 4, 5]])
  with pytest.raises(InputError, match=r"head_mask has shape \(4, 2\), expected \(2, 4\)"):
    forward(params, CONFIG, ids, head_mask=jnp.ones((4, 2)))
  with pytest.raises(InputError, match=r"attention_mask has shape \(1, 4\), expected \(1, 3\)"):
    forward(params, CONFIG, ids, attention_mask=np.ones((1, 4)))
  with pytest.raises(InputError, match=r"input_ids has shape \(3,\).*ids\[None\]"):
    forward(params, CONFIG, np.array([3, 4, 5]))
  with pytest.raises(InputError, match="dtype float32.*integers"):
    forward(params, CONFIG, ids.astype(np.float32))
  with pytest.raises(InputError, match=r"generate: head_mask has shape \(2,\)"):
    generate(params, CONFIG, ids, max_new_tokens=2, head_mask=jnp.ones((2,)))
  # Under jit the shapes are still checked (they are static); values are checked at the entry.
  with pytest.raises(InputError, match="head_mask"):
    jax.jit(lambda hm: forward(params, CONFIG, ids, head_mask=hm))(jnp.ones((3, 4)))


# --- config.json and safetensors -------------------------------------------------------------

@pytest.fixture
def ckpt(params, tmp_path):
  return save_pretrained(params, CONFIG, tmp_path / "ckpt")


@pytest.mark.parametrize("text, match", [
    ('{"model_type": "llama", "vocab_size": 32,', r"config\.json is not valid JSON"),
    ("[1, 2]", r"config\.json holds a JSON list, expected an object"),
    (None, r"config\.json lacks required key\(s\) \['num_hidden_layers'\]"),
    ("four", r"config\.json: num_hidden_layers='four' is not a positive integer"),
])
def test_bad_config_json_names_the_file_and_the_key(ckpt, text, match):
  file = f"{ckpt}/config.json"
  if text is None or text == "four":
    hf = json.load(open(file))
    if text is None:
      del hf["num_hidden_layers"]
    else:
      hf["num_hidden_layers"] = "four"
    text = json.dumps(hf)
  open(file, "w").write(text)
  with pytest.raises(ConfigError, match=match) as err:
    load_pretrained(ckpt)
  assert "re-download" in str(err.value)


def test_truncated_safetensors_names_the_file(ckpt, tmp_path):
  weights = f"{ckpt}/model.safetensors"
  data = open(weights, "rb").read()
  open(weights, "wb").write(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors "
                     r"file .*truncated or corrupt\. Re-download"):
    load_pretrained(ckpt)
  sharded = tmp_path / "sharded"
  save_pretrained(init_params(CONFIG, jax.random.PRNGKey(1)), CONFIG, sharded,
                  max_shard_bytes=4000)
  (sharded / "model.safetensors.index.json").write_text("{not json")
  with pytest.raises(CheckpointError, match=r"index\.json is not a valid shard index.*Re-download"):
    load_pretrained(sharded)


def test_pickle_is_refused_without_the_flag(ckpt, tmp_path):
  """A good case of the trial, kept: pickle weights need allow_pickle=True."""
  bad = tmp_path / "pickle"
  bad.mkdir()
  shutil.copy(f"{ckpt}/config.json", bad / "config.json")
  (bad / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(CheckpointError, match="allow_pickle=True"):
    load_pretrained(bad)


# --- CSV / JSONL fields and MCQ answers ------------------------------------------------------

def test_csv_list_field_that_is_not_a_list_names_file_row_field_and_text(tmp_path):
  path = tmp_path / "mmlu.csv"
  path.write_text('question,choices,answer\nQ1,"[""a"", ""b""]",0\nQ2,red green blue,1\n')
  with pytest.raises(DataError, match=r"mmlu\.csv: row 1: field 'choices': cannot read 'red "
                     r"green blue' as a list; write it as a JSON list") as err:
    adapters.load_mmlu(str(path))
  assert not isinstance(err.value.__cause__, SyntaxError)


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_utf8_byte_order_mark_is_tolerated(tmp_path, suffix):
  path = tmp_path / f"mmlu.{suffix}"
  if suffix == "csv":
    text = 'question,choices,answer\nWhat is 2+2?,"[""3"", ""4""]",B\n'
  else:
    text = json.dumps({"question": "What is 2+2?", "choices": ["3", "4"], "answer": 1}) + "\n"
  path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Excel / Notepad export
  [rec] = adapters.load_mmlu(str(path))
  assert rec.question == "What is 2+2?" and rec.answer_index == 1


@pytest.mark.parametrize("answer, match", [(2.7, "cannot read answer 2.7"),
                                           (True, "cannot read answer True"),
                                           (-1, "answer -1 is outside the 4 options"),
                                           ("7", "answer '7' is outside the 4 options")])
def test_mcq_answer_that_is_not_an_index_or_letter_is_refused(tmp_path, answer, match):
  path = tmp_path / "mmlu.jsonl"
  row = {"question": "Q", "choices": ["a", "b", "c", "d"], "answer": answer}
  path.write_text(json.dumps(row) + "\n")
  with pytest.raises(DataError, match=r"mmlu\.jsonl: row 0: field 'answer'.*" + match):
    adapters.load_mmlu(str(path))


def test_mcq_answer_indices_refuse_bool_and_fractions():
  assert mcq.answer_indices([2, 2.0, np.int64(1), "D"], "ABCD").tolist() == [2, 2, 1, 3]
  for bad in (True, np.bool_(False), 2.7):
    with pytest.raises(ValueError, match=f"answer 0 = {bad!r} is not an option index"):
      mcq.answer_indices([bad], "ABCD")
