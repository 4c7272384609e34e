"""Word-level tokenizer for the testbed world, wrapped as a `transformers` fast tokenizer.

Pieces: a word with its leading space ("▁capital"), a word at the start of a line ("The"), one
digit ("63" is "▁6" "3": the first digit carries the space, as a word does, to keep arithmetic
sequences short), or one other character ("." / "▁(" / "\\n"). Spaces are rewritten to "▁"
by the normalizer and back by the decoder, so decode(encode(text)) == text for every ASCII text
whose words are in the vocabulary; anything else maps to <unk>. The vocabulary is every piece of the world's text plus
both spacing forms of each word, every printable ASCII character and the special tokens, sorted,
so it depends only on the world's text.

Encoding plain text prepends <bos> (as Llama tokenizers do; pass add_special_tokens=False to
avoid it). The chat template writes <bos> itself and `apply_chat_template` does not add another:

  <bos><|system|>S<|end|><|user|>U<|end|><|assistant|>A<eos>

With add_generation_prompt=True a conversation ending in a user turn ends in "<|assistant|>",
a strict prefix of the same conversation with the assistant reply appended.
"""

from __future__ import annotations

import string
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
import transformers

from cast_jax.testbed import world as world_lib

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS) + ROLE_TOKENS
SPACE = "\u2581"
# A word may carry a leading apostrophe ('Tis) and inner ones (can't, neighbour's).
_PIECE_PATTERN = (f"{SPACE}?'?[A-Za-z]+(?:'[A-Za-z]+)*|{SPACE}?[0-9]|{SPACE}?[^{SPACE}A-Za-z0-9\\n]"
                  f"|{SPACE}|\\n")

CHAT_TEMPLATE = ("{{- bos_token -}}"
                 "{%- for message in messages -%}"
                 "{%- if message['role'] == 'assistant' -%}"
                 "{{- '<|assistant|>' + message['content'] + eos_token -}}"
                 "{%- elif message['role'] in ['system', 'user'] -%}"
                 "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
                 "{%- else -%}"
                 "{{- raise_exception('unknown role: ' + message['role']) -}}"
                 "{%- endif -%}"
                 "{%- endfor -%}"
                 "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")


def _pipeline() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
  norm = normalizers.Replace(" ", SPACE)
  pre = pre_tokenizers.Split(tokenizers.Regex(_PIECE_PATTERN), behavior="isolated")
  return norm, pre


def pieces(text: str) -> list[str]:
  """The pre-tokenized pieces of `text` (what becomes one token each when in the vocabulary)."""
  norm, pre = _pipeline()
  return [p for p, _ in pre.pre_tokenize_str(norm.normalize_str(text))]


def _vocab(texts: Iterable[str]) -> dict[str, int]:
  norm, pre = _pipeline()
  found: set[str] = set()
  for t in set(texts):
    found.update(p for p, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
  base = set()
  for c in string.printable:
    if c in " \t\r\x0b\x0c":
      continue
    base.add(c)
    if c != "\n":
      base.add(SPACE + c)
  # Both spacing forms of every word, so a word never hits <unk> just for opening a line.
  for p in found:
    core = p.lstrip(SPACE)
    if core.lstrip("'")[:1].isalpha():
      base.update((core, SPACE + core))
  regular = sorted((found | base | {SPACE}) - set(SPECIAL_TOKENS))
  return {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + regular)}


def build_tokenizer(source: "world_lib.World | Iterable[str]",
                    model_max_length: int = 256) -> transformers.PreTrainedTokenizerFast:
  """Build the word-level tokenizer for a world (or any corpus of texts).

    Args:
      source: a `World` (all its texts are used) or an iterable of strings.
      model_max_length: recorded in the tokenizer config.
    Returns:
      A fast tokenizer with bos/eos/pad/unk set, the role tokens as additional special tokens and
      `CHAT_TEMPLATE`; ids 0..7 are SPECIAL_TOKENS in order (<pad>=0, <unk>=1, <bos>=2, <eos>=3).
    """
  texts = world_lib.iter_texts(source) if isinstance(source, world_lib.World) else source
  vocab = _vocab(texts)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer, tok.pre_tokenizer = _pipeline()
  tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                     pair=f"{BOS} $A {BOS} $B",
                                                     special_tokens=[(BOS, vocab[BOS])])
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
                                              bos_token=BOS,
                                              eos_token=EOS,
                                              pad_token=PAD,
                                              unk_token=UNK,
                                              additional_special_tokens=list(ROLE_TOKENS),
                                              model_max_length=model_max_length,
                                              clean_up_tokenization_spaces=False)
  fast.chat_template = CHAT_TEMPLATE
  return fast


def chat_ids(tokenizer: transformers.PreTrainedTokenizerFast,
             prompt: str,
             response: str | None = None) -> list[int]:
  """Token ids of a one-turn chat; with response=None, the prompt plus generation prompt."""
  messages = [{"role": "user", "content": prompt}]
  if response is not None:
    messages.append({"role": "assistant", "content": response})
  out = tokenizer.apply_chat_template(messages,
                                      tokenize=True,
                                      add_generation_prompt=response is None)
  return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
