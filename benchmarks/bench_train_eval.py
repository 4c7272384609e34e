"""Full fine-tuning step and eval scorer throughput against PyTorch / HF, measured in one run.

  python benchmarks/bench_train_eval.py [--hidden=256 --layers=4 --batch=8 --seq=128
                                         --prompts=64 --new=32 --steps=8]

1. Train step tokens/s: `cast_jax.train` (make_sft_loss_fn + build_optimizer + make_train_step,
   jitted, all params trainable) vs. the same step written plainly in PyTorch (LlamaForCausalLM
   from the same weights, torch AdamW with the same hyperparameters, global-norm clipping,
   response-only loss via labels=-100). Same batches (testbed gsm8k chats, right padded to
   --seq). Median over steady-state steps; first-step losses printed as an apples-to-apples check.
2. Scorer prompts/s on --prompts testbed prompts (word-level testbed tokenizer): MCQ next-token
   scoring (`score_mcq`) vs. one batched HF forward restricted to the letter ids, and greedy
   generation scoring (`score_reasoning_generation`, --new tokens, EOS off on both sides so both
   generate exactly --new tokens) vs. `hf.generate(do_sample=False)` with left padding. Both sides
   include tokenisation and decoding. Ratios are ours / reference (> 1: ours faster).

Torch runs at its default intra-op thread count and at 1 thread (--torch_threads overrides):
on a loaded machine its OpenMP pool can be several times slower with 2 threads than with 1, so
the faster of the two is the reference (the conservative ratio); both are printed.
"""

import argparse
import copy
import os
import tempfile
import time

import numpy as np


