"""Small frozen records that dataset adapters return, one per task family."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MCQRecord:
  """Multiple-choice question: `choices[answer_index]` is correct."""
  question: str
  choices: tuple[str, ...]
  answer_index: int
  subject: str = ""

  def __post_init__(self):
    if not 0 <= self.answer_index < len(self.choices):
      raise ValueError(f"MCQRecord: answer_index {self.answer_index} outside the "
                       f"{len(self.choices)} choices of question {self.question[:60]!r}")


@dataclasses.dataclass(frozen=True)
class ReasoningRecord:
  """Open-ended problem with a short final `answer` and the worked `solution`."""
  question: str
  answer: str
  solution: str = ""
  subject: str = ""
  level: str = ""


@dataclasses.dataclass(frozen=True)
class SafetyRecord:
  """A request; `completion` is the dataset's reference (safe) response, "" when it has none."""
  prompt: str
  harmful: bool
  adversarial: bool
  completion: str = ""


@dataclasses.dataclass(frozen=True)
class ChatRecord:
  """One user turn and the assistant response to train on."""
  prompt: str
  response: str


@dataclasses.dataclass(frozen=True)
class StylePair:
  """The same utterance in modern English and in the archaic (Shakespearean) target style."""
  modern: str
  archaic: str
