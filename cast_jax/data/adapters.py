"""Dataset adapters: public benchmark schemas -> lists of records.

Every loader takes a local file (JSONL / JSON / CSV / TSV / parquet) or a hub id
(`datasets.load_dataset`), plus `fields=` to remap canonical fields to other column names (a list
of columns forms a list, e.g. MMLU's CSV `fields={"choices": ["A", "B", "C", "D"]}`), `limit=` to
keep the first N rows (before filtering), and `subset=` / `split=` for hub ids. One generic loop
(`_load`) does the work; each schema is a field table plus a row -> record function.
"""

from __future__ import annotations

import ast
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

# One box rule for MATH references and scored responses (eval re-exports it as extract_boxed).
from cast_jax.data.boxed import last_boxed
from cast_jax.data.readers import DataError, FieldOverrides, get_value, read_rows, resolve_fields
from cast_jax.data.records import ChatRecord, MCQRecord, ReasoningRecord, SafetyRecord, StylePair

Source = Union[str, os.PathLike, Sequence[Mapping[str, Any]]]
WILDJAILBREAK_TYPES = ("vanilla_harmful", "vanilla_benign", "adversarial_harmful",
                       "adversarial_benign")


def _load(source, spec: Mapping[str, Sequence[str]], required: Sequence[str],
          build: Callable[[Callable[..., Any]], Any], *, fields: FieldOverrides | None,
          subset: str | None, split: str | None, file_format: str | None, limit: int | None,
          what: str, hub_kwargs: Mapping[str, Any] | None = None) -> list:
  rows, desc = read_rows(source, subset=subset, split=split, file_format=file_format,
                         hub_kwargs=hub_kwargs)
  rows = rows if limit is None else rows[:limit]
  cols = resolve_fields(rows, spec, required=required, overrides=fields, desc=desc)
  out = []
  for i, row in enumerate(rows):
    def get(field: str, default: Any = None, _row=row) -> Any:
      value = get_value(_row, cols.get(field), default)
      if field in required and (value is None or value == ""):
        raise ValueError(f"field {field!r} (column {cols[field]!r}) is empty")
      return value
    try:
      record = build(get)
    except (ValueError, TypeError, KeyError, IndexError, SyntaxError, AttributeError) as e:
      raise DataError(f"{desc}: row {i}: {e}") from e
    if record is not None:  # None: filtered out
      out.append(record)
  if not out:
    raise DataError(f"{desc}: no {what} records left after filtering {len(rows)} rows.")
  return out


def _str_list(value: Any, field: str) -> list[str]:
  if isinstance(value, str):  # lists stored as text, e.g. in CSV
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(
            f"field {field!r}: cannot read {value!r:.80} as a list; write it as a JSON list, "
            f"e.g. [\"red\", \"green\", \"blue\"], or map one column per option with "
            f"fields={{{field!r}: ['A', 'B', 'C', 'D']}}") from None
  if hasattr(value, "tolist"):
    value = value.tolist()
  if not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f"field {field!r} must be a non-empty list, got {value!r:.80}")
  return [str(v) for v in value]


def _index(value: Any, labels: Sequence[str], field: str, n: int | None = None) -> int:
  """Answer index in [0, n) from an int, an integral float (2.0), a digit string or a label
  such as 'B'. Booleans, fractional numbers and negative indices are errors, not truncated or
  wrapped (`True` is not index 1, 2.7 is not 2, -1 is not the last option)."""
  n = len(labels) if n is None else n
  if isinstance(value, str) and value.strip() in labels:
    return list(labels).index(value.strip())
  index = None
  if isinstance(value, str) and value.strip().isdigit():
    index = int(value.strip())
  elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
    index = int(value)
  elif isinstance(value, (float, np.floating)) and float(value).is_integer():
    index = int(value)
  if index is None:
    raise ValueError(f"field {field!r}: cannot read answer {value!r} as an option index or one "
                     f"of {list(labels)} (an unlabelled test split? use the validation split)")
  if n and not 0 <= index < n:
    raise ValueError(f"field {field!r}: answer {value!r} is outside the {n} options (index "
                     f"0..{n - 1}{' or ' + '/'.join(labels) if labels else ''})")
  return index


def _letters(n: int) -> list[str]:
  return [chr(ord("A") + i) for i in range(n)]


def load_mmlu(source: Source = "cais/mmlu", *, subset: str | None = "all", split: str = "test",
              fields: FieldOverrides | None = None, file_format: str | None = None,
              limit: int | None = None) -> list[MCQRecord]:
  """MMLU (`cais/mmlu`: question, subject, choices [4], answer int 0-3) -> list[MCQRecord]."""
  def build(get):
    choices = _str_list(get("choices"), "choices")
    return MCQRecord(str(get("question")), tuple(choices),
                     _index(get("answer"), _letters(len(choices)), "answer"),
                     str(get("subject", "")))
  return _load(source, {"question": ("question",), "choices": ("choices",), "answer": ("answer",),
                        "subject": ("subject",)}, ("question", "choices", "answer"), build,
               fields=fields, subset=subset, split=split, file_format=file_format, limit=limit,
               what="MMLU")


