"""The SFT-Eraser loss and its optimisation (carrier_jax.eraser, eraser_train, write_channels):
every loss term against float64 numpy from HF torch hidden states and logits, the cached base
targets against a fresh forward, frozen weights, the PGD ball, held-out selection, the
output-only ablation, C_write from a carrier and from active_channels.json."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from carrier_jax import eraser, eraser_train
from carrier_jax import write_channels as W
from carrier_jax.delta import active_channels, apply_carrier, init_carrier
from cast_jax.eval.runners import EvalModel
from cast_jax.models import load_pretrained
from hf_models import make_hf_model, save_hf

BOS, LT = 1, 3  # BOS id, trigger length


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(HF base, HF sft, config, base params, sft params): two tiny random Llamas."""
  hb, hs = make_hf_model("llama", seed=0), make_hf_model("llama", seed=1)
  config, base = load_pretrained(save_hf(hb, tmp_path_factory.mktemp("base")))
  _, sft = load_pretrained(save_hf(hs, tmp_path_factory.mktemp("sft")))
  return hb, hs, config, base, sft


def _prompts(rng, lengths, vocab=97):
  return [[BOS] + rng.integers(3, vocab, n - 1).tolist() for n in lengths]


def _hf_run(model, **kw):
  """(logits [B, T, V], attn writes [L, B, T, D], mlp writes [L, B, T, D]) as float64 numpy."""
  attn, mlp, hooks = [], [], []
  for layer in model.model.layers:
    hooks.append(layer.self_attn.register_forward_hook(
        lambda m, i, o: attn.append(o[0].detach().numpy())))
    hooks.append(layer.mlp.register_forward_hook(lambda m, i, o: mlp.append(o.detach().numpy())))
  try:
    with torch.no_grad():
      logits = model(**{k: torch.tensor(v) for k, v in kw.items()}).logits.numpy()
  finally:
    for h in hooks:
      h.remove()
  return logits.astype(np.float64), np.stack(attn).astype(np.float64), np.stack(mlp)


def _log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference_terms(hb, hs, ids, mask, trig, channels, align, k, table):
  """Eqs. 6-8 in float64 numpy from HF: base on ids, SFT on [BOS; trigger; rest] embeddings."""
  B, P = ids.shape
  emb = np.zeros((B, P + LT, table.shape[1]), np.float32)
  new_mask = np.zeros((B, P + LT), np.int64)
  idx = np.zeros((B, P), np.int64)
  for b in range(B):
    lead = int(np.argmax(mask[b]))
    emb[b, :lead + 1] = table[ids[b, :lead + 1]]
    emb[b, lead + 1:lead + 1 + LT] = trig
    emb[b, lead + 1 + LT:] = table[ids[b, lead + 1:]]
    new_mask[b, lead:] = 1
    idx[b] = np.where(np.arange(P) > lead, np.arange(P) + LT, np.arange(P))
  pos = np.maximum(np.cumsum(new_mask, 1) - 1, 0)
  q_logits, q_attn, q_mlp = _hf_run(hs, inputs_embeds=emb, attention_mask=new_mask,
                                    position_ids=pos)
  p_logits, p_attn, p_mlp = _hf_run(hb, input_ids=ids.astype(np.int64),
                                    attention_mask=mask.astype(np.int64),
                                    position_ids=np.maximum(np.cumsum(mask, 1) - 1, 0))
  num = den = 0.0
  for q_w, p_w, ch in ((q_attn, p_attn, channels["attn_write"]),
                       (q_mlp, p_mlp, channels["mlp_write"])):
    for b in range(B):
      real = np.flatnonzero(mask[b])
      q_rows = q_w[:, b, idx[b, real]]  # [L, n, D] the SFT writes at the original tokens
      p_rows = p_w[:, b, real]
      if align == "mean":
        q_rows, p_rows = q_rows.mean(1, keepdims=True), p_rows.mean(1, keepdims=True)
      elif align == "last":
        q_rows, p_rows = q_rows[:, -1:], p_rows[:, -1:]
      sel = np.broadcast_to(ch[:, None, :], q_rows.shape)
      num += (sel * (q_rows - p_rows) ** 2).sum()
      den += sel.sum()
  kl_sum = kl_n = 0.0
  for b in range(B):
    for j in range(P - k, P):
      if mask[b, j]:
        lp, lq = _log_softmax(p_logits[b, j]), _log_softmax(q_logits[b, idx[b, j]])
        kl_sum += (np.exp(lp) * (lp - lq)).sum()
        kl_n += 1
  l2 = (trig.astype(np.float64) ** 2).sum(-1).mean()
  return {"mse": num / den, "kl": kl_sum / kl_n, "l2": l2}


