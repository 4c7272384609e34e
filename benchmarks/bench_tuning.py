"""CAST sparse-tuning step speed on the testbed model, measured in one run.

  python benchmarks/bench_tuning.py [--batch=8 --seq=96 --rank=32 --steps=12 --seam_d=1024
                                     --seam_tokens=512]

1. Train-step tokens/s on the testbed base model (hidden 128, 4 layers, 8 / 4 heads), one
   jitted `make_train_step` each, the same D_align batches (testbed wildjailbreak chats, right
   padded to --seq), AdamW lr 1e-4 + clip 1.0, interleaved (a, b, c, d, a, b, ...), median
   over steady-state steps:
     full LoRA        r=--rank on every head's W_q (the reference, ratio 1)
     head LoRA        the same on 25% of the heads (bucket 1 of a random conflict map)
     PCGrad LoRA      head LoRA + one-sided PCGrad: a second forward / backward on a D_util
                      batch (testbed MMLU calibration chats) of the same shape; tokens/s
                      counts the D_align tokens only
     full SFT         every parameter trainable (the substrate's full fine-tune)
   tokens = batch x seq. First-step losses of all LoRA variants must agree (B = 0 at init).
2. The seam: one layer's q projection with LoRA, forward + backward for d(A, B, x), weight-side
   (x @ (W + s A @ (B * m)), the seam this library used before) vs activation-side
   (x @ W + s (x @ A) @ (B * m), the decoder's `_project`, what `tuning.lora` uses now), at the
   testbed shape and at --seam_d (a 7B-like D = H*Dh scaled to this CPU): the saving per q
   projection; the rest of the step (attention, MLP, the other projections) is unchanged.
"""

import argparse
import time

import numpy as np

from timing import interleaved


def bench_steps(args):
  import jax
  import jax.numpy as jnp

  from cast_jax import testbed
  from cast_jax.data import batching
  from cast_jax.testbed import build
  from cast_jax.train import (OptimizerConfig, TrainState, build_optimizer, make_sft_loss_fn,
                              make_train_step, partition)
  from cast_jax.train.state import weight_decay_mask
  from cast_jax.tuning import (LoraConfig, all_heads_mask, bucket_mask, init_lora, lora_frozen,
                               make_lora_train_step)

  tb = build.build_testbed(progress=False)
  config, params, tok = tb.config, tb.base_params, tb.tokenizer
  L, H = config.num_layers, config.num_heads
  n_batches = 4
  pad = tok.pad_token_id

  def batches(pairs):
    ex = batching.encode_dataset(tok, pairs[:n_batches * args.batch], max_len=args.seq)
    return [jax.tree.map(jnp.asarray, batching.collate_train(
        ex[i:i + args.batch], pad_id=pad, buckets=(args.seq,)))
        for i in range(0, n_batches * args.batch, args.batch)]

  align = batches(build.align_pairs(tb.world))
  util_recs = tb.world.files["calib/d_util.jsonl"]
  util = batches([(testbed.record_prompt("calib/d_util.jsonl", r),
                   testbed.record_response("calib/d_util.jsonl", r)) for r in util_recs])
  lcfg = LoraConfig(rank=args.rank, alpha=float(args.rank))
  opt = OptimizerConfig(learning_rate=1e-4, schedule="constant", grad_clip_norm=1.0)
  head_mask = bucket_mask(np.random.RandomState(0).rand(L, H), 4, 1)

  def lora_runner(mask, pcgrad):
    tx, _ = build_optimizer(opt, weight_decay_mask={"a": True, "b": True})
    state = TrainState.create(init_lora(config, jax.random.PRNGKey(21), lcfg), tx,
                              jax.random.PRNGKey(0))
    frozen = lora_frozen(params, mask, config)
    return _runner(make_lora_train_step(config, tx, lcfg, pcgrad=pcgrad), state, frozen,
                   (lambda i: {"align": align[i], "util": util[i]}) if pcgrad else
                   (lambda i: align[i]))

  def full_sft_runner():
    trainable, frozen = partition(jax.tree.map(jnp.copy, params), True)
    tx, _ = build_optimizer(opt, weight_decay_mask=weight_decay_mask(trainable))
    state = TrainState.create(trainable, tx, jax.random.PRNGKey(0))
    return _runner(make_train_step(make_sft_loss_fn(config), tx), state, frozen,
                   lambda i: align[i])

  def _runner(step, state, frozen, batch_at):
    losses = []

    def run():
      nonlocal state
      state, metrics = step(state, frozen, batch_at(len(losses) % n_batches))
      jax.block_until_ready(state)
      losses.append(float(metrics["loss"]))
    return run, losses

  names = ["full LoRA (all heads)", "head LoRA (25% heads)", "PCGrad head LoRA (one-sided)",
           "full-parameter SFT"]
  runners = [lora_runner(all_heads_mask((L, H)), None), lora_runner(head_mask, None),
             lora_runner(head_mask, "one_sided"), full_sft_runner()]
  t0 = time.perf_counter()
  medians, _ = interleaved([r for r, _ in runners], args.steps, warmup=2)
  first = [losses[0] for _, losses in runners[:3]]
  if max(first) - min(first) > 1e-5:
    raise SystemExit(f"CROSS-CHECK FAILED: first-step LoRA losses differ: {first}")
  ntok = args.batch * args.seq
  print(f"\n[steps] testbed model, batch {args.batch} x seq {args.seq}, r={args.rank}, "
        f"{int(head_mask.sum())}/{L * H} heads in the head set; median of {args.steps} "
        f"interleaved steps after 2 warm-up ({time.perf_counter() - t0:.0f} s in all); "
        f"backend {jax.default_backend()}")
  print(f"{'step':32s} {'s/step':>8s} {'tokens/s':>10s} {'vs full LoRA':>13s}")
  for name, t in zip(names, medians):
    print(f"{name:32s} {t:8.4f} {ntok / t:10.0f} {medians[0] / t:12.2f}x")
  print(f"first-step loss (all LoRA variants) {first[0]:.5f}; full SFT {runners[3][1][0]:.5f}")
  return medians