def load_commonsense_qa(source: Source = "tau/commonsense_qa", *, subset: str | None = None,
                        split: str = "validation", fields: FieldOverrides | None = None,
                        file_format: str | None = None,
                        limit: int | None = None) -> list[MCQRecord]:
  """CommonsenseQA (`tau/commonsense_qa`: question, choices {label, text}, answerKey 'A'-'E')."""
  def build(get):
    choices = get("choices")
    if isinstance(choices, str):
      choices = json.loads(choices)
    if not isinstance(choices, Mapping) or "label" not in choices or "text" not in choices:
      raise ValueError(f"field 'choices' must be {{'label': [...], 'text': [...]}}, got "
                       f"{choices!r:.80}")
    labels, texts = _str_list(choices["label"], "label"), _str_list(choices["text"], "text")
    return MCQRecord(str(get("question")), tuple(texts), _index(get("answer"), labels, "answerKey"),
                     str(get("subject", "")))
  return _load(source, {"question": ("question",), "choices": ("choices",),
                        "answer": ("answerKey",), "subject": ("question_concept",)},
               ("question", "choices", "answer"), build, fields=fields, subset=subset,
               split=split, file_format=file_format, limit=limit, what="CommonsenseQA")


def load_hellaswag(source: Source = "Rowan/hellaswag", *, subset: str | None = None,
                   split: str = "validation", fields: FieldOverrides | None = None,
                   file_format: str | None = None, limit: int | None = None) -> list[MCQRecord]:
  """HellaSwag (`Rowan/hellaswag`: ctx, endings [4], label as a string '0'-'3', activity_label)."""
  def build(get):
    endings = _str_list(get("choices"), "endings")
    return MCQRecord(str(get("question")).strip(), tuple(endings),
                     _index(get("answer"), (), "label", len(endings)), str(get("subject", "")))
  return _load(source, {"question": ("ctx",), "choices": ("endings",), "answer": ("label",),
                        "subject": ("activity_label",)}, ("question", "choices", "answer"),
               build, fields=fields, subset=subset, split=split, file_format=file_format,
               limit=limit, what="HellaSwag")


def gsm8k_final_answer(answer: str) -> str:
  """The number after GSM8K's '#### ' marker, commas removed; raises ValueError if absent."""
  if "####" not in answer:
    raise ValueError(f"GSM8K answer has no '#### N' final answer: {answer[-80:]!r}")
  return answer.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(source: Source = "openai/gsm8k", *, subset: str | None = "main",
               split: str = "test", fields: FieldOverrides | None = None,
               file_format: str | None = None, limit: int | None = None) -> list[ReasoningRecord]:
  """GSM8K (`openai/gsm8k`: question, answer = rationale + '#### N') -> ReasoningRecord."""
  def build(get):
    full = str(get("answer"))
    return ReasoningRecord(str(get("question")), gsm8k_final_answer(full),
                           full.rsplit("####", 1)[0].strip())
  return _load(source, {"question": ("question",), "answer": ("answer",)},
               ("question", "answer"), build, fields=fields, subset=subset, split=split,
               file_format=file_format, limit=limit, what="GSM8K")


def load_math(source: Source = "hendrycks/competition_math", *, subset: str | None = None,
              split: str = "test", fields: FieldOverrides | None = None,
              file_format: str | None = None, limit: int | None = None) -> list[ReasoningRecord]:
  """MATH (problem, solution with \\boxed{}, level, type; an 'answer' column is used if present)."""
  def build(get):
    solution = str(get("solution"))
    answer = get("answer") or last_boxed(solution)
    if answer is None:
      raise ValueError("field 'solution' has no \\boxed{...} answer and there is no 'answer'")
    return ReasoningRecord(str(get("question")), str(answer), solution, str(get("subject", "")),
                           str(get("level", "")))
  return _load(source, {"question": ("problem",), "solution": ("solution",), "answer": ("answer",),
                        "level": ("level",), "subject": ("type", "subject")},
               ("question", "solution"), build, fields=fields, subset=subset, split=split,
               file_format=file_format, limit=limit, what="MATH")


