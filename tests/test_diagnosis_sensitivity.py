"""The ablation sweep against (a) a one-head-at-a-time loop of the library's own runners and
(b) HF transformers with a forward pre-hook zeroing the head's slice of o_proj's input; the
layer-skipping seam against the full forward."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cast_jax import data
from cast_jax.diagnosis import calibration, sensitivity
from cast_jax.eval import EvalModel, score_mcq, score_refusal_generation
from cast_jax.generate import generate
from cast_jax.models import forward, load_pretrained
from cast_jax.models.layer_skip import forward_from_layer
from hf_models import make_hf_model, save_hf, tiny_llama_on_testbed_vocab

GEN_LEN = 6


class ParityJudge:
  """Refused iff the response's character codes sum to an even number: about half the random
  model's responses, and any change of the generated text can flip it."""

  def classify(self, prompts, responses):
    return [sum(map(ord, r)) % 2 == 0 for r in responses]


def _zero_head_hook(head, head_dim):
  def hook(module, args):
    x = args[0].clone()
    x[..., head * head_dim:(head + 1) * head_dim] = 0.0
    return (x,)
  return hook


class _Ablated:
  """HF model with head (layer, head) zeroed at o_proj's input while inside the block."""

  def __init__(self, model, layer, head, head_dim):
    self.model, self.layer, self.head, self.head_dim = model, layer, head, head_dim

  def __enter__(self):
    self.handle = None
    if self.layer is not None:
      o_proj = self.model.model.layers[self.layer].self_attn.o_proj
      self.handle = o_proj.register_forward_pre_hook(_zero_head_hook(self.head, self.head_dim))
    return self.model

  def __exit__(self, *exc):
    if self.handle is not None:
      self.handle.remove()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  world, tok, model, config, params = tiny_llama_on_testbed_vocab(tmp_path_factory.mktemp("llama"))
  mmlu = data.load_mmlu(list(world.files["calib/d_util.jsonl"]), limit=7)
  safety = data.load_wildjailbreak(list(world.files["calib/d_safe.jsonl"]))[:5]
  mcq_set, _ = calibration.util_calibration(tok, mmlu, max_len=96)
  return dict(tok=tok, model=model, config=config, params=params, mmlu=mmlu, safety=safety,
              mcq_set=mcq_set)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # mistral: sliding window 5
def test_forward_from_layer_equals_full_forward(arch, tmp_path_factory):
  model = make_hf_model(arch)
  config, params = load_pretrained(save_hf(model, tmp_path_factory.mktemp(arch)))
  L, H = config.num_layers, config.num_heads
  rs = np.random.RandomState(0)
  ids = jnp.asarray(rs.randint(3, 97, size=(2, 11)))
  mask = np.ones((2, 11), np.int32)
  mask[0, :4] = 0  # left padding: positions come from the mask on both paths
  mask = jnp.asarray(mask)
  full, got = forward(params, config, ids, attention_mask=mask, collect=("residual",))
  for layer in range(L):
    tail = forward_from_layer(params, config, got["residual"][layer], layer, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full), atol=1e-5)
    hm = jnp.ones((L, H)).at[layer, (layer + 1) % H].set(0.0).at[L - 1, 0].set(0.5)
    ablated = forward(params, config, ids, attention_mask=mask, head_mask=hm, logits_at=[-1])
    tail = forward_from_layer(params, config, got["residual"][layer], layer,
                              attention_mask=mask, head_mask=hm[layer:], logits_at=[-1])
    np.testing.assert_allclose(np.asarray(tail), np.asarray(ablated), atol=1e-5)
    assert np.abs(np.asarray(ablated) - np.asarray(full)[:, -1:]).max() > 1e-3
  with pytest.raises(ValueError, match="head_mask"):
    forward_from_layer(params, config, got["residual"][1], 1, head_mask=jnp.ones((L, H)))


def _hf_letter_predictions(model, prompt_ids, choice_ids):
  with torch.no_grad():
    return np.asarray([int(np.argmax(model(torch.tensor([p])).logits[0, -1].numpy()[c]))
                       for p, c in zip(prompt_ids, choice_ids)])


