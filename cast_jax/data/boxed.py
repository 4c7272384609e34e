"""The one ``\\boxed{...}`` rule, shared by the MATH adapter (reference answers) and the reasoning
scorer (model responses), so a reference and a response are read the same way.

It lives in `data` because `eval` may import `data` but not the reverse.
"""

from __future__ import annotations

import re
from typing import Optional

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def match_braces(text: str, open_index: int) -> Optional[int]:
  """Index of the ``}`` closing the ``{`` at ``open_index``; None when unbalanced (truncated)."""
  depth = 0
  i = open_index
  while i < len(text):
    ch = text[i]
    if ch == "\\":
      # \{ and \} are literal braces in LaTeX, not grouping.
      i += 2
      continue
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def last_boxed(text: str) -> Optional[str]:
  """Argument of the last ``\\boxed`` / ``\\fbox`` in ``text`` (stripped), or None.

  ``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}`` (nested braces are matched; ``\\{`` / ``\\}`` are
  literal, not grouping); ``\\boxed 5`` -> ``5`` (an unbraced argument runs to the next
  whitespace or ``$``); ``\\boxedx`` is not a box; ``\\boxed{}`` gives "". Returns None when there
  is no box or when the LAST box is unterminated (e.g. generation hit max length inside it):
  an earlier, complete box is then not the final answer, so it is not used.
  """
  start = -1
  cmd_len = 0
  for cmd in _BOX_COMMANDS:
    pos = len(text)
    while True:
      pos = text.rfind(cmd, 0, pos)
      if pos < 0:
        break
      after = pos + len(cmd)
      if after >= len(text) or not text[after].isalpha():
        if pos > start:
          start, cmd_len = pos, len(cmd)
        break
  if start < 0:
    return None
  i = start + cmd_len
  while i < len(text) and text[i].isspace():
    i += 1
  if i >= len(text):
    return None
  if text[i] == "{":
    end = match_braces(text, i)
    return None if end is None else text[i + 1:end].strip()
  match = re.match(r"[^\s$]+", text[i:])
  return match.group(0) if match else None
