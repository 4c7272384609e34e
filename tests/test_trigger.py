"""Soft triggers as an input (carrier_jax.trigger): insertion against a list-built numpy
reference (left and right padding, consecutive positions, padding masked), the PGD projection,
the init, and the triggered model through forward (vs HF inputs_embeds), generate (vs HF
generate on inputs_embeds and a no-cache greedy loop) and the eval runners."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from carrier_jax import trigger as T
from cast_jax.eval import runners
from cast_jax.eval.runners import EvalModel
from cast_jax.generate import generate
from cast_jax.models import forward, load_pretrained
from hf_models import make_hf_model, save_hf

BOS = 1


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  model = make_hf_model("llama")
  config, params = load_pretrained(save_hf(model, tmp_path_factory.mktemp("llama")))
  return model, config, params


def _np_insert(table, ids, mask, trig, at):
  """Row by row with python lists: (embeds, mask, positions, index_map)."""
  B, P = ids.shape
  L = trig.shape[0]
  emb = np.zeros((B, P + L, table.shape[1]), np.float32)
  new_mask = np.zeros((B, P + L), np.int64)
  index_map = np.zeros((B, P), np.int64)
  for b in range(B):
    real = np.flatnonzero(mask[b])
    lead = real[0]
    rows = [table[ids[b, j]] for j in range(lead)]  # leading pads keep their slots
    flags = [0] * lead
    for r, j in enumerate(real):
      if r == at[b]:
        rows += list(trig)
        flags += [1] * L
      index_map[b, j] = len(rows)
      rows.append(table[ids[b, j]])
      flags.append(1)
    if at[b] == len(real):
      rows += list(trig)
      flags += [1] * L
    for j in range(real[-1] + 1, P):  # trailing pads (right padding)
      index_map[b, j] = len(rows)
      rows.append(table[ids[b, j]])
      flags.append(0)
    for j in range(lead):
      index_map[b, j] = j
    emb[b], new_mask[b] = np.stack(rows), flags
  positions = np.maximum(np.cumsum(new_mask, axis=1) - 1, 0)
  return emb, new_mask, positions, index_map


def _batch(rng, lengths, P, left=True, vocab=97):
  ids = np.zeros((len(lengths), P), np.int32)
  mask = np.zeros_like(ids)
  for b, n in enumerate(lengths):
    row = np.concatenate([[BOS], rng.integers(3, vocab, n - 1)])
    sl = slice(P - n, P) if left else slice(0, n)
    ids[b, sl], mask[b, sl] = row, 1
  return ids, mask


@pytest.mark.parametrize("left", [True, False])
def test_insertion_matches_list_reference(left):
  rng = np.random.default_rng(0)
  table = rng.normal(size=(97, 6)).astype(np.float32)
  ids, mask = _batch(rng, [7, 3, 5, 1], 7, left=left)
  ids[2, np.flatnonzero(mask[2])[0]] = 5  # a row without BOS: trigger at its start
  trig = rng.normal(size=(4, 6)).astype(np.float32)
  at = T.insertion_offsets(ids, mask, "after_bos", BOS)
  np.testing.assert_array_equal(at, [1, 1, 0, 1])
  np.testing.assert_array_equal(T.insertion_offsets(ids, mask, "start", BOS), 0)
  for offsets in (at, np.array([0, 3, 2, 1])):  # also explicit places, incl. the row's end
    got = T.insert_trigger(jnp.asarray(trig), jnp.asarray(table[ids]), jnp.asarray(mask),
                           jnp.asarray(offsets))
    emb, new_mask, pos, index_map = _np_insert(table, ids, mask, trig, offsets)
    np.testing.assert_array_equal(got.attention_mask, new_mask)
    np.testing.assert_array_equal(got.index_map, index_map)
    real = new_mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(got.embeds)[real], emb[real])
    np.testing.assert_array_equal(np.asarray(got.is_trigger).sum(1), 4)
    # Real slots count 0, 1, 2, ... with no gap; padding is masked.
    for b in range(4):
      np.testing.assert_array_equal(pos[b][real[b]], np.arange(real[b].sum()))
    assert (new_mask[:, -1] == 1).all() if left else (new_mask[:, 0] == 1).all()
    # index_map sends every real token to a slot holding its own embedding.
    picked = np.asarray(T.gather_original(got.embeds, got.index_map, axis=1))
    np.testing.assert_array_equal(picked[mask.astype(bool)], table[ids][mask.astype(bool)])


def test_projection_and_init(llama):
  _, config, params = llama
  t = jnp.asarray(np.random.default_rng(1).normal(0, 1.0, (20, config.hidden_size)), jnp.float32)
  p = np.asarray(T.project_l2_ball(t, 1.0))
  norms = np.linalg.norm(np.asarray(t), axis=-1)
  np.testing.assert_array_less(np.linalg.norm(p, axis=-1), 1.0 + 1e-6)
  inside = norms <= 1.0
  np.testing.assert_array_equal(p[inside], np.asarray(t)[inside])
  np.testing.assert_allclose(p[~inside], np.asarray(t)[~inside] / norms[~inside, None],
                             rtol=1e-6)
  a = T.init_trigger(params, config, jax.random.PRNGKey(0), 5, radius=None, exclude_ids=(0, 1, 2))
  b = T.init_trigger(params, config, jax.random.PRNGKey(0), 5, radius=None, exclude_ids=(0, 1, 2))
  np.testing.assert_array_equal(a, b)
  table = np.asarray(params["embed"])
  hits = [np.flatnonzero((table == row).all(1)) for row in np.asarray(a)]
  assert all(len(h) and h[0] > 2 for h in hits)  # copies of non-excluded token rows
  with pytest.raises(ValueError, match="place"):
    T.insertion_offsets(np.ones((1, 2)), np.ones((1, 2)), "middle")


def _triggered_inputs(params, config, ids, mask, trig):
  model = T.triggered(EvalModel(params, config), trig, bos_token_id=BOS)
  return model, runners.prompt_inputs(model, jnp.asarray(ids), jnp.asarray(mask))


def test_triggered_forward_and_generate_match_hf_and_full_forward(llama):
  hf, config, params = llama
  rng = np.random.default_rng(2)
  ids, mask = _batch(rng, [6, 3, 5], 6)
  trig = rng.normal(0, 0.3, (4, config.hidden_size)).astype(np.float32)
  model, inputs = _triggered_inputs(params, config, ids, mask, trig)
  emb, new_mask = np.asarray(inputs["input_embeds"]), np.asarray(inputs["attention_mask"])
  pos = np.maximum(np.cumsum(new_mask, 1) - 1, 0)
  ours = np.asarray(forward(params, config, **inputs))
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(new_mask),
             position_ids=torch.tensor(pos)).logits.numpy()
  real = new_mask.astype(bool)
  np.testing.assert_array_less(np.abs(ours[real] - ref[real]).max(), 1e-4)

  N = 6
  out = generate(params, config, input_embeds=inputs["input_embeds"],
                 attention_mask=inputs["attention_mask"], max_new_tokens=N, eos_token_ids=())
  # Greedy loop of full-sequence forwards on [embeds; embedded generated tokens], no cache.
  seq, m = emb, new_mask
  table = np.asarray(params["embed"])
  for i in range(N):
    logits = np.asarray(forward(params, config, input_embeds=jnp.asarray(seq),
                                attention_mask=jnp.asarray(m)))[:, -1]
    tok = logits.argmax(-1)
    np.testing.assert_array_equal(out.tokens[:, i], tok)
    top2 = np.sort(logits, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 1e-3).all()  # no near-tie made the match trivial
    seq = np.concatenate([seq, table[tok][:, None]], 1)
    m = np.concatenate([m, np.ones((3, 1), m.dtype)], 1)
  with torch.no_grad():
    hf_out = hf.generate(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(new_mask),
                         max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=N)
  np.testing.assert_array_equal(out.tokens, hf_out.numpy()[:, -N:])

  # The MCQ runner's last-position logits with the trigger on are the same forward's.
  choice = np.array([[5, 9], [7, 11], [13, 3]], np.int32)
  got = runners.choice_logits_on_batch(model, ids, mask, choice)
  np.testing.assert_allclose(got, np.take_along_axis(ours[:, -1], choice, 1), atol=1e-5)


class _CharTokenizer:
  """ids 3 + (ord(c) % 90): enough for generate_texts (encode / decode / eos)."""
  eos_token_id = 2
  pad_token_id = 0

  def encode(self, text, add_special_tokens=False):
    return [BOS] + [3 + ord(c) % 90 for c in text]

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(str(i) for i in ids)


def test_generate_texts_with_trigger(llama):
  _, config, params = llama
  trig = np.random.default_rng(3).normal(0, 0.5, (3, config.hidden_size)).astype(np.float32)
  prompts = ["ab", "hello", "xyz!"]
  tok = _CharTokenizer()
  plain = EvalModel(params, config)
  model = T.triggered(plain, trig, bos_token_id=BOS)
  texts = runners.generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=4,
                                 eos_token_ids=[2])
  for p, text in zip(prompts, texts):
    ids = np.asarray([tok.encode(p)], np.int32)
    _, inputs = _triggered_inputs(params, config, ids, np.ones_like(ids), trig)
    out = generate(params, config, **inputs, max_new_tokens=5, eos_token_ids=[2])
    want = [i for i in out.trimmed()[0] if i != 2]
    assert text == " ".join(str(i) for i in want)
  assert texts != runners.generate_texts(plain, tok, prompts, max_new_tokens=5, batch_size=4,
                                         eos_token_ids=[2])
  with pytest.raises(ValueError, match="together"):
    EvalModel(params, config, trigger=trig)


def test_teacher_forced_kl_of_triggered_model_matches_hf(llama, tmp_path):
  """KL(Base || Trig) on right-padded [prompt; reference] rows vs float64 numpy of HF logits."""
  hf_base, config, base = llama
  hf_sft = make_hf_model("llama", seed=5)
  _, sft = load_pretrained(save_hf(hf_sft, tmp_path / "sft"))
  rng = np.random.default_rng(4)
  ids, mask = _batch(rng, [9, 6], 9, left=False)
  loss_mask = np.zeros_like(mask)
  loss_mask[0, 5:9], loss_mask[1, 3:6] = 1, 1
  trig = rng.normal(0, 0.4, (2, config.hidden_size)).astype(np.float32)
  model = T.triggered(EvalModel(sft, config), trig, bos_token_id=BOS)
  from cast_jax.eval import teacher_forced_kl
  got = teacher_forced_kl(EvalModel(base, config), model,
                          {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask},
                          batch_size=2)
  table = np.asarray(sft["embed"])
  per_row = []
  for b in range(2):
    n = int(mask[b].sum())
    emb = np.concatenate([table[ids[b, :1]], trig, table[ids[b, 1:n]]])[None]
    with torch.no_grad():
      q = hf_sft(inputs_embeds=torch.tensor(emb)).logits.numpy()[0].astype(np.float64)
      p = hf_base(input_ids=torch.tensor(ids[b:b + 1, :n].astype(np.int64))).logits.numpy()[0]
    q = np.concatenate([q[:1], q[1 + 2:]])  # drop the trigger slots
    lp = p.astype(np.float64) - np.log(np.exp(p.astype(np.float64)).sum(-1, keepdims=True))
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    t = np.flatnonzero(loss_mask[b]) - 1  # token t is predicted at t - 1
    per_row.append((np.exp(lp[t]) * (lp[t] - lq[t])).sum(-1).mean())
  np.testing.assert_allclose(got.per_prompt, per_row, rtol=2e-4)
  assert got.mean > 1e-2


def test_generate_embeds_input_errors(llama):
  _, config, params = llama
  emb = np.zeros((1, 4, config.hidden_size), np.float32)
  with pytest.raises(ValueError, match="not both"):
    generate(params, config, np.ones((1, 4), np.int32), input_embeds=emb, max_new_tokens=1)
  with pytest.raises(ValueError, match="hidden_size"):
    generate(params, config, input_embeds=emb[..., :3], max_new_tokens=1)
  with pytest.raises(ValueError, match="input_ids"):
    generate(params, config, max_new_tokens=1)
  with pytest.raises(ValueError, match="stack"):
    generate(params, config, input_embeds=emb, max_new_tokens=1,
             head_mask=np.ones((2, config.num_layers, config.num_heads), np.float32))
