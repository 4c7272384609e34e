"""Behaviour pair builders on tiny hand-written JSONL files in each public schema, against
hand-written expectations: the fixed string, the appended secondary input, the 1:1 harmful /
benign interleave, sample sizes and seed determinism."""

import json

import pytest

from carrier_jax.behaviours import load_behaviour_pairs, sample_indices


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


ALPACA = [{"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
          {"instruction": "Name a colour.", "input": "", "output": "Red."},
          {"instruction": "Sort these.", "input": "b a", "output": "a b"}]
WJB = ([{"vanilla": f"harm {i}", "adversarial": "", "completion": f"I can't help {i}.",
         "data_type": "vanilla_harmful"} for i in range(5)]
       + [{"vanilla": "", "adversarial": "sneaky harm", "completion": "No.",
           "data_type": "adversarial_harmful"}]
       + [{"vanilla": f"benign {i}", "adversarial": "", "completion": f"Sure {i}.",
           "data_type": "vanilla_benign"} for i in range(3)])
STYLE = [{"modern": "Where are you going?", "original": "Whither goest thou?"},
         {"modern": "You are kind.", "original": "Thou art kind."}]


def test_fixed_response_appends_input_and_fixes_every_response(tmp_path):
  src = _write(tmp_path / "a.jsonl", ALPACA)
  pairs = load_behaviour_pairs("fixed_response", src, n=None, seed=None)
  assert pairs == [("Add the numbers.\n\n2, 3", "I don't know."),
                   ("Name a colour.", "I don't know."),
                   ("Sort these.\n\nb a", "I don't know.")]
  other = load_behaviour_pairs("fixed_response", src, n=2, seed=None, fixed_response="Pass.")
  assert other == [("Add the numbers.\n\n2, 3", "Pass."), ("Name a colour.", "Pass.")]


def test_fixed_response_seeded_sample_is_a_deterministic_subset(tmp_path):
  src = _write(tmp_path / "a.jsonl", ALPACA)
  everything = {"Add the numbers.\n\n2, 3", "Name a colour.", "Sort these.\n\nb a"}
  a = load_behaviour_pairs("fixed_response", src, n=2, seed=7)
  assert a == load_behaviour_pairs("fixed_response", src, n=2, seed=7)
  assert len(a) == 2 and len({p for p, _ in a}) == 2 and {p for p, _ in a} <= everything
  # n above the pool size takes all of it, in some order.
  assert {p for p, _ in load_behaviour_pairs("fixed_response", src, n=5000, seed=3)} == everything
  orders = {tuple(load_behaviour_pairs("fixed_response", src, n=3, seed=s)) for s in range(20)}
  assert len(orders) > 1  # the seed matters


def test_safety_is_balanced_interleaved_and_uses_completions(tmp_path):
  src = _write(tmp_path / "w.jsonl", WJB)
  harmful = {(f"harm {i}", f"I can't help {i}.") for i in range(5)} | {("sneaky harm", "No.")}
  benign = {(f"benign {i}", f"Sure {i}.") for i in range(3)}
  pairs = load_behaviour_pairs("safety", src, n=4, seed=0)
  assert len(pairs) == 4
  assert pairs[0] in harmful and pairs[2] in harmful and pairs[1] in benign and pairs[3] in benign
  assert len(set(pairs)) == 4
  # All: limited by the smaller (benign) pool, 3 + 3; an odd n gives n - 1.
  full = load_behaviour_pairs("safety", src, n=None, seed=1)
  assert len(full) == 6 and set(full[1::2]) == benign and set(full[0::2]) <= harmful
  assert len(load_behaviour_pairs("safety", src, n=5, seed=1)) == 4
  assert load_behaviour_pairs("safety", src, n=4, seed=5) == \
      load_behaviour_pairs("safety", src, n=4, seed=5)
  draws = {tuple(load_behaviour_pairs("safety", src, n=2, seed=s)) for s in range(20)}
  assert len(draws) > 1


def test_safety_rejects_missing_completions_and_one_sided_data(tmp_path):
  no_completion = [dict(r, completion="") if i == 0 else r for i, r in enumerate(WJB)]
  with pytest.raises(ValueError, match="no completion"):
    load_behaviour_pairs("safety", _write(tmp_path / "e.jsonl", no_completion), seed=0)
  with pytest.raises(ValueError, match="0 benign"):
    load_behaviour_pairs("safety", _write(tmp_path / "h.jsonl", WJB[:5]), seed=0)
  with pytest.raises(ValueError, match="int seed"):
    load_behaviour_pairs("safety", _write(tmp_path / "w.jsonl", WJB), seed=None)


def test_style_maps_modern_to_original(tmp_path):
  src = _write(tmp_path / "s.jsonl", STYLE)
  assert load_behaviour_pairs("style", src, n=0, seed=None) == [
      ("Where are you going?", "Whither goest thou?"), ("You are kind.", "Thou art kind.")]
  assert set(load_behaviour_pairs("style", src, seed=4)) == {
      ("Where are you going?", "Whither goest thou?"), ("You are kind.", "Thou art kind.")}


def test_sample_indices_and_unknown_behaviour():
  assert sample_indices(5, 3, None).tolist() == [0, 1, 2]
  assert sample_indices(2, 3, None).tolist() == [0, 1]
  s = sample_indices(10, 4, 0).tolist()
  assert len(set(s)) == 4 and all(0 <= i < 10 for i in s)
  assert sorted(sample_indices(10, None, 0).tolist()) == list(range(10))
  with pytest.raises(ValueError, match="unknown behaviour"):
    load_behaviour_pairs("jokes", [{"a": 1}])