def load_wildjailbreak(source: Source = "allenai/wildjailbreak", *, subset: str | None = "train",
                       split: str = "train", data_types: Iterable[str] | None = None,
                       fields: FieldOverrides | None = None, file_format: str | None = None,
                       limit: int | None = None) -> list[SafetyRecord]:
  """WildJailbreak (vanilla, adversarial, completion, data_type) -> SafetyRecord.

  The prompt is `adversarial` for adversarial_* rows and `vanilla` otherwise. `data_types` keeps
  only those of WILDJAILBREAK_TYPES (None: all). The eval split has no vanilla / completion.
  """
  keep = None if data_types is None else frozenset(data_types)
  if keep is not None and not keep <= set(WILDJAILBREAK_TYPES):
    raise ValueError(f"data_types {sorted(keep - set(WILDJAILBREAK_TYPES))} unknown; use "
                     f"{WILDJAILBREAK_TYPES}")

  def build(get):
    kind = str(get("data_type"))
    if kind not in WILDJAILBREAK_TYPES:
      raise ValueError(f"data_type {kind!r} not one of {WILDJAILBREAK_TYPES}")
    if keep is not None and kind not in keep:
      return None
    adversarial = kind.startswith("adversarial")
    prompt = get("adversarial" if adversarial else "vanilla")
    if not prompt:
      raise ValueError(f"{kind} row has an empty {'adversarial' if adversarial else 'vanilla'} "
                       "field")
    return SafetyRecord(str(prompt), kind.endswith("_harmful"), adversarial,
                        str(get("completion", "")))
  return _load(source, {"vanilla": ("vanilla",), "adversarial": ("adversarial",),
                        "completion": ("completion",), "data_type": ("data_type",)},
               ("data_type",), build, fields=fields, subset=subset, split=split,
               file_format=file_format, limit=limit, what="WildJailbreak",
               # The hub files are TSV with empty cells that pandas would turn into NaN.
               hub_kwargs={"delimiter": "\t", "keep_default_na": False})


def load_advbench(source: Source = "walledai/AdvBench", *, subset: str | None = None,
                  split: str = "train", fields: FieldOverrides | None = None,
                  file_format: str | None = None, limit: int | None = None) -> list[SafetyRecord]:
  """AdvBench harmful behaviours (goal, target) -> SafetyRecord(harmful=True).

  The affirmative attack `target` ("Sure, here is ...") is not a safe completion and is dropped.
  """
  return _load(source, {"prompt": ("goal", "prompt")}, ("prompt",),
               lambda get: SafetyRecord(str(get("prompt")), True, False), fields=fields,
               subset=subset, split=split, file_format=file_format, limit=limit, what="AdvBench")


def load_harmbench(source: Source, *, functional_categories: Iterable[str] | None = ("standard",),
                   subset: str | None = None, split: str = "train",
                   fields: FieldOverrides | None = None, file_format: str | None = None,
                   limit: int | None = None) -> list[SafetyRecord]:
  """HarmBench behaviours (Behavior, FunctionalCategory, ContextString, ...) -> SafetyRecord.

  Keeps rows whose FunctionalCategory is in `functional_categories` (default: "standard", as the
  LCDD paper evaluates; None keeps all). Contextual rows put the context before the behaviour.
  """
  keep = None if functional_categories is None else frozenset(functional_categories)

  def build(get):
    if keep is not None and str(get("category")) not in keep:
      return None
    context = str(get("context", "") or "").strip()
    behavior = str(get("prompt"))
    return SafetyRecord(f"{context}\n\n---\n\n{behavior}" if context else behavior, True, False)
  required = ("prompt",) if keep is None else ("prompt", "category")
  return _load(source, {"prompt": ("Behavior", "behavior", "prompt"),
                        "category": ("FunctionalCategory", "Category"),
                        "context": ("ContextString",)}, required, build, fields=fields,
               subset=subset, split=split, file_format=file_format, limit=limit, what="HarmBench")


def load_alpaca(source: Source = "tatsu-lab/alpaca", *, subset: str | None = None,
                split: str = "train", input_separator: str = "\n\n",
                fixed_response: str | None = None, fields: FieldOverrides | None = None,
                file_format: str | None = None, limit: int | None = None) -> list[ChatRecord]:
  """Alpaca (instruction, input, output) -> ChatRecord.

  A non-empty `input` is appended to the instruction after `input_separator` (LCDD App. F.1).
  `fixed_response` (e.g. "I don't know.") replaces every output (the Fixed Response task).
  """
  def build(get):
    extra = str(get("input", "") or "").strip()
    prompt = str(get("prompt")) + (input_separator + extra if extra else "")
    response = fixed_response if fixed_response is not None else str(get("response", "") or "")
    if not response:
      raise ValueError("field 'response' (column 'output') is empty; pass fixed_response=")
    return ChatRecord(prompt, response)
  required = ("prompt",) if fixed_response is not None else ("prompt", "response")
  return _load(source, {"prompt": ("instruction",), "input": ("input",),
                        "response": ("output",)}, required, build, fields=fields, subset=subset,
               split=split, file_format=file_format, limit=limit, what="Alpaca")


def load_style_pairs(source: Source, *, subset: str | None = None, split: str = "train",
                     fields: FieldOverrides | None = None, file_format: str | None = None,
                     limit: int | None = None) -> list[StylePair]:
  """Modern / Shakespearean pairs (columns modern, original by default) -> StylePair."""
  return _load(source, {"modern": ("modern",), "archaic": ("original",)}, ("modern", "archaic"),
               lambda get: StylePair(str(get("modern")), str(get("archaic"))), fields=fields,
               subset=subset, split=split, file_format=file_format, limit=limit,
               what="style pair")
