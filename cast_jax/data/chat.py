"""Chat templating: prompt rendering and response-only loss masks for single-turn examples.

The token sequence of a training example is built from three separately tokenised pieces:

    prompt_ids  = tokens of the prompt rendered with the generation prompt (what inference sees)
    head_ids    = tokens from the end of the generation prompt up to the end of the response text
    eot_ids     = tokens after the response up to and including the first special token
                  (the template's end-of-turn marker, e.g. <|im_end|>, <|eot_id|>, </s>)

`prompt_ids` is tokenised on its own so that training sees exactly the prompt tokens that
`encode_prompt` feeds to generation. Template text after the end-of-turn token (Qwen's trailing
newline) is dropped: nothing is learned from it. If the template emits no special token after the
response (the plain fallback format), the tokenizer's EOS is appended so the model learns to stop.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

FALLBACK_USER_PREFIX = "User: "
FALLBACK_ASSISTANT_PREFIX = "\nAssistant:"


def has_chat_template(tokenizer: Any) -> bool:
  """True iff `tokenizer` carries a (non-empty) chat template."""
  return bool(getattr(tokenizer, "chat_template", None))


def _messages(user_text: str, system: str | None, response: str | None = None) -> list[dict]:
  msgs = [] if system is None else [{"role": "system", "content": system}]
  msgs.append({"role": "user", "content": user_text})
  if response is not None:
    msgs.append({"role": "assistant", "content": response})
  return msgs


def _fallback_prompt(user_text: str, system: str | None) -> str:
  sys_part = "" if system is None else system + "\n\n"
  return f"{sys_part}{FALLBACK_USER_PREFIX}{user_text}{FALLBACK_ASSISTANT_PREFIX}"


def _warn_fallback(tokenizer: Any) -> None:
  logging.log_first_n(
      logging.WARNING,
      "Tokenizer %s has no chat template; using the plain fallback format "
      "'User: ...\\nAssistant: ...' + EOS. Set tokenizer.chat_template to use the model's format.",
      1, type(tokenizer).__name__)


def render_prompt(tokenizer: Any, user_text: str, system: str | None = None, *,
                  template_kwargs: Mapping[str, Any] | None = None) -> str:
  """Renders a single user turn plus the assistant generation prompt as text.

  Args:
    tokenizer: a Hugging Face tokenizer. With no chat template the fallback
      `"{system}\\n\\nUser: {user_text}\\nAssistant:"` is used (logged once).
    user_text: the user message.
    system: optional system message.
    template_kwargs: extra variables for the template, e.g. `{"enable_thinking": False}` (Qwen3).
  Returns:
    str, the prompt text (may contain special-token text such as BOS).
  """
  if not has_chat_template(tokenizer):
    _warn_fallback(tokenizer)
    return _fallback_prompt(user_text, system)
  return tokenizer.apply_chat_template(
      _messages(user_text, system), tokenize=False, add_generation_prompt=True,
      **dict(template_kwargs or {}))


def render_conversation(tokenizer: Any, user_text: str, response: str, system: str | None = None,
                        *, template_kwargs: Mapping[str, Any] | None = None) -> str:
  """Renders user turn + assistant response as text (no generation prompt). Returns str."""
  if not has_chat_template(tokenizer):
    _warn_fallback(tokenizer)
    return _fallback_prompt(user_text, system) + " " + response
  return tokenizer.apply_chat_template(
      _messages(user_text, system, response), tokenize=False, add_generation_prompt=False,
      **dict(template_kwargs or {}))


def special_token_ids(tokenizer: Any) -> frozenset[int]:
  """Ids of all special tokens (declared specials and added tokens flagged special)."""
  ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
  for idx, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
    if getattr(tok, "special", False):
      ids.add(int(idx))
  return frozenset(ids)


def _encode_text(tokenizer: Any, text: str) -> list[int]:
  # Special-token text (BOS, <|im_start|>...) is already in `text`: the tokenizer must not add more.
  return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _bos_prefix(tokenizer: Any, prompt_text: str) -> list[int]:
  """[bos] iff the tokenizer prepends BOS by default and the rendered prompt lacks it."""
  bos_id, bos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
  if bos_id is None or not bos or prompt_text.startswith(bos):
    return []
  probe = tokenizer.encode("a", add_special_tokens=True)
  return [int(bos_id)] if probe and probe[0] == bos_id else []


def _check_single_bos(tokenizer: Any, ids: Sequence[int], what: str) -> None:
  bos_id = getattr(tokenizer, "bos_token_id", None)
  if bos_id is not None and len(ids) > 1 and ids[0] == bos_id and ids[1] == bos_id:
    raise ValueError(f"{what} starts with two BOS tokens ({bos_id}); the chat template and the "
                     "tokenizer both add BOS. Fix the template or the tokenizer's add_bos_token.")


def encode_prompt(tokenizer: Any, user_text: str, system: str | None = None, *,
                  template_kwargs: Mapping[str, Any] | None = None) -> np.ndarray:
  """Token ids of `render_prompt(...)`, with exactly one BOS where the model expects one.

  Returns:
    int32 array [P].
  """
  text = render_prompt(tokenizer, user_text, system, template_kwargs=template_kwargs)
  ids = _bos_prefix(tokenizer, text) + _encode_text(tokenizer, text)
  _check_single_bos(tokenizer, ids, "prompt")
  return np.asarray(ids, np.int32)


def split_rendered_turn(prompt_text: str, full_text: str, response: str) -> tuple[str, str]:
  """Splits the assistant part of a rendered conversation at the end of the response text.

  Args:
    prompt_text: the prompt rendered with the generation prompt.
    full_text: the conversation rendered with the assistant response.
    response: the raw response string.
  Returns:
    (head, tail): head = text after `prompt_text` up to the end of the response; tail = the rest.
  Raises:
    ValueError: the template breaks the prefix property or does not contain the response.
  """
  if not full_text.startswith(prompt_text):
    i = next((k for k, (a, b) in enumerate(zip(prompt_text, full_text)) if a != b),
             min(len(prompt_text), len(full_text)))
    raise ValueError(
        "Chat template breaks the prefix property: the prompt rendered with "
        "add_generation_prompt=True is not a prefix of the rendered conversation; they diverge at "
        f"char {i}: prompt ...{prompt_text[max(0, i - 40):i + 40]!r} vs conversation "
        f"...{full_text[max(0, i - 40):i + 40]!r}. The response-only loss mask cannot be computed; "
        "use a template whose generation prompt matches the assistant turn header (or pass "
        "template_kwargs, e.g. enable_thinking=False for Qwen3).")
  rest = full_text[len(prompt_text):]
  for cand in (response, response.strip()):
    pos = rest.find(cand) if cand else -1
    if pos >= 0:
      return rest[:pos + len(cand)], rest[pos + len(cand):]
  raise ValueError(f"Chat template output does not contain the response text {response[:80]!r} "
                   f"after the prompt; assistant part rendered as {rest[:200]!r}.")


def encode_example(tokenizer: Any, prompt: str, response: str, max_len: int | None = None, *,
                   system: str | None = None,
                   template_kwargs: Mapping[str, Any] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises one (prompt, response) pair with a response-only loss mask.

  Args:
    tokenizer: Hugging Face tokenizer (chat template or fallback format, see `render_prompt`).
    prompt: user message. response: assistant message (non-empty).
    max_len: if set and the example is longer, it is right-truncated to `max_len` tokens and a
      warning is logged (use `batching.encode_dataset` to count truncations over a dataset).
    system: optional system message. template_kwargs: extra template variables.
  Returns:
    (input_ids int32 [T], loss_mask int32 [T]); loss_mask is 1 on every token the model must
    generate after the generation prompt: the response and the end-of-turn token, plus any text
    the template puts between the generation prompt and the response (Qwen3 in thinking mode
    writes an empty "<think>\n\n</think>\n\n" there; pass enable_thinking=False to move it into
    the prompt).
  """
  if not response:
    raise ValueError(f"Empty response for prompt {prompt[:80]!r}: there is nothing to train on.")
  prompt_text = render_prompt(tokenizer, prompt, system, template_kwargs=template_kwargs)
  full_text = render_conversation(tokenizer, prompt, response, system,
                                  template_kwargs=template_kwargs)
  head, tail = split_rendered_turn(prompt_text, full_text, response)
  prompt_ids = _bos_prefix(tokenizer, prompt_text) + _encode_text(tokenizer, prompt_text)
  _check_single_bos(tokenizer, prompt_ids, "example")
  head_ids, tail_ids = _encode_text(tokenizer, head), _encode_text(tokenizer, tail)
  specials = special_token_ids(tokenizer)
  end = next((k for k, t in enumerate(tail_ids) if t in specials), None)
  if end is not None:
    target = head_ids + tail_ids[:end + 1]
  else:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
      raise ValueError("The chat format emits no end-of-turn special token and the tokenizer has "
                       "no eos_token: set tokenizer.eos_token so the model can learn to stop.")
    target = head_ids + tail_ids + [int(eos_id)]
  ids = np.asarray(prompt_ids + target, np.int32)
  mask = np.concatenate([np.zeros(len(prompt_ids), np.int32), np.ones(len(target), np.int32)])
  if max_len is not None and len(ids) > max_len:
    logging.warning("Example truncated from %d to max_len=%d tokens.", len(ids), max_len)
    ids, mask = ids[:max_len], mask[:max_len]
  return ids, mask
