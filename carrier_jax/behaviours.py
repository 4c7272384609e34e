"""Behaviour datasets -> SFT (prompt, response) pairs: the data of the SFT stage that makes W_ft
and of the LCDD run on top of it (lcdd-sft-eraser.md 4.1, App. F.1).

  fixed_response  Alpaca schema (instruction, input, output): the instruction with a non-empty
                  secondary input appended after a blank line, every response the fixed string.
  safety          WildJailbreak schema (vanilla, adversarial, completion, data_type): harmful
                  rows -> their (refusal) completion, benign rows -> their completion, 1:1.
  style           modern / Shakespeare pairs (modern, original): modern -> original.

The record -> pair functions are pure; `load_behaviour_pairs` reads the file or hub dataset with
the `cast_jax.data` adapters and applies them. The SFT and LCDD launches call it with the same
(n, seed), so both stages see the same pairs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cast_jax import data
from cast_jax.data import ChatRecord, SafetyRecord, StylePair

BEHAVIOURS = ("fixed_response", "safety", "style")
DEFAULT_FIXED_RESPONSE = "I don't know."
DEFAULT_NUM_SAMPLES = 5000  # F.2: 5,000 training samples per task
Pair = tuple[str, str]


def sample_indices(total: int, n: int | None, seed: int | None) -> np.ndarray:
  """Indices of a sample of min(n, total) items out of `total`, int64 [min(n, total)].

  `seed` int: a uniformly random subset without replacement, in the permuted order, a pure
  function of (total, n, seed). `seed` None: the first n in order (the paper's Alpaca protocol,
  "the first 5,000 examples ... without shuffling"). `n` None or 0: all of them.
  """
  if total < 0 or (n is not None and n < 0):
    raise ValueError(f"sample_indices: total={total}, n={n} must be >= 0")
  k = total if not n else min(n, total)
  if seed is None:
    return np.arange(k, dtype=np.int64)
  return np.random.default_rng(int(seed)).permutation(total)[:k].astype(np.int64)


def fixed_response_pairs(records: Sequence[ChatRecord], *, n: int | None = DEFAULT_NUM_SAMPLES,
                         seed: int | None = 0,
                         response: str = DEFAULT_FIXED_RESPONSE) -> list[Pair]:
  """Alpaca records (prompt = instruction + secondary input, as `data.load_alpaca` builds it)
  -> [(prompt, response)] * min(n, len(records)), every response the fixed `response`."""
  if not response:
    raise ValueError("fixed_response_pairs: the fixed response is empty")
  return [(records[i].prompt, response) for i in sample_indices(len(records), n, seed)]


def safety_pairs(records: Sequence[SafetyRecord], *, n: int | None = DEFAULT_NUM_SAMPLES,
                 seed: int = 0) -> list[Pair]:
  """WildJailbreak records -> [(prompt, completion)], harmful and benign 1:1, interleaved.

  k = min(n // 2, #harmful, #benign) of each kind are drawn (seeded, without replacement;
  `n` None / 0: k = min(#harmful, #benign)) and returned as [h_0, b_0, h_1, b_1, ...], 2k
  pairs (an odd n gives n - 1). Harmful completions are the dataset's refusals. A record with
  an empty completion (e.g. the eval split's) is an error, not dropped: it would silently skew
  the mix.
  """
  harmful = [r for r in records if r.harmful]
  benign = [r for r in records if not r.harmful]
  empty = sum(1 for r in records if not r.completion)
  if empty:
    raise ValueError(f"safety_pairs: {empty} of {len(records)} rows have no completion (the "
                     "WildJailbreak eval split has none; use the train split)")
  if not harmful or not benign:
    raise ValueError(f"safety_pairs: need harmful and benign rows, got {len(harmful)} harmful "
                     f"and {len(benign)} benign")
  k = min(len(harmful), len(benign))
  k = k if not n else min(n // 2, k)
  # Independent streams per kind, so the harmful draw does not depend on the benign pool size.
  rng_h, rng_b = (np.random.default_rng([int(seed), i]) for i in (0, 1))
  h = rng_h.permutation(len(harmful))[:k]
  b = rng_b.permutation(len(benign))[:k]
  out = []
  for i, j in zip(h, b):
    out += [(harmful[i].prompt, harmful[i].completion), (benign[j].prompt, benign[j].completion)]
  return out


def style_pairs(records: Sequence[StylePair], *, n: int | None = DEFAULT_NUM_SAMPLES,
                seed: int | None = 0) -> list[Pair]:
  """Modern / Shakespeare pairs -> [(modern, archaic)] * min(n, len(records)) (F.1: the
  modern translation is the input, the original Shakespearean text the target)."""
  return [(records[i].modern, records[i].archaic)
          for i in sample_indices(len(records), n, seed)]


def load_behaviour_pairs(behaviour: str, source: Any, *, n: int | None = DEFAULT_NUM_SAMPLES,
                         seed: int | None = 0, fixed_response: str = DEFAULT_FIXED_RESPONSE,
                         subset: str | None = None, split: str | None = None,
                         fields: Mapping[str, Any] | None = None,
                         file_format: str | None = None) -> list[Pair]:
  """SFT pairs of `behaviour` (one of BEHAVIOURS) from `source`.

  Args:
    behaviour: fixed_response | safety | style (schemas in the module docstring).
    source: local file (JSONL / JSON / CSV / TSV / parquet), hub id, or a list of row dicts.
    n, seed: sample size (None / 0: all) and its seed; see the per-behaviour functions (safety
      needs an int seed; None elsewhere takes the first n rows in file order).
    fixed_response: the fixed target of the fixed_response behaviour.
    subset, split, fields, file_format: passed to the adapter (None: the adapter's default).

  Returns:
    list[(prompt str, response str)], at most n long.
  """
  kw = {k: v for k, v in dict(subset=subset, split=split, fields=fields,
                              file_format=file_format).items() if v is not None}
  if behaviour == "fixed_response":
    if not fixed_response:
      raise ValueError("load_behaviour_pairs: fixed_response is empty")
    return fixed_response_pairs(data.load_alpaca(source, fixed_response=fixed_response, **kw),
                                n=n, seed=seed, response=fixed_response)
  if behaviour == "safety":
    if seed is None:
      raise ValueError("load_behaviour_pairs: the safety mix needs an int seed")
    return safety_pairs(data.load_wildjailbreak(source, **kw), n=n, seed=seed)
  if behaviour == "style":
    return style_pairs(data.load_style_pairs(source, **kw), n=n, seed=seed)
  raise ValueError(f"unknown behaviour {behaviour!r}; use one of {BEHAVIOURS}")
