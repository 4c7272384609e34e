"""GCG hard-token triggers (carrier_jax.hard_trigger): the token gradient against jax.grad of a
one-hot matmul written here and central finite differences, batched candidate scoring against
a loop of `trigger_loss`, the proposals (single substitutions, top-k of -G, excluded ids never
proposed, against numpy), the search (held-out best never worse, a planted zero-loss trigger
found, targets built from a forward on spliced ids), and the text route on the testbed's
tokenizer (round-tripping ids only, text ids == spliced ids, forward on text ids == forward on
the inserted embedding rows)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from carrier_jax import eraser, eraser_train
from carrier_jax import hard_trigger as H
from carrier_jax import write_channels as W
from carrier_jax.trigger import insert_trigger
from cast_jax.eval.runners import EvalModel
from cast_jax.models import ModelConfig, forward, init_params

BOS, PAD, EOS, V = 1, 0, 2, 97
# One loss setting for the two search tests, so they share compiled programs.
CFG2 = eraser.EraserConfig(length=2, tail_k=4, batch_size=8, beta=0.0)


def _config(vocab=V):
  return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=BOS,
                     eos_token_ids=(EOS,), pad_token_id=PAD)


@pytest.fixture(scope="module")
def tiny():
  """(config, base params, model params, channels, prompt set [8 rows]): two random Llamas."""
  config = _config()
  base = init_params(config, jax.random.PRNGKey(0), std=0.3)
  model = init_params(config, jax.random.PRNGKey(1), std=0.3)
  rng = np.random.default_rng(0)
  channels = {p: (rng.random((2, 32)) < 0.5).astype(np.float32) for p in W.PATHS}
  prompts = [[BOS] + rng.integers(3, V, n - 1).tolist() for n in rng.integers(3, 9, 8)]
  return config, base, model, channels, eraser.prompt_set(prompts, pad_id=PAD, bos_token_id=BOS)


def _setup(tiny, length=3, **kw):
  config, base, model, channels, ps = tiny
  cfg = eraser.EraserConfig(length=length, tail_k=4, batch_size=8, **kw)
  targets = eraser.base_targets(EvalModel(base, config), ps, channels, cfg=cfg)
  frozen = eraser.frozen_arrays(EvalModel(model, config), channels)
  return cfg, frozen, jax.tree.map(jnp.asarray, ps), targets


def test_token_gradient_is_the_one_hot_gradient(tiny):
  config = tiny[0]
  cfg, frozen, batch, targets = _setup(tiny)
  ids = jnp.asarray([5, 60, 17])
  table = frozen["params"]["embed"]

  @jax.jit
  def loss_of_onehot(x):  # the reference: the trigger as an explicit one-hot [L, V] @ E
    return eraser.trigger_loss(x @ table, frozen, batch, targets, config=config, cfg=cfg)[0]

  x0 = jax.nn.one_hot(ids, V, dtype=jnp.float32)
  want = jax.grad(loss_of_onehot)(x0)
  grads = jax.jit(functools.partial(H.token_gradients, config=config, cfg=cfg))
  got, terms = grads(ids, frozen, batch, targets)
  assert got.shape == (3, V)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(terms["loss"]), float(loss_of_onehot(x0)), rtol=1e-6)
  assert float(jnp.abs(want).max()) > 1e-3  # a non-trivial gradient was compared

  # Central finite differences along substitution directions e_v - e_old at one position:
  # the slope there is G[i, v] - G[i, old], the linearised change GCG ranks proposals by.
  eps = 1e-2
  for i, v in ((0, 9), (1, 33), (2, 80)):
    d = jnp.zeros_like(x0).at[i, v].set(1.0).at[i, ids[i]].set(-1.0)
    fd = (loss_of_onehot(x0 + eps * d) - loss_of_onehot(x0 - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(got[i, v] - got[i, ids[i]]), float(fd), rtol=2e-2,
                               atol=1e-4)


def test_batched_candidates_equal_a_loop(tiny):
  config = tiny[0]
  cfg, frozen, batch, targets = _setup(tiny)
  cands = jnp.asarray(np.random.default_rng(3).integers(3, V, (10, 3)), jnp.int32)
  # chunk 4 of 10: two vmapped blocks and a remainder, one program.
  score = jax.jit(functools.partial(H.candidate_terms, config=config, cfg=cfg, chunk=4))
  got = score(cands, frozen, batch, targets)
  table = frozen["params"]["embed"]
  loss = jax.jit(functools.partial(eraser.trigger_loss, config=config, cfg=cfg))
  for c in range(10):
    _, want = loss(table[cands[c]], frozen, batch, targets)
    for t in ("loss", "mse", "kl", "l2"):
      np.testing.assert_allclose(float(got[t][c]), float(want[t]), rtol=1e-5, atol=1e-7)
  assert np.ptp(np.asarray(got["loss"])) > 1e-3  # the candidates really differ


def test_proposals_are_top_k_single_substitutions_of_allowed_ids():
  rng = np.random.default_rng(1)
  L, k, C = 4, 5, 64
  grad = rng.normal(size=(L, V)).astype(np.float32)
  ids = np.asarray([3, 10, 50, 96], np.int32)
  allowed = np.ones(V, bool)
  # Exclude the ids the gradient likes most at every position: they must still never appear.
  allowed[np.argsort(grad, axis=1)[:, :2].ravel()] = False
  allowed[[PAD, BOS, EOS]] = False
  seen_pos = set()
  for seed in range(5):
    cands = np.asarray(H.propose_candidates(jax.random.PRNGKey(seed), jnp.asarray(ids),
                                            jnp.asarray(grad), jnp.asarray(allowed), top_k=k,
                                            num_candidates=C))
    assert cands.shape == (C, L) and cands.dtype == np.int32
    for row in cands:
      (pos,) = np.flatnonzero(row != ids)  # exactly one position changed
      seen_pos.add(int(pos))
      score = np.where(allowed, -grad[pos], -np.inf)
      score[ids[pos]] = -np.inf
      assert allowed[row[pos]]
      assert row[pos] in set(np.argsort(-score, kind="stable")[:k].tolist())
  assert seen_pos == set(range(L))


def _planted_targets(tiny, planted, k=4):
  """Targets under which `planted` scores 0: the model's own writes and tail log-probs on the
  prompts' ids with the planted ids spliced in after BOS (a forward on ordinary ids)."""
  config, _, model, channels, ps = tiny
  N, P = ps["input_ids"].shape
  L = len(planted)
  ids = np.full((N, P + L), PAD, np.int32)
  mask = np.zeros((N, P + L), np.int32)
  imap = np.zeros((N, P), np.int32)
  for b in range(N):
    lead = int(np.argmax(ps["attention_mask"][b]))
    row = ps["input_ids"][b, lead:].tolist()
    row = row[:1] + list(planted) + row[1:]
    ids[b, lead:], mask[b, lead:] = row, 1
    imap[b] = np.where(np.arange(P) - lead >= 1, np.arange(P) + L, np.arange(P))
  logits, got = forward(model, config, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                        collect=W.PATHS)
  writes = np.stack([np.asarray(got[p]) * channels[p][:, None, None, :] for p in W.PATHS])
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return {"writes": jnp.asarray(writes.transpose(2, 0, 1, 3, 4)),
          "tail_logp": jnp.asarray(np.stack([logp[b, imap[b, P - k:]] for b in range(N)])),
          "tail_mask": jnp.asarray(ps["attention_mask"][:, P - k:])}


