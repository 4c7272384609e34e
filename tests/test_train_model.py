"""SFT on a tiny random decoder: masked full fine-tune, LoRA-style adapter, bf16, HF export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cast_jax import models
from cast_jax.train import (OptimizerConfig, TrainState, build_optimizer, cast_floating,
                            check_sft_batch, export_hf, indexed_batches, make_sft_loss_fn,
                            make_train_step, merge, partition, train, tree_equal)

CONFIG = models.ModelConfig(model_type="llama", vocab_size=48, hidden_size=32,
                            intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, max_position_embeddings=64)
MASK = {"embed": False, "final_norm": False, "lm_head": False,
        "layers": {k: k not in ("attn_norm", "mlp_norm") for k in
                   models.param_shapes(CONFIG)["layers"]}}


def sft_batch(step, B=4, P=5, T=12):
  """Random prompt of P tokens, then the fixed response 5 6 7 8 (the "fixed response" task),
  right padded."""
  rng = np.random.default_rng([11, step])
  ids = np.zeros((B, T), np.int32)
  ids[:, :P] = rng.integers(9, CONFIG.vocab_size, size=(B, P))
  ids[:, P:P + 4] = [5, 6, 7, 8]
  attn = np.zeros((B, T), np.int32)
  attn[:, :P + 4] = 1
  loss_mask = np.zeros((B, T), np.int32)
  loss_mask[:, P:P + 4] = 1
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def test_masked_finetune_lowers_loss_and_keeps_frozen_bitwise(tmp_path):
  params = models.init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)
  snapshot = jax.tree.map(np.array, params)
  trainable, frozen = partition(params, MASK)
  assert "lm_head" in frozen and "wq" in trainable["layers"] and "attn_norm" in frozen["layers"]
  tx, lr_fn = build_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"))
  loss_fn = make_sft_loss_fn(CONFIG)
  state = TrainState.create(trainable, tx, jax.random.PRNGKey(1))
  state, summary = train(make_train_step(loss_fn, tx), state, frozen, indexed_batches(sft_batch),
                         num_steps=30, workdir=str(tmp_path / "run"), log_every=1,
                         checkpoint_every=15, progress=False, lr_fn=lr_fn,
                         check_batch=check_sft_batch)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == 30 and losses[-1] < 0.3 * losses[0], losses
  assert summary["tokens"] == 30 * 4 * 9
  merged = merge(state.trainable, frozen)
  for path in (("embed",), ("lm_head",), ("final_norm",), ("layers", "attn_norm"),
               ("layers", "mlp_norm")):
    got, ref = merged, snapshot
    for k in path:
      got, ref = got[k], ref[k]
    assert np.asarray(got).tobytes() == ref.tobytes(), path
  assert not np.array_equal(np.asarray(merged["layers"]["wq"]), snapshot["layers"]["wq"])

  out = export_hf(merged, CONFIG, str(tmp_path / "hf"))
  _, loaded = models.load_pretrained(out)
  assert tree_equal(loaded, merged)
  with pytest.raises(FileExistsError):
    export_hf(merged, CONFIG, out)
  nan_params = dict(merged, final_norm=merged["final_norm"] * jnp.nan)
  with pytest.raises(FloatingPointError, match="final_norm"):
    export_hf(nan_params, CONFIG, str(tmp_path / "hf_nan"))
  assert not (tmp_path / "hf_nan").exists()


def test_adapter_mode_trains_only_adapter():
  params = models.init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)
  snapshot = jax.tree.map(np.array, params)
  L, D, F, r = CONFIG.num_layers, CONFIG.hidden_size, CONFIG.intermediate_size, 4
  lora = {"a": 0.1 * jax.random.normal(jax.random.PRNGKey(2), (L, D, r)),
          "b": jnp.zeros((L, r, F))}

  def adapter_fn(lp, ap):
    return dict(lp, w_up=lp["w_up"] + ap["a"] @ ap["b"])

  loss_fn = make_sft_loss_fn(CONFIG, adapter_fn=adapter_fn)
  tx, _ = build_optimizer(OptimizerConfig(learning_rate=5e-2, schedule="constant"))
  step = make_train_step(loss_fn, tx)
  state = TrainState.create(lora, tx, jax.random.PRNGKey(1))
  losses = []
  for i in range(25):
    state, m = step(state, params, sft_batch(i))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.6 * losses[0], losses
  assert tree_equal(params, snapshot)


def test_bf16_compute_on_decoder():
  params = models.init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)
  trainable, frozen = partition(params, MASK)
  frozen = cast_floating(frozen, jnp.bfloat16)
  tx, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"))
  step = make_train_step(make_sft_loss_fn(CONFIG), tx, compute_dtype=jnp.bfloat16)
  state = TrainState.create(trainable, tx, jax.random.PRNGKey(1))
  losses = []
  for i in range(20):
    state, m = step(state, frozen, sft_batch(i))
    losses.append(float(m["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < 0.3 * losses[0], losses
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.trainable))