def _interleaved(fns, repeats, warmup):
  """Median seconds per call of each fn, plus each fn's first-call seconds.

  Calls alternate between the fns (a, b, a, b, ...) so that background load on a shared machine
  hits both sides alike instead of whichever happened to run second. The first `warmup` calls of
  each fn (jit compile, allocator warm-up) are not timed as steady state.
  """
  times = [[] for _ in fns]
  for _ in range(warmup + repeats):
    for k, fn in enumerate(fns):
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  return [float(np.median(t[warmup:])) for t in times], [t[0] for t in times]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv_heads", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--steps", type=int, default=8, help="timed train steps per side")
  ap.add_argument("--prompts", type=int, default=64)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3, help="timed scorer calls per side")
  ap.add_argument("--torch_threads", type=int, nargs="*", default=None,
                  help="torch thread counts to time (default: torch's default and 1)")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from cast_jax import testbed
  from cast_jax.data import batching, chat
  from cast_jax.eval import runners, score_reasoning
  from cast_jax.models import load_pretrained
  from cast_jax.testbed.tokenizer import SPACE
  from cast_jax.train import (OptimizerConfig, TrainState, build_optimizer, make_sft_loss_fn,
                              make_train_step, mask_from_fn, partition)

  transformers.utils.logging.disable_progress_bar()  # keep the printed report clean
  world = testbed.build_world(0)
  tok = testbed.build_tokenizer(world, model_max_length=1024)
  if len(tok) > args.vocab:
    raise SystemExit(f"--vocab must be >= the testbed tokenizer's {len(tok)} tokens")
  hf_cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ckpt")
    hf.save_pretrained(path)
    config, params = load_pretrained(path)
  device = jax.devices()[0]
  threads = args.torch_threads or sorted({torch.get_num_threads(), 1}, reverse=True)
  print(f"device: {device.platform} ({device.device_kind}); torch threads timed {threads}; "
        f"jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
  print(f"model: llama hidden={args.hidden} layers={args.layers} heads={args.heads}/"
        f"{args.kv_heads} vocab={args.vocab}")

  # ---- 1. full fine-tuning train step ------------------------------------------------------
  recs = world.files["gsm8k/train.jsonl"]
  n_batches = 4  # cycle a few distinct batches so no side benefits from identical inputs
  examples = [chat.encode_example(tok, testbed.record_prompt("gsm8k/train.jsonl", r),
                                  testbed.record_response("gsm8k/train.jsonl", r), args.seq)
              for r in recs[:n_batches * args.batch]]
  np_batches = [batching.collate_train(examples[i:i + args.batch], pad_id=tok.pad_token_id,
                                       buckets=(args.seq,))
                for i in range(0, len(examples), args.batch)]
  ntok = args.batch * args.seq
  opt = OptimizerConfig(learning_rate=1e-4, schedule="constant", weight_decay=0.01, b1=0.9,
                        b2=0.999, eps=1e-8, grad_clip_norm=1.0)

  tx, _ = build_optimizer(opt)
  # Copies, because the step donates the state's buffers and `params` is reused for eval below.
  trainable, frozen = partition(jax.tree.map(jnp.copy, params),
                                mask_from_fn(params, lambda _path, _leaf: True))
  state = TrainState.create(trainable, tx, jax.random.PRNGKey(0))
  step = make_train_step(make_sft_loss_fn(config), tx)
  jbatches = [jax.tree.map(jnp.asarray, b) for b in np_batches]
  ours_losses = []

  def ours_step():
    nonlocal state
    state, metrics = step(state, frozen, jbatches[len(ours_losses) % n_batches])
    jax.block_until_ready(state)  # the whole update, not just the loss
    ours_losses.append(float(metrics["loss"]))

  tbatches = [dict(input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
                   attention_mask=torch.tensor(b["attention_mask"], dtype=torch.long),
                   labels=torch.tensor(np.where(b["loss_mask"] == 1, b["input_ids"], -100),
                                       dtype=torch.long)) for b in np_batches]

  def make_torch_step(n_threads, losses):
    # Own model + optimizer per thread count, so each follows the same trajectory as ours.
    model = copy.deepcopy(hf).train()  # Llama has no dropout: train() changes nothing numeric
    adamw = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                              eps=opt.eps, weight_decay=opt.weight_decay)

    def torch_step():
      torch.set_num_threads(n_threads)
      adamw.zero_grad(set_to_none=True)
      loss = model(**tbatches[len(losses) % n_batches]).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
      adamw.step()
      losses.append(float(loss.detach()))
    return torch_step

  torch_losses = [[] for _ in threads]
  warm = 2  # step 0 compiles (jax) / warms the allocator (torch); step 1 settles
  medians, firsts = _interleaved(
      [ours_step] + [make_torch_step(n, l) for n, l in zip(threads, torch_losses)],
      args.steps, warm)
  t_ours, best = medians[0], int(np.argmin(medians[1:]))
  t_torch, torch_losses = medians[1 + best], torch_losses[best]
  others = ", ".join(f"{ntok / t:.0f} tok/s at {n} thread(s)"
                     for n, t in zip(threads, medians[1:]))
  print(f"\n[train] full fine-tune, batch={args.batch} x seq={args.seq}, AdamW + clip 1.0, "
        f"median of {args.steps} interleaved steps after {warm} warm-up (first step: ours "
        f"{firsts[0]:.1f} s incl. compile, torch {firsts[1]:.2f} s); tok = batch x seq")
  print(f"train step  ours {ntok / t_ours:9.0f} tok/s   torch {ntok / t_torch:9.0f} tok/s   "
        f"ratio ours/torch = {t_torch / t_ours:.2f}   (torch: {others})")
  last = len(ours_losses) - 1
  print(f"loss step 0 ours {ours_losses[0]:.6f} torch {torch_losses[0]:.6f} "
        f"|diff| {abs(ours_losses[0] - torch_losses[0]):.1e}; step {last} ours "
        f"{ours_losses[last]:.6f} torch {torch_losses[last]:.6f} "
        f"|diff| {abs(ours_losses[last] - torch_losses[last]):.1e}")
  del state

  # ---- 2. scorers ----------------------------------------------------------------------------
  model = runners.EvalModel(params, config)
  bs = args.prompts  # one chunk per side, so both run the whole set as one batch
  mmlu = [r for r in world.files["mmlu/test.jsonl"] if len(r["choices"]) == 4][:args.prompts]
  mcq_prompts = [chat.render_prompt(tok, testbed.record_prompt("mmlu/test.jsonl", r))
                 for r in mmlu]
  answers = [r["answer"] for r in mmlu]
  gsm = world.files["gsm8k/test.jsonl"][:args.prompts]
  gen_prompts = [chat.render_prompt(tok, testbed.record_prompt("gsm8k/test.jsonl", r))
                 for r in gsm]
  refs = [r["answer"].split("####")[-1].strip() for r in gsm]
  # Letter ids after "<|assistant|>" are the space-prefixed letters (what score_mcq resolves).
  letter_ids = torch.tensor(tok.convert_tokens_to_ids([SPACE + c for c in "ABCD"]))
  tok.padding_side = "left"

  mcq_out = {}

  def ours_mcq():
    mcq_out["ours"] = runners.score_mcq(model, tok, mcq_prompts, answers, choices="ABCD",
                                        batch_size=bs)

  def hf_mcq():
    enc = tok(mcq_prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.inference_mode():
      logits = hf(**enc).logits[:, -1, letter_ids]
    mcq_out["hf"] = logits.argmax(-1).numpy()

  gen_out = {}

  def ours_gen():
    gen_out["ours"], _ = runners.score_reasoning_generation(
        model, tok, gen_prompts, refs, max_new_tokens=args.new, batch_size=bs, eos_token_ids=())

  def hf_gen():
    enc = tok(gen_prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.inference_mode():
      out = hf.generate(**enc, max_new_tokens=args.new, min_new_tokens=args.new,
                        do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    score_reasoning(texts, refs)
    gen_out["hf"] = texts

  def compare(name, ours_fn, hf_fn, check):
    def at(n):  # the thread count is set per call because the fns are interleaved
      def fn():
        torch.set_num_threads(n)
        hf_fn()
      return fn
    medians, _ = _interleaved([ours_fn] + [at(n) for n in threads], args.repeats, 1)
    t_ours, t_hf = medians[0], min(medians[1:])
    others = ", ".join(f"{n_p / t:.1f} at {n} thread(s)" for n, t in zip(threads, medians[1:]))
    print(f"{name:18s} ours {n_p / t_ours:7.1f} prompts/s   HF {n_p / t_hf:7.1f} prompts/s   "
          f"ratio ours/HF = {t_hf / t_ours:.2f}   ({check()}; HF: {others})")

  from absl import logging
  logging.set_verbosity(logging.ERROR)  # the "no EOS ids" warning is intended here
  n_p = args.prompts
  print(f"\n[eval] {n_p} prompts in one batch, median of {args.repeats} interleaved calls after "
        "a warm-up call")
  compare("mcq (score_mcq)", ours_mcq, hf_mcq, lambda: (
      f"argmax agreement {np.mean(mcq_out['ours'].predictions == mcq_out['hf']):.3f}, letter ids "
      f"same: {bool((mcq_out['ours'].choice_token_ids == letter_ids.numpy()).all())}"))
  compare(f"generate ({args.new} new)", ours_gen, hf_gen, lambda: (
      "identical texts "
      f"{np.mean([a == b for a, b in zip(gen_out['ours'], gen_out['hf'])]):.3f}"))


if __name__ == "__main__":
  main()