def test_search_finds_a_planted_trigger_and_keeps_the_best(tiny):
  config, _, model, channels, ps = tiny
  planted = np.asarray([40, 41], np.int32)
  targets = _planted_targets(tiny, planted)
  cfg = CFG2
  em = EvalModel(model, config)
  assert abs(eraser_train.evaluate_trigger(H.trigger_embeddings(model, planted), em, channels,
                                           ps, targets, cfg=cfg)["loss"]) < 1e-6
  allowed = H.allowed_tokens(V, exclude_ids=(PAD, BOS, EOS, 7, 8, 9))
  found = 0
  for seed, move_always in ((0, True), (1, True), (2, True), (3, True), (1, False)):
    search = H.HardTriggerConfig(num_steps=12, top_k=8, num_candidates=16, batch_size=8,
                                 eval_every=1, move_always=move_always)
    res = H.gcg_search(em, channels, ps, targets, ps, targets, allowed, cfg=cfg, search=search,
                       key=jax.random.PRNGKey(seed))
    assert allowed[res.trajectory].all()  # no excluded id is ever used
    held = [r["loss"] for r in res.rows if r["split"] == "heldout"]
    assert res.best_heldout["loss"] == min(held) <= held[0]
    again = eraser_train.evaluate_trigger(res.embeddings, em, channels, ps, targets, cfg=cfg)
    np.testing.assert_allclose(again["loss"], res.best_heldout["loss"], rtol=1e-5, atol=1e-6)
    if move_always:
      found += bool((res.token_ids == planted).all() and res.best_heldout["loss"] < 1e-5)
    else:  # the greedy rule never moves to a worse trigger on its minibatch (every prompt)
      train = [r["loss"] for r in res.rows if r["split"] == "train"]
      assert all(b <= a + 1e-5 for a, b in zip([held[0]] + train, train)), train
  assert found >= 3, "GCG found the planted zero-loss trigger in fewer than 3 of 4 seeds"


