"""User-turn prompt builders of CAST Table 4 (the chat template is applied later, in `chat`).

The dataset input follows the instruction after a blank line; MCQ options are listed one per line
as "A. ...". Training data and the eval runners both build prompts here, so they always agree.
"""

from __future__ import annotations

from cast_jax.data.records import ChatRecord, MCQRecord, ReasoningRecord, SafetyRecord

# Verbatim from CAST Table 4.
MCQ_INSTRUCTION = ("Read the multiple-choice question carefully and output only the capital letter "
                   "(A, B, C, D, or E) that corresponds to the correct choice. Do not include any "
                   "explanation or extra text.")
REASONING_INSTRUCTION = ("Solve the math problem step by step. Write the final answer inside a "
                         "LaTeX \\boxed{} expression.")
LETTERS = "ABCDE"


def answer_letter(index: int) -> str:
  """Option letter of choice `index` (0 -> "A"); the Table 4 instruction allows A-E."""
  if not 0 <= index < len(LETTERS):
    raise ValueError(f"choice index {index} has no letter in {LETTERS!r}")
  return LETTERS[index]


def mcq_prompt(record: MCQRecord) -> str:
  """Table 4 knowledge prompt: instruction, blank line, question, then "A. choice" lines."""
  if not 2 <= len(record.choices) <= len(LETTERS):
    raise ValueError(f"an MCQ needs 2..{len(LETTERS)} choices, got {len(record.choices)} for "
                     f"{record.question[:60]!r}")
  lines = [record.question.strip()]
  lines += [f"{answer_letter(i)}. {c.strip()}" for i, c in enumerate(record.choices)]
  return MCQ_INSTRUCTION + "\n\n" + "\n".join(lines)


def reasoning_prompt(record: ReasoningRecord) -> str:
  """Table 4 math prompt: step-by-step + \\boxed{} instruction, blank line, the problem."""
  return f"{REASONING_INSTRUCTION}\n\n{record.question.strip()}"


def safety_prompt(record: SafetyRecord) -> str:
  """Table 4 safety prompt: the raw instruction, no system prompt or wrapper."""
  return record.prompt


def safety_chat_record(record: SafetyRecord) -> ChatRecord:
  """(prompt, reference completion) for alignment SFT; raises if the record has no completion."""
  if not record.completion:
    raise ValueError(f"SafetyRecord {record.prompt[:60]!r} has no completion to train on.")
  return ChatRecord(record.prompt, record.completion)
