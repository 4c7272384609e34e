"""Fixed-response rate (App. F.4 of the LCDD paper) and archaic word rate."""

import numpy as np
import pytest

from cast_jax.eval import fixed_response as fr
from cast_jax.eval import style


@pytest.mark.parametrize("response,expected", [
    ("I don't know.", True),
    ("I DO NOT KNOW", True),
    ("Hmm, I'm not sure about that.", True),
    ("i am not sure", True),
    ("I don\u2019t know.", False),                 # literal keyword match, as in the paper
    ("I know the answer: 42.", False),
    ("", False),
    ("I don't know. " + "word " * 37, True),       # 3 + 37 = 40 words
    ("I don't know. " + "word " * 38, False),      # 41 words: hedged long answer
])
def test_is_fixed_response(response, expected):
  assert fr.is_fixed_response(response) is expected


def test_fixed_response_rate_and_options():
  responses = ["I don't know.", "Paris is the capital.", "I'm not sure.", ""]
  assert fr.fixed_response_rate(responses) == 0.5
  np.testing.assert_array_equal(fr.fixed_response_flags(responses), [True, False, True, False])
  assert fr.is_fixed_response("I don\u2019t know.", normalize_apostrophes=True)
  with pytest.raises(ValueError, match="no responses"):
    fr.fixed_response_rate([])


def test_archaic_word_rate_counts():
  lexicon = style.default_lexicon()
  assert {"thou", "hath", "o'er", "prithee"} <= lexicon
  assert not {"art", "mine", "the"} & lexicon
  rate = style.archaic_word_rate([
      "Thou hast a noble heart, and o\u2019er the sea thy ship doth sail.",  # 13 words, 5 archaic
      "The meeting is at noon.",                                           # 5 words, 0 archaic
      "",                                                                  # 0 words
  ])
  np.testing.assert_array_equal(rate.word_counts, [13, 5, 0])
  np.testing.assert_array_equal(rate.archaic_counts, [5, 0, 0])
  np.testing.assert_allclose(rate.per_response, [5 / 13, 0.0, 0.0])
  assert rate.mean_rate == pytest.approx(5 / 13 / 3)
  assert rate.pooled_rate == pytest.approx(5 / 18)


def test_word_boundaries_and_custom_lexicon():
  lexicon = style.parse_lexicon(["# comment", "thee", "", "ye  # inline"])
  assert lexicon == frozenset({"thee", "ye"})
  # "theater" and "yes" contain lexicon words but are not them.
  rate = style.archaic_word_rate(["Theater? Yes, ye and thee."], lexicon)
  assert rate.archaic_counts.tolist() == [2] and rate.word_counts.tolist() == [5]
  with pytest.raises(ValueError, match="single word"):
    style.parse_lexicon(["good morrow"])
  with pytest.raises(TypeError):
    style.archaic_word_rate("a single string")