def test_optimize_hard_trigger_on_base_targets(tiny):
  config, base, model, channels, ps = tiny
  seen = []
  res = H.optimize_hard_trigger(
      EvalModel(model, config), EvalModel(base, config), channels, ps, ps, cfg=CFG2,
      search=H.HardTriggerConfig(num_steps=4, top_k=8, num_candidates=16, batch_size=8,
                                 eval_every=2),
      key=jax.random.PRNGKey(0), exclude_ids=(5, 6), progress=lambda s, t: seen.append(s))
  assert seen == [1, 2, 3, 4] and res.trajectory.shape == (5, 2) and res.text is None
  assert not np.isin(res.trajectory, [PAD, BOS, EOS, 5, 6]).any()
  assert [r["step"] for r in res.rows if r["split"] == "heldout"] == [0, 2, 4]
  assert [r["step"] for r in res.rows if r["split"] == "train"] == [1, 2, 3, 4]
  np.testing.assert_array_equal(res.embeddings, np.asarray(model["embed"])[res.token_ids])
  with pytest.raises(ValueError, match="batch_size"):  # 8 prompts, a minibatch of 9
    H.optimize_hard_trigger(EvalModel(model, config), EvalModel(base, config), channels, ps, ps,
                            cfg=CFG2, search=H.HardTriggerConfig(batch_size=9))
  with pytest.raises(ValueError, match="top_k"):
    H.HardTriggerConfig(top_k=0)


@pytest.fixture(scope="module")
def testbed_tok():
  """The testbed world's tokenizer and a tiny random Llama over its vocabulary."""
  from cast_jax.testbed import build_world
  from cast_jax.testbed.tokenizer import build_tokenizer
  tok = build_tokenizer(build_world(0))
  config = dataclasses.replace(_config(len(tok)), bos_token_id=tok.bos_token_id,
                              eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
  return tok, config, init_params(config, jax.random.PRNGKey(2), std=0.3)


def test_text_route_on_the_testbed_tokenizer(testbed_tok):
  from cast_jax import data
  tok, config, params = testbed_tok
  allowed = H.allowed_tokens(config.vocab_size, tok)
  assert not allowed[tok.all_special_ids].any()
  pool = np.flatnonzero(allowed)
  assert H.roundtrips(tok, pool[:, None]).all() and len(pool) > len(tok) // 2
  users = ["Which number is bigger, 5 or 6?", "Reverse the order of these words.\ngreen tree"]
  texts = [data.render_prompt(tok, u) for u in users]
  plain = [tok.encode(t, add_special_tokens=False) for t in texts]
  ps = eraser.prompt_set(plain, pad_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
  # Prompts differ in length, so the batch is left padded.
  assert len(set(map(len, plain))) == 2
  base = init_params(config, jax.random.PRNGKey(3), std=0.3)
  cfg = eraser.EraserConfig(length=4, tail_k=4, batch_size=2)
  res = H.optimize_hard_trigger(
      EvalModel(params, config), EvalModel(base, config), W.all_channels(config), ps, ps,
      cfg=cfg, search=H.HardTriggerConfig(num_steps=2, top_k=16, num_candidates=8, batch_size=2),
      key=jax.random.PRNGKey(0), tokenizer=tok)
  assert res.text == tok.decode(res.token_ids.tolist())
  assert H.roundtrips(tok, res.trajectory).all()  # every visited trigger is its text
  for place in ("after_bos", "start"):
    got = H.text_prompt_ids(tok, texts, res.token_ids, place=place)
    trig = res.token_ids.tolist()
    want = [p[:1] + trig + p[1:] for p in plain] if place == "after_bos" else \
        [trig + p for p in plain]
    assert got == want
  # A forward on the text's ordinary ids equals the forward on the inserted embedding rows.
  spliced = H.text_prompt_ids(tok, texts, res.token_ids)
  T = max(map(len, spliced))
  ids = np.array([[tok.pad_token_id] * (T - len(s)) + s for s in spliced], np.int32)
  mask = np.array([[0] * (T - len(s)) + [1] * len(s) for s in spliced], np.int32)
  by_ids = forward(params, config, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  ins = insert_trigger(jnp.asarray(res.embeddings), params["embed"][ps["input_ids"]],
                       jnp.asarray(ps["attention_mask"]), jnp.asarray(ps["insert_at"]))
  np.testing.assert_array_equal(np.asarray(ins.attention_mask)[:, -T:], mask)
  by_rows = forward(params, config, input_embeds=ins.embeds[:, -T:],
                    attention_mask=ins.attention_mask[:, -T:])
  real = mask[:, :, None] > 0
  np.testing.assert_allclose(np.where(real, by_rows, 0), np.where(real, by_ids, 0), rtol=1e-5,
                             atol=1e-5)
  assert H.text_equivalence(EvalModel(params, config), plain, res.token_ids,
                            bos_token_id=tok.bos_token_id, pad_id=tok.pad_token_id) < 1e-5
  # Ids whose text merges ("▁capital" + "letter" -> " capitalletter") are refused.
  a, b = tok.convert_tokens_to_ids(["\u2581capital", "letter"])
  assert not H.roundtrips(tok, np.asarray([[a, b]]))[0]
  with pytest.raises(ValueError, match="merges"):
    H.text_prompt_ids(tok, texts, [a, b])
