"""Boxed / last-number extraction and answer normalisation on hand-written cases."""

import numpy as np
import pytest

from cast_jax.data.adapters import last_boxed
from cast_jax.eval import answer_extraction as ax

BOXED_CASES = [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"nested \boxed{\left(\frac{a}{b}\right)^{2}} done", r"\left(\frac{a}{b}\right)^{2}"),
    (r"first \boxed{1}, finally \boxed{2}", "2"),
    (r"\boxed 5", "5"),
    (r"$\boxed 7$", "7"),
    (r"\fbox{9}", "9"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{}", ""),
    (r"truncated \boxed{12", None),
    (r"early \boxed{3} then cut \boxed{4", None),
    ("", None),
    ("no box here, the answer is 5", None),
    (r"\boxedx{3}", None),
    (r"\boxed{\text{(B)}}", r"\text{(B)}"),
]


@pytest.mark.parametrize("text,expected", BOXED_CASES)
def test_extract_boxed(text, expected):
  assert ax.extract_boxed(text) == expected


@pytest.mark.parametrize("text,expected", BOXED_CASES + [
    (r"a \boxed{x^{2}} b \fbox{7}", "7"), (r"\boxed {a{b}c}", "a{b}c")])
def test_math_loader_reads_boxes_like_the_scorer(text, expected):
  """MATH references (data) and scored responses (eval) must follow the same box rule."""
  assert last_boxed(text) == expected
  assert ax.extract_boxed(text) == expected


NORMALIZE_CASES = [
    ("$1,234.50", "1234.5"),
    ("18.0", "18"),
    ("18.", "18"),
    ("007", "7"),
    ("-0.0", "0"),
    (r"\dfrac{3}{4}", "3/4"),
    (r"\frac12", "1/2"),
    (r"\frac{\sqrt{3}}{2}", r"(\sqrt{3})/2"),
    (r"\text{ 5 apples }", "5apples"),
    ("x = 12", "12"),
    (r"50\%", "50"),
    (r"90^\circ", "90"),
    (r"\$ 45", "45"),
    ("1, 2, 3", "1,2,3"),  # a list keeps its commas (not a thousands separator)
]


@pytest.mark.parametrize("text,expected", NORMALIZE_CASES)
def test_normalize_answer(text, expected):
  assert ax.normalize_answer(text) == expected


MATCH_CASES = [
    (r"\frac{1}{2}", "1/2", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"\dfrac{1}{2}", "0.5", True),
    ("$18.00", "18", True),
    ("1,000", "1000", True),
    (r"\text{(B)}", "(b)", True),
    ("17", "18", False),
    (None, "18", False),
    ("", "0", False),
]


@pytest.mark.parametrize("pred,ref,expected", MATCH_CASES)
def test_answers_match(pred, ref, expected):
  assert ax.answers_match(pred, ref) is expected


LAST_NUMBER_CASES = [
    ("She pays $1,000, then 72 more.", "72"),
    ("Total: 18.00 dollars", "18"),
    ("The change is -3", "-3"),
    (r"\boxed{\frac{1}{2}}", "2"),
    ("The list 1, 2, 3,", "3"),
    ("no digits", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", LAST_NUMBER_CASES)
def test_extract_last_number(text, expected):
  assert ax.extract_last_number(text) == expected


def test_score_reasoning_reports_both_accuracies_separately():
  responses = [
      r"6 * 7 = 42, so \boxed{42}.",        # both right
      "6 * 7 = 42",                          # box lost: only the fallback is right
      r"\boxed{41} is my guess, not 42",     # boxed wrong, last number right
      "",                                    # empty
  ]
  scores = ax.score_reasoning(responses, ["42"] * 4)
  np.testing.assert_array_equal(scores.boxed_correct, [True, False, False, False])
  np.testing.assert_array_equal(scores.last_number_correct, [True, True, True, False])
  np.testing.assert_array_equal(scores.boxed_found, [True, False, True, False])
  assert scores.boxed_accuracy == 0.25
  assert scores.last_number_accuracy == 0.75


def test_references_and_errors():
  assert ax.parse_gsm8k_reference("He has 3+4=<<3+4=7>>7 apples.\n#### 1,007") == "1007"
  assert ax.parse_math_reference(r"So $x=\boxed{\dfrac{1}{2}}$.") == "1/2"
  with pytest.raises(ValueError, match="####"):
    ax.parse_gsm8k_reference("no marker")
  with pytest.raises(ValueError, match="boxed"):
    ax.parse_math_reference("no box")
  with pytest.raises(ValueError, match="references"):
    ax.score_reasoning(["a"], [])
