"""A tiny Alpaca-schema dataset and a random Llama base checkpoint with a tokenizer for it: the
setup the SFT / LCDD launch tests share."""

import json
import os

import jax

from cast_jax.models import ModelConfig, init_params, save_pretrained
from cast_jax.testbed.tokenizer import build_tokenizer

ROWS = [{"instruction": f"name a colour number {i}", "input": "quickly" if i % 2 else "",
         "output": f"the colour {i} is red"} for i in range(8)]


def write_base_and_data(root: str):
  """Writes `<root>/base` (HF checkpoint + tokenizer) and `<root>/data.jsonl` (ROWS).

  Returns (tokenizer, config, base params).
  """
  texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in ROWS]
  tok = build_tokenizer(texts + ["I don't know."])
  config = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=16,
                       intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=4)
  base = init_params(config, jax.random.PRNGKey(0), std=0.2)
  save_pretrained(base, config, os.path.join(root, "base"), tokenizer=tok)
  with open(os.path.join(root, "data.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in ROWS)
  return tok, config, base