@pytest.mark.parametrize("align", ["prompt", "mean", "last"])
def test_loss_terms_match_hf_numpy(pair, align):
  hb, hs, config, base, sft = pair
  rng = np.random.default_rng(0)
  prompts = eraser.prompt_set(_prompts(rng, [8, 5, 3]), pad_id=0, bos_token_id=BOS)
  L, D = config.num_layers, config.hidden_size
  channels = {p: (rng.random((L, D)) < 0.4).astype(np.float32) for p in W.PATHS}
  trig = rng.normal(0, 0.3, (LT, D)).astype(np.float32)
  cfg = eraser.EraserConfig(length=LT, tail_k=6, align=align, batch_size=2)
  targets = eraser.base_targets(EvalModel(base, config), prompts, channels, cfg=cfg)
  frozen = eraser.frozen_arrays(EvalModel(sft, config), channels)
  batch = jax.tree.map(jnp.asarray, prompts)
  loss, terms = eraser.trigger_loss(jnp.asarray(trig), frozen, batch, targets, config=config,
                                    cfg=cfg)
  ref = _reference_terms(hb, hs, prompts["input_ids"], prompts["attention_mask"], trig, channels,
                         align, 6, np.asarray(sft["embed"]))
  for t in ("mse", "kl", "l2"):
    np.testing.assert_allclose(float(terms[t]), ref[t], rtol=2e-4, atol=1e-7)
  assert ref["kl"] > 1e-2 and ref["mse"] > 1e-3  # non-trivial values were compared
  np.testing.assert_allclose(float(loss), ref["mse"] + 0.7 * ref["kl"] + 0.1 * ref["l2"],
                             rtol=2e-4)

  # Output-only ablation: no MSE term, the same KL and L2.
  cfg_out = eraser.EraserConfig(length=LT, tail_k=6, align=align, use_mse=False, batch_size=2)
  targets_out = eraser.base_targets(EvalModel(base, config), prompts, channels, cfg=cfg_out)
  _, out = eraser.trigger_loss(jnp.asarray(trig), frozen, batch, targets_out, config=config,
                               cfg=cfg_out)
  assert float(out["mse"]) == 0.0
  np.testing.assert_allclose(float(out["kl"]), ref["kl"], rtol=2e-4)