def bench_seam(args):
  import jax
  import jax.numpy as jnp

  def make(n_tok, d, hd, r):
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    x = jax.random.normal(k[0], (n_tok, d))
    w = jax.random.normal(k[1], (d, hd)) / np.sqrt(d)
    a = jax.random.normal(k[2], (d, r)) / np.sqrt(d)
    b = jax.random.normal(k[3], (r, hd)) * 0.01
    m = (jax.random.uniform(k[4], (hd,)) > 0.75).astype(jnp.float32)
    g = jax.random.normal(k[5], (n_tok, hd))
    return x, w, a, b, m, g

  @jax.jit
  def weight_side(x, w, a, b, m, g):
    f = lambda x, a, b: jnp.sum(jnp.dot(x, w + jnp.dot(a, b * m)) * g)
    return jax.grad(f, argnums=(0, 1, 2))(x, a, b)

  @jax.jit
  def activation_side(x, w, a, b, m, g):
    f = lambda x, a, b: jnp.sum((jnp.dot(x, w) + jnp.dot(jnp.dot(x, a), b * m)) * g)
    return jax.grad(f, argnums=(0, 1, 2))(x, a, b)

  print("\n[seam] one q projection + LoRA, forward + backward for (x, A, B), r="
        f"{args.rank}; 25% of the head columns unmasked")
  print(f"{'shape':34s} {'weight-side s':>14s} {'activation-side s':>18s} {'saving':>7s}")
  for n_tok, d in ((args.batch * args.seq, 128), (args.seam_tokens, args.seam_d)):
    xs = make(n_tok, d, d, args.rank)
    a = weight_side(*xs)
    b = activation_side(*xs)
    for u, v in zip(a, b):
      scale = float(jnp.abs(v).max())
      if not float(jnp.abs(u - v).max()) <= 1e-3 * scale:
        raise SystemExit("CROSS-CHECK FAILED: the two seams give different gradients")
    fns = [lambda: jax.block_until_ready(weight_side(*xs)),
           lambda: jax.block_until_ready(activation_side(*xs))]
    (tw, ta), _ = interleaved(fns, args.steps, warmup=1)
    print(f"tokens {n_tok:5d}, D = H*Dh = {d:5d}          {tw:14.5f} {ta:18.5f} {tw / ta:6.2f}x")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=96)
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--seam_d", type=int, default=1024)
  p.add_argument("--seam_tokens", type=int, default=512)
  args = p.parse_args()
  bench_steps(args)
  bench_seam(args)


if __name__ == "__main__":
  main()