def test_mcq_sweep_equals_one_head_loop_and_hf_hooks(setup):
  tok, config, params, mcq_set = setup["tok"], setup["config"], setup["params"], setup["mcq_set"]
  L, H, Dh = config.num_layers, config.num_heads, config.head_dim
  # batch_size 3 does not divide the 7 prompts; mask_block 3 does not divide the 4 heads.
  sweep = sensitivity.mcq_sweep(params, config, mcq_set, pad_id=0, batch_size=3, mask_block=3)
  prompts = [data.render_prompt(tok, data.mcq_prompt(r)) for r in setup["mmlu"]]
  answers = [r.answer_index for r in setup["mmlu"]]
  base = score_mcq(EvalModel(params, config), tok, prompts, answers, batch_size=4)
  np.testing.assert_array_equal(sweep.base_predictions, base.predictions)
  with _Ablated(setup["model"], None, None, Dh) as hf:
    np.testing.assert_array_equal(
        sweep.base_predictions, _hf_letter_predictions(hf, mcq_set.prompt_ids,
                                                       mcq_set.choice_ids))
  for layer in range(L):
    for head in range(H):
      hm = jnp.ones((L, H)).at[layer, head].set(0.0)
      ours = score_mcq(EvalModel(params, config, head_mask=hm), tok, prompts, answers,
                       batch_size=4)
      np.testing.assert_array_equal(sweep.predictions[layer, head], ours.predictions)
      with _Ablated(setup["model"], layer, head, Dh) as hf:
        np.testing.assert_array_equal(
            sweep.predictions[layer, head],
            _hf_letter_predictions(hf, mcq_set.prompt_ids, mcq_set.choice_ids))
      assert sweep.accuracy[layer, head] == pytest.approx(ours.accuracy)
  np.testing.assert_allclose(sweep.h_gen, np.abs(sweep.accuracy - base.accuracy))
  assert (sweep.predictions != sweep.base_predictions).any()  # some ablation changes an answer


def _hf_refusals(model, prompt_ids, eos, tok, judge):
  texts = []
  with torch.no_grad():
    for p in prompt_ids:
      out = model.generate(torch.tensor([p]), max_new_tokens=GEN_LEN, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist()
      if eos in out:
        out = out[:out.index(eos)]
      texts.append(tok.decode(out, skip_special_tokens=True))
  return np.asarray(judge.classify([""] * len(texts), texts)) & np.asarray(
      [bool(t.strip()) for t in texts])


def test_safety_sweep_equals_one_head_loop_and_hf_hooks(setup):
  tok, config, params = setup["tok"], setup["config"], setup["params"]
  L, H, Dh = config.num_layers, config.num_heads, config.head_dim
  prompt_ids = calibration.safety_prompt_ids(tok, setup["safety"])
  judge = ParityJudge()
  # 13 masks (base + 12 heads) in blocks of 5: the last block is filled with copies.
  sweep = sensitivity.safety_sweep(params, config, tok, prompt_ids, max_new_tokens=GEN_LEN,
                                   pad_id=0, batch_size=4, mask_block=5, judge=judge)
  rendered = [data.render_prompt(tok, data.safety_prompt(r)) for r in setup["safety"]]
  eos = tok.eos_token_id

  def loop_refusals(hm):
    _, verdicts, _ = score_refusal_generation(
        EvalModel(params, config, head_mask=hm), tok, rendered, max_new_tokens=GEN_LEN,
        judge=judge, batch_size=4, eos_token_ids=[eos])
    return np.asarray([v.value == "refused" for v in verdicts])

  np.testing.assert_array_equal(sweep.base_refused, loop_refusals(None))
  with _Ablated(setup["model"], None, None, Dh) as hf:
    np.testing.assert_array_equal(sweep.base_refused, _hf_refusals(hf, prompt_ids, eos, tok,
                                                                   judge))
  for layer in range(L):
    for head in range(H):
      hm = jnp.ones((L, H)).at[layer, head].set(0.0)
      np.testing.assert_array_equal(sweep.refused[layer, head], loop_refusals(hm))
      with _Ablated(setup["model"], layer, head, Dh) as hf:
        np.testing.assert_array_equal(sweep.refused[layer, head],
                                      _hf_refusals(hf, prompt_ids, eos, tok, judge))
  assert (sweep.refused != sweep.base_refused).any()  # some ablation flips a decision
  np.testing.assert_allclose(sweep.h_safe, np.abs(sweep.refused.mean(-1)
                                                  - sweep.base_refused.mean()))


def test_generate_under_a_mask_stack_equals_one_mask_at_a_time(setup):
  config, params = setup["config"], setup["params"]
  L, H = config.num_layers, config.num_heads
  ids = np.random.RandomState(1).randint(10, 500, size=(2, 9))
  masks = np.ones((3, L, H), np.float32)
  masks[1, 0, 2] = 0.0
  masks[2, 2, 1] = 0.0
  stacked = generate(params, config, ids, max_new_tokens=5, head_mask=jnp.asarray(masks))
  assert stacked.tokens.shape == (3, 2, 5) and stacked.lengths.shape == (3, 2)
  for m in range(3):
    one = generate(params, config, ids, max_new_tokens=5, head_mask=jnp.asarray(masks[m]))
    np.testing.assert_array_equal(stacked.tokens[m], one.tokens)
    np.testing.assert_array_equal(stacked.lengths[m], one.lengths)
