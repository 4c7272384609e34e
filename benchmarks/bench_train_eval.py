"""Train step, training loop and eval scorer speed against PyTorch / HF, measured in one run.

  python benchmarks/bench_train_eval.py [--hidden=256 --layers=4 --batch=8 --seq=128
                                         --prompts=64 --new=32 --steps=8 --testbed_steps=30]

1. Train step tokens/s: `cast_jax.train` (make_sft_loss_fn + build_optimizer + make_train_step,
   jitted, all params trainable) vs. the same step written plainly in PyTorch (LlamaForCausalLM
   from the same weights, torch AdamW with the same hyperparameters, global-norm clipping,
   response-only loss via labels=-100). Same batches (testbed gsm8k chats, right padded to
   --seq). Median over steady-state steps; the first-step losses must agree.
2. Testbed pretraining (the `TestbedSpec` model: hidden 128, 4 layers, 8/4 heads, ffn 384, tied
   embeddings, batch 32, buckets (64, 96), per-sequence loss): `run_sft` s/step in steady state
   (from its metrics.jsonl, compile excluded) vs. the bare jitted step on the same batches, and
   `train()` vs. that bare step with the same compiled step, interleaved in chunks.
3. Scorer prompts/s on --prompts testbed prompts (word-level testbed tokenizer): MCQ next-token
   scoring (`score_mcq`) vs. one batched HF forward restricted to the letter ids, and greedy
   generation scoring (`score_reasoning_generation`, --new tokens, EOS off on both sides so both
   generate exactly --new tokens) vs. `hf.generate(do_sample=False)` with left padding. Both sides
   include tokenisation and decoding. Ratios are ours / reference (> 1: ours faster). The HF
   side picks each prompt's letter tokens itself from the library's rule (no space before the
   letter after whitespace or a special / added token such as "<|assistant|>").

A failed cross-check (first-step loss, letter ids, argmax agreement, generated texts) exits
non-zero with a message instead of printing a ratio. Torch runs at its default intra-op thread
count and at 1 thread (--torch_threads overrides): on a loaded machine its OpenMP pool can be
several times slower with 2 threads than with 1, so the faster of the two is the reference (the
conservative ratio); both are printed.
"""

import argparse
import copy
import json
import os
import tempfile
import time

import numpy as np

from timing import interleaved, torch_at

# Issue 8's measurements on the 2-core CI machine, before the speed work (printed for contrast).
BEFORE = {"testbed_s_per_step": 0.5, "train_vs_torch": 0.49, "mcq_vs_hf": 0.60,
          "generate_vs_hf": 0.56}
TARGETS = {"train_vs_torch": 0.75, "loop_vs_bare": 1.15, "testbed_speedup": 2.5}
LOSS_TOL, MCQ_AGREEMENT, TEXT_AGREEMENT = 1e-4, 0.99, 0.95


def _fail(check: str, detail: str):
  raise SystemExit(f"\n!!! CROSS-CHECK FAILED: {check}: {detail}\n!!! The timings are not "
                   "comparable; no ratio is reported.")