def test_cached_targets_equal_fresh_forward(pair):
  _, _, config, base, _ = pair
  rng = np.random.default_rng(1)
  prompts = eraser.prompt_set(_prompts(rng, [4, 9, 2, 6, 7]), pad_id=0, bos_token_id=BOS)
  channels = W.all_channels(config)
  cfg = eraser.EraserConfig(tail_k=4, length=LT)
  cached = eraser.base_targets(EvalModel(base, config), prompts, channels, cfg=cfg,
                               batch_size=2)  # chunks of 2, the last one padded
  ids, mask = (jnp.asarray(prompts[k]) for k in ("input_ids", "attention_mask"))
  logits, writes = W.write_activations(base, config, base["embed"][ids], mask, channels)
  fresh = np.asarray(jnp.stack([writes[p] for p in W.PATHS]).transpose(2, 0, 1, 3, 4))
  # Stored in the triggered layout: token j of row b at j (before the trigger) or j + LT.
  want = np.zeros(fresh.shape[:3] + (fresh.shape[3] + LT,) + fresh.shape[4:], np.float32)
  for b in range(fresh.shape[0]):
    lead = int(np.argmax(prompts["attention_mask"][b]))
    for j in range(fresh.shape[3]):
      new = j + LT if j - lead >= prompts["insert_at"][b] else j
      want[b, :, :, new] = fresh[b, :, :, j]
  np.testing.assert_allclose(cached["writes"], want, atol=1e-5)
  np.testing.assert_allclose(cached["tail_logp"], jax.nn.log_softmax(logits[:, -4:]), atol=1e-5)
  np.testing.assert_array_equal(cached["tail_mask"], prompts["attention_mask"][:, -4:])


def test_optimisation_moves_only_the_trigger_inside_the_ball(pair, tmp_path):
  _, _, config, base, sft = pair
  carrier = init_carrier(config, base, sft, jax.random.PRNGKey(0))
  channels = W.carrier_channels(carrier)
  model = EvalModel(base, config, adapter_fn=apply_carrier, adapter_params=carrier)
  before = jax.tree.map(np.array, (base, carrier))
  rng = np.random.default_rng(2)
  ids = _prompts(rng, rng.integers(2, 9, 14))
  train = eraser.prompt_set(ids[:10], pad_id=0, bos_token_id=BOS)
  held = eraser.prompt_set(ids[10:], pad_id=0, bos_token_id=BOS)
  cfg = eraser.EraserConfig(length=LT, batch_size=4, num_steps=12, eval_every=4, log_every=2,
                            lr=0.2, radius=0.5)
  res = eraser_train.optimize_trigger(model, EvalModel(base, config), channels, train, held,
                                      cfg=cfg, key=jax.random.PRNGKey(3))
  after = jax.tree.map(np.array, (base, carrier))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after)))
  for t in (res.trigger, res.last_trigger):
    np.testing.assert_array_less(np.linalg.norm(t, axis=-1), 0.5 * (1 + 1e-5))
  assert np.linalg.norm(res.last_trigger, axis=-1).max() > 0.49  # the projection was active
  held_rows = [r for r in res.rows if r["split"] == "heldout"]
  assert [r["step"] for r in held_rows] == [0, 4, 8, 12]
  best = min(held_rows, key=lambda r: r["loss"])
  assert res.best_step == best["step"] and res.best_heldout["loss"] == best["loss"]
  targets = eraser.base_targets(EvalModel(base, config), held, channels, cfg=cfg)
  again = eraser_train.evaluate_trigger(res.trigger, model, channels, held, targets, cfg=cfg)
  np.testing.assert_allclose(again["loss"], best["loss"], rtol=1e-5)
  assert best["loss"] < held_rows[0]["loss"]
  assert [r["step"] for r in res.rows if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
  png = eraser_train.plot_curves(res.rows, tmp_path / "curves.png")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_channels_from_carrier_and_json(pair, tmp_path):
  _, _, config, base, sft = pair
  carrier = init_carrier(config, base, sft, jax.random.PRNGKey(4))
  ch = W.carrier_channels(carrier)
  np.testing.assert_array_equal(ch["attn_write"], np.asarray(carrier["gates"]["attn_write"]) > 0)
  np.testing.assert_array_equal(ch["mlp_write"], np.asarray(carrier["gates"]["ffn_write"]) > 0)
  path = tmp_path / "active_channels.json"
  path.write_text(json.dumps(active_channels(carrier)))
  back = W.channels_from_json(path, config)
  for p in W.PATHS:
    np.testing.assert_array_equal(back[p], ch[p])
  assert W.channel_counts(ch)["attn_write"] == ch["attn_write"].sum(1).astype(int).tolist()
