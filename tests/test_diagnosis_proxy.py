"""The teacher-forced safety proxy against (a) a one-head-at-a-time loop of plain `forward`
with a numpy log-softmax and (b) HF transformers with a forward pre-hook zeroing the head's
slice of o_proj's input; its Spearman helper against scipy."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from cast_jax import data
from cast_jax.diagnosis import safety_proxy, scores
from cast_jax.models import forward
from hf_models import tiny_llama_on_testbed_vocab
from test_diagnosis_sensitivity import _Ablated


def _np_target_logprob(logits, ids, k):
  """Sum of log p(ids[t] | < t) over the last k tokens; logits [T, V] float64 numpy."""
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  T = len(ids)
  return sum(logp[t - 1, ids[t]] for t in range(T - k, T))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  world, tok, model, config, params = tiny_llama_on_testbed_vocab(tmp_path_factory.mktemp("llama"))
  safety = [r for r in data.load_wildjailbreak(list(world.files["calib/d_safe.jsonl"]))
            if r.harmful][:3]
  prompts = [data.safety_prompt(r) for r in safety]
  # Two openings of different token counts after each of 3 prompts: 6 rows.
  seqs, ks = safety_proxy.proxy_examples(tok, prompts, ("I'm sorry", "I can't help with that"))
  return dict(tok=tok, model=model, config=config, params=params, seqs=seqs, ks=ks)


def test_proxy_examples_score_the_opening_tokens_only(setup):
  tok, seqs, ks = setup["tok"], setup["seqs"], setup["ks"]
  assert len(seqs) == 6 and ks[0] < ks[1]
  for s, k in zip(seqs, ks):
    assert tok.decode(s[-k:]).strip() in ("I'm sorry", "I can't help with that")
    assert s[-1] != tok.eos_token_id


def test_proxy_sweep_equals_one_head_loop_and_hf_hooks(setup):
  config, params, seqs, ks = setup["config"], setup["params"], setup["seqs"], setup["ks"]
  L, H, Dh = config.num_layers, config.num_heads, config.head_dim
  # batch_size 4 does not divide the 6 rows; mask_block 3 does not divide the 4 heads.
  sweep = safety_proxy.proxy_safety_sweep(params, config, seqs, ks, pad_id=0, batch_size=4,
                                          mask_block=3)
  assert sweep.logprob.shape == (L, H, 6)

  def loop(hm):
    return np.asarray([_np_target_logprob(np.asarray(forward(
        params, config, jnp.asarray([s]), head_mask=hm)[0], np.float64), s, k)
        for s, k in zip(seqs, ks)])

  def hf(layer, head):
    with _Ablated(setup["model"], layer, head, Dh) as m, torch.no_grad():
      return np.asarray([_np_target_logprob(m(torch.tensor([s])).logits[0].double().numpy(),
                                            s, k) for s, k in zip(seqs, ks)])

  np.testing.assert_allclose(sweep.base_logprob, loop(None), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(sweep.base_logprob, hf(None, None), rtol=1e-5, atol=1e-4)
  for layer in range(L):
    for head in range(H):
      hm = jnp.ones((L, H)).at[layer, head].set(0.0)
      np.testing.assert_allclose(sweep.logprob[layer, head], loop(hm), rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(sweep.logprob[layer, head], hf(layer, head), rtol=1e-5,
                                 atol=1e-4)
  total = ks.sum()
  np.testing.assert_allclose(sweep.h_safe, np.abs(sweep.logprob.sum(-1) / total
                                                  - sweep.base_logprob.sum() / total))
  assert sweep.h_safe.min() >= 0 and np.ptp(sweep.h_safe) > 1e-3  # heads differ


def test_spearman_matches_scipy_with_ties():
  rs = np.random.RandomState(0)
  a = rs.randint(0, 4, size=(3, 5)).astype(float)  # many ties
  b = a + rs.randint(-2, 3, size=(3, 5))
  c = rs.randn(3, 5)
  for x, y in ((a, b), (a, c), (c, -c), (c, c ** 3)):
    assert scores.spearman(x, y) == pytest.approx(
        scipy.stats.spearmanr(x.reshape(-1), y.reshape(-1)).statistic, abs=1e-12)
  assert np.isnan(scores.spearman(np.ones(4), np.arange(4.0)))
  with pytest.raises(ValueError, match="differ"):
    scores.spearman(np.arange(3.0), np.arange(4.0))


def test_proxy_examples_per_prompt_needs_one_opening_each(setup):
  tok = setup["tok"]
  seqs, ks = safety_proxy.proxy_examples(tok, ["a b", "c d"], ["I'm sorry", "No."],
                                         per_prompt=True)
  assert len(seqs) == 2 and tok.decode(seqs[1][-ks[1]:]).strip() == "No."
  with pytest.raises(ValueError, match="one opening per prompt"):
    safety_proxy.proxy_examples(tok, ["a b", "c d"], ["I'm sorry"], per_prompt=True)