def bench_train_step(args, hf, config, params, tok, world, threads):
  """Section 1; returns ours/torch (time ratio, > 1: ours faster)."""
  import jax
  import jax.numpy as jnp
  import torch

  from cast_jax import testbed
  from cast_jax.data import batching, chat
  from cast_jax.train import (OptimizerConfig, TrainState, build_optimizer, make_sft_loss_fn,
                              make_train_step, partition)

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
  # A copy, because the step donates the state's buffers and `params` is reused for eval.
  trainable, frozen = partition(jax.tree.map(jnp.copy, params), True)
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
  medians, firsts = interleaved(
      [ours_step] + [make_torch_step(n, l) for n, l in zip(threads, torch_losses)],
      args.steps, warm)
  t_ours, best = medians[0], int(np.argmin(medians[1:]))
  t_torch, torch_losses = medians[1 + best], torch_losses[best]
  diff0 = abs(ours_losses[0] - torch_losses[0])
  last = len(ours_losses) - 1
  print(f"\n[train] full fine-tune, batch={args.batch} x seq={args.seq}, AdamW + clip 1.0, "
        f"median of {args.steps} interleaved steps after {warm} warm-up (first step: ours "
        f"{firsts[0]:.1f} s incl. compile, torch {firsts[1]:.2f} s); tok = batch x seq")
  print(f"loss step 0 ours {ours_losses[0]:.6f} torch {torch_losses[0]:.6f} |diff| {diff0:.1e}; "
        f"step {last} ours {ours_losses[last]:.6f} torch {torch_losses[last]:.6f} "
        f"|diff| {abs(ours_losses[last] - torch_losses[last]):.1e}")
  if not diff0 <= LOSS_TOL:
    _fail("first-step loss", f"ours {ours_losses[0]:.6f} vs torch {torch_losses[0]:.6f} "
          f"(|diff| {diff0:.1e} > {LOSS_TOL})")
  others = ", ".join(f"{ntok / t:.0f} tok/s at {n} thread(s)"
                     for n, t in zip(threads, medians[1:]))
  ratio = t_torch / t_ours
  print(f"train step  ours {ntok / t_ours:9.0f} tok/s   torch {ntok / t_torch:9.0f} tok/s   "
        f"ratio ours/torch = {ratio:.2f} (target >= {TARGETS['train_vs_torch']})   "
        f"(torch: {others})")
  return ratio


def bench_testbed(args, world):
  """Section 2; returns (run_sft s/step, bare s/step, loop / bare)."""
  import jax
  import jax.numpy as jnp

  from cast_jax import data, testbed
  from cast_jax.data.batching import iterate_train_batches
  from cast_jax.models import init_params
  from cast_jax.testbed.build import TestbedSpec, model_config
  from cast_jax.train import (OptimizerConfig, TrainState, build_optimizer, make_sft_loss_fn,
                              make_train_step, partition, train)
  from cast_jax.train.sft import run_sft
  from cast_jax.train.losses import check_sft_batch

  spec = TestbedSpec()
  tok = testbed.build_tokenizer(world)
  config = model_config(spec, tok)
  params = init_params(config, jax.random.PRNGKey(spec.seed), std=spec.init_std)
  pairs = [(r["prompt"], r["response"]) for r in world.files["base/train.jsonl"]]
  examples = data.encode_dataset(tok, pairs, max_len=spec.max_len, name="pretrain")
  opt = OptimizerConfig(learning_rate=spec.pretrain_lr, total_steps=spec.pretrain_steps,
                        warmup_steps=max(1, spec.pretrain_steps // 12), weight_decay=0.01,
                        end_lr_ratio=0.05)
  buckets, bs = (64, spec.max_len), spec.pretrain_batch

  def batches_fn(start):  # run_sft's data order
    return (b for _, _, b in iterate_train_batches(examples, batch_size=bs, seed=spec.seed,
                                                   pad_id=tok.pad_token_id, start_step=start,
                                                   multiple=16, buckets=buckets))

  first = [b for _, b in zip(range(8), batches_fn(0))]
  lengths = sorted({b["input_ids"].shape[1] for b in first})
  tx, lr_fn = build_optimizer(opt)
  trainable, frozen = partition(jax.tree.map(jnp.copy, params), True)
  state = TrainState.create(trainable, tx, jax.random.PRNGKey(spec.seed))
  step = make_train_step(make_sft_loss_fn(config, per_sequence=True), tx)
  jbatches = [jax.tree.map(jnp.asarray, b) for b in first]

  def bare(k):
    nonlocal state
    t = time.perf_counter()
    for i in range(k):
      state, _ = step(state, frozen, jbatches[i % len(jbatches)])
      jax.block_until_ready(state)
    return (time.perf_counter() - t) / k

  def loop(k):
    nonlocal state
    t = time.perf_counter()
    state, _ = train(step, state, frozen, batches_fn, num_steps=int(state.step) + k,
                     progress=False, lr_fn=lr_fn, check_batch=check_sft_batch, log_every=25)
    return (time.perf_counter() - t) / k

  def sft(n, log_every=10):
    with tempfile.TemporaryDirectory() as wd:
      run_sft(params, config, examples, pad_id=tok.pad_token_id, num_steps=n, batch_size=bs,
              seed=spec.seed, optimizer=opt, workdir=wd, buckets=buckets, per_sequence=True,
              progress=False, log_every=log_every)
      with open(os.path.join(wd, "metrics.jsonl")) as f:
        at = {ln["step"]: ln["time"] for ln in map(json.loads, f)}
    lo, hi = log_every, log_every * (n // log_every)
    return (at[hi] - at[lo]) / (hi - lo)  # steady state: the first steps compile

  bare(2), loop(2)  # compile (one program per bucket length seen)
  k, rounds = 6, 4
  pairs_t = [(bare(k), loop(k)) for _ in range(rounds)]
  t_bare = float(np.median([p[0] for p in pairs_t]))
  t_loop = float(np.median([p[1] for p in pairs_t]))
  n = 10 * (1 + max(1, args.testbed_steps // 10))
  sft_times = []
  for _ in range(2):  # interleaved with bare-step chunks against drifting background load
    sft_times.append(sft(n))
    pairs_t.append((bare(k), None))
  t_sft = float(np.median(sft_times))
  t_bare_all = float(np.median([p[0] for p in pairs_t]))
  print(f"\n[testbed pretraining] TestbedSpec model (hidden {spec.hidden_size}, {spec.num_layers} "
        f"layers, {spec.num_heads}/{spec.num_kv_heads} heads, ffn {spec.intermediate_size}, vocab "
        f"{config.vocab_size}, tied), batch {bs}, buckets {buckets} (the first batches have "
        f"length {lengths}), per-sequence loss, AdamW cosine")
  print(f"loop: train() {t_loop:.3f} s/step vs bare jitted step {t_bare:.3f} s/step (same "
        f"compiled step, {rounds} interleaved {k}-step chunks)   ratio loop/bare = "
        f"{t_loop / t_bare:.2f} (target <= {TARGETS['loop_vs_bare']})")
  print(f"run_sft {t_sft:.3f} s/step (steps 10..{n - n % 10} of {n} from metrics.jsonl, median "
        f"of 2 runs: {', '.join(f'{t:.3f}' for t in sft_times)}) vs bare step "
        f"{t_bare_all:.3f} s/step: ratio {t_sft / t_bare_all:.2f}")
  print(f"testbed pretraining: before {BEFORE['testbed_s_per_step']:.2f} s/step (issue 8's "
        f"measurement), now {t_sft:.3f} s/step: {BEFORE['testbed_s_per_step'] / t_sft:.2f}x "
        f"faster (target >= {TARGETS['testbed_speedup']}x)")
  return t_sft, t_bare_all, t_loop / t_bare


def bench_scorers(args, hf, config, params, tok, world, threads):
  """Section 3; returns (mcq ours/HF, generate ours/HF)."""
  import torch
  from absl import logging

  from cast_jax import testbed
  from cast_jax.data import chat
  from cast_jax.eval import runners, score_reasoning
  from cast_jax.testbed.tokenizer import SPACE

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
  # The library's rule, applied here from the tokenizer's own vocabulary: the letter follows a
  # whitespace or a special / added token (a role header) directly, anything else after a space.
  specials = set(tok.all_special_tokens) | set(tok.get_added_vocab())
  bare = [p[-1].isspace() or any(p.endswith(s) for s in specials) for p in mcq_prompts]
  letter_ids = np.array([tok.convert_tokens_to_ids([c if b else SPACE + c for c in "ABCD"])
                         for b in bare])
  if tok.unk_token_id is not None and (letter_ids == tok.unk_token_id).any():
    _fail("letter ids", "a letter token is not in the testbed vocabulary")
  rows = torch.arange(len(mcq_prompts))[:, None]
  tok.padding_side = "left"
  mcq_out, gen_out = {}, {}

  def ours_mcq():
    mcq_out["ours"] = runners.score_mcq(model, tok, mcq_prompts, answers, choices="ABCD",
                                        batch_size=bs)

  def hf_mcq():
    enc = tok(mcq_prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.inference_mode():
      logits = hf(**enc).logits[:, -1][rows, torch.as_tensor(letter_ids)]
    mcq_out["hf"] = logits.argmax(-1).numpy()

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
    medians, _ = interleaved([ours_fn] + [torch_at(n, hf_fn) for n in threads], args.repeats, 1)
    t_ours, t_hf = medians[0], min(medians[1:])
    note = check()  # raises SystemExit before any ratio is printed
    others = ", ".join(f"{n_p / t:.1f} at {n} thread(s)" for n, t in zip(threads, medians[1:]))
    print(f"{name:18s} ours {n_p / t_ours:7.1f} prompts/s   HF {n_p / t_hf:7.1f} prompts/s   "
          f"ratio ours/HF = {t_hf / t_ours:.2f}   ({note}; HF: {others})")
    return t_hf / t_ours

  def check_mcq():
    same_ids = np.array_equal(mcq_out["ours"].choice_token_ids, letter_ids)
    if not same_ids:
      bad = int(np.flatnonzero((mcq_out["ours"].choice_token_ids != letter_ids).any(1))[0])
      _fail("MCQ letter ids", f"prompt {bad}: ours {mcq_out['ours'].choice_token_ids[bad]} vs "
            f"the rule's {letter_ids[bad]} (prompt ends {mcq_prompts[bad][-25:]!r})")
    agree = float(np.mean(mcq_out["ours"].predictions == mcq_out["hf"]))
    if agree < MCQ_AGREEMENT:
      _fail("MCQ argmax agreement", f"{agree:.3f} < {MCQ_AGREEMENT}")
    return f"argmax agreement {agree:.3f}, letter ids same: {same_ids}"

  def check_gen():
    same = float(np.mean([a == b for a, b in zip(gen_out["ours"], gen_out["hf"])]))
    if same < TEXT_AGREEMENT:
      _fail("generated texts", f"identical for {same:.3f} of prompts < {TEXT_AGREEMENT}")
    return f"identical texts {same:.3f}"

  logging.set_verbosity(logging.ERROR)  # the "no EOS ids" warning is intended here
  n_p = args.prompts
  print(f"\n[eval] {n_p} prompts in one batch, median of {args.repeats} interleaved calls after "
        "a warm-up call")
  r_mcq = compare("mcq (score_mcq)", ours_mcq, hf_mcq, check_mcq)
  r_gen = compare(f"generate ({args.new} new)", ours_gen, hf_gen, check_gen)
  return r_mcq, r_gen


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
  ap.add_argument("--testbed_steps", type=int, default=30, help="timed run_sft steps")
  ap.add_argument("--prompts", type=int, default=64)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3, help="timed scorer calls per side")
  ap.add_argument("--torch_threads", type=int, nargs="*", default=None,
                  help="torch thread counts to time (default: torch's default and 1)")
  args = ap.parse_args()

  import jax
  import torch
  import transformers

  from cast_jax import testbed
  from cast_jax.models import load_pretrained

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

  r_train = bench_train_step(args, hf, config, params, tok, world, threads)
  t_sft, t_bare, r_loop = bench_testbed(args, world)
  r_mcq, r_gen = bench_scorers(args, hf, config, params, tok, world, threads)
  print("\n[summary] this run vs issue 8 (before) and its targets")
  print(f"  train step ours/torch       {r_train:5.2f}x   before {BEFORE['train_vs_torch']:.2f}x"
        f"   target >= {TARGETS['train_vs_torch']}x")
  print(f"  loop / bare step            {r_loop:5.2f}x   target <= {TARGETS['loop_vs_bare']}x")
  print(f"  testbed pretraining         {t_sft:5.3f} s/step (bare step {t_bare:.3f})   before "
        f"{BEFORE['testbed_s_per_step']:.2f} s/step   speed-up "
        f"{BEFORE['testbed_s_per_step'] / t_sft:.2f}x   target >= {TARGETS['testbed_speedup']}x")
  print(f"  mcq scorer ours/HF          {r_mcq:5.2f}x   before {BEFORE['mcq_vs_hf']:.2f}x")
  print(f"  generation scorer ours/HF   {r_gen:5.2f}x   before {BEFORE['generate_vs_hf']:.2f}x")


if __name__ == "__main__":
  main()
