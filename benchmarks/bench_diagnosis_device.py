"""The whole CAST diagnosis of a 32-layer x 32-head model (Llama-3-8B's shape, random bf16
weights) on an accelerator, against the per-head HF loop on the same device, from one run.

  python benchmarks/bench_diagnosis_device.py                 # 8B shape, GPU/TPU
  python benchmarks/bench_diagnosis_device.py --shape=tiny    # smoke run on a CPU

Ours: every head, measured end to end (cold: jit compilation included), by the library's
stages (head_gradients -> optimization_conflict; mcq_sweep -> H_gen; safety_sweep -> H_safe).
Reference (`diagnosis_reference.py`, torch on the same device, bf16, prompts in one batch):
the gradients once, then the MCQ pass and greedy `generate` for the base model and
--ref_heads heads; its whole-model time is gradients + (seconds per head) x 1024, the
per-head cost being the same for every head (one full-model pass each). Calibration: random
token ids (n_safe prompts with a refusal-length target, n_util one-letter MCQ items); the
keyword judge reads ids rendered as numbers, so it never fires and H_safe is all zero: the
decode work is what is timed, and with random weights divergence-first decoding sees more
divergence than a trained model, so its share is an upper bound. The sweeps' equality to the
reference is bench_diagnosis.py's (CPU, fp32, exact decisions), not this script's.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

SHAPES = {  # hidden, layers, heads, kv heads, head_dim, FFN, vocab
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336,
               vocab=128256),
    "tiny": dict(hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=512),
}
EOS, PAD, LETTERS = 2, 0, (65, 66, 67, 68)


class _IdTokenizer:
  """What the sweeps and the reference need of a tokenizer: eos and decode (ids as numbers)."""
  eos_token_id = EOS
  pad_token_id = PAD

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(str(int(i)) for i in ids)


def _calibration(args, vocab):
  """Random-id D_safe (prompt + refusal-length target), D_util (prompt + answer letter)."""
  from cast_jax.diagnosis.calibration import MCQSet
  rng = np.random.default_rng(0)
  prompt = lambda: rng.integers(100, vocab, rng.integers(args.prompt_len // 2, args.prompt_len + 1))
  safe_prompts = [[1] + prompt().tolist() for _ in range(args.n_safe)]
  safe_ex = []
  for p in safe_prompts:
    ids = np.asarray(p + rng.integers(100, vocab, 12).tolist(), np.int32)
    safe_ex.append((ids, (np.arange(len(ids)) >= len(p)).astype(np.float32)))
  util_prompts = [[1] + prompt().tolist() for _ in range(args.n_util)]
  answers = rng.integers(0, 4, args.n_util).astype(np.int32)
  util_ex = [(np.asarray(p + [LETTERS[a]], np.int32),
              (np.arange(len(p) + 1) == len(p)).astype(np.float32))
             for p, a in zip(util_prompts, answers)]
  mcq = MCQSet(util_prompts, np.tile(np.asarray(LETTERS, np.int32), (args.n_util, 1)), answers)
  return dict(safe_prompts=safe_prompts, safe_ex=safe_ex, util_ex=util_ex, mcq=mcq)


def _progress(name, total):
  """progress(units) for a sweep: a line at every 10% with heads/s so far (a run cut off by a
  device time limit still tells its rate)."""
  state = dict(done=0.0, t=time.perf_counter(), next=0.1)

  def step(units):
    state["done"] += units
    frac = state["done"] / total
    if frac >= state["next"] - 1e-9:
      dt = time.perf_counter() - state["t"]
      print(f"    {name}: {frac:4.0%} of {total} heads, {dt:7.1f} s, {state['done'] / dt:.2f} "
            "heads/s", flush=True)
      state["next"] = np.floor(frac * 10 + 1e-9) / 10 + 0.1
  return step


def _timed(name, fn, times):
  t = time.perf_counter()
  out = fn()
  times[name] = time.perf_counter() - t
  print(f"  {name:22s} {times[name]:9.2f} s", flush=True)
  return out


def reference(args, shape, cal):
  """Seconds of the HF loop: gradients, and the MCQ / safety passes per head."""
  import torch
  import transformers

  import diagnosis_reference as ref
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  cfg = transformers.LlamaConfig(
      vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
      num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], bos_token_id=1,
      eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=4096)
  t = time.perf_counter()
  with torch.device(dev):
    hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
  print(f"reference: torch {torch.__version__} on {dev}, model built in "
        f"{time.perf_counter() - t:.1f} s", flush=True)
  tok, b, times = _IdTokenizer(), args.ref_batch, {}
  heads = [(l, 0) for l in np.linspace(0, shape["layers"] - 1, args.ref_heads).astype(int)]
  m = cal["mcq"]
  ref.mcq_loop(hf, m.prompt_ids[:2], m.choice_ids[:2], [], b, PAD)  # CUDA / cuBLAS warm-up
  ref.refusal_loop(hf, tok, cal["safe_prompts"][:2], [], b, 4, PAD, EOS)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def run(fn):
    def go():
      out = fn()
      sync()
      return out
    return go

  _timed("gradients", run(lambda: ref.conflict_o(hf, cal["safe_ex"], cal["util_ex"], b, PAD)),
         times)
  _timed("mcq", run(lambda: ref.mcq_loop(hf, m.prompt_ids, m.choice_ids, heads, b, PAD)), times)
  _timed("safety", run(lambda: ref.refusal_loop(hf, tok, cal["safe_prompts"], heads, b,
                                                args.gen_len, PAD, EOS)), times)
  del hf
  if dev == "cuda":
    torch.cuda.empty_cache()
  n = len(heads) + 1  # each loop also ran the base model once
  per_head = (times["mcq"] + times["safety"]) / n
  return dict(device=dev, seconds=times, heads_timed=len(heads), per_head_s=per_head)


def ours(args, shape, cal):
  """Seconds of the library's diagnosis over every head (cold)."""
  import jax
  import jax.numpy as jnp

  from cast_jax.diagnosis import (calibration, head_gradients, mcq_sweep, optimization_conflict,
                                  safety_sweep)
  from cast_jax.models import ModelConfig, init_params
  config = ModelConfig(
      model_type="llama", vocab_size=shape["vocab"], hidden_size=shape["hidden"],
      intermediate_size=shape["ffn"], num_layers=shape["layers"], num_heads=shape["heads"],
      num_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"], bos_token_id=1,
      eos_token_ids=(EOS,), pad_token_id=PAD, rms_norm_eps=1e-5, rope_theta=500000.0)
  t = time.perf_counter()
  params = jax.block_until_ready(init_params(config, jax.random.PRNGKey(0), dtype=jnp.bfloat16))
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  print(f"ours: jax {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}, "
        f"{n_params / 1e9:.2f}B params (bf16) in {time.perf_counter() - t:.1f} s", flush=True)
  times = {}
  batches = lambda ex: calibration.calibration_batches(ex, batch_size=args.grad_batch,
                                                       pad_id=PAD)

  def gradients():
    g_safe, _ = head_gradients(params, config, batches(cal["safe_ex"]))
    g_util, _ = head_gradients(params, config, batches(cal["util_ex"]))
    return jax.block_until_ready(optimization_conflict(g_safe, g_util)[1])

  n_heads = config.num_layers * config.num_heads
  o = _timed("gradients", gradients, times)
  mcq = _timed("mcq", lambda: mcq_sweep(params, config, cal["mcq"], pad_id=PAD,
                                        batch_size=args.n_util,
                                        progress=_progress("mcq", n_heads)), times)
  safety = _timed("safety", lambda: safety_sweep(
      params, config, _IdTokenizer(), cal["safe_prompts"], mask_block=args.mask_block,
      max_new_tokens=args.gen_len, pad_id=PAD, batch_size=args.n_safe,
      progress=_progress("safety", n_heads)), times)
  assert np.asarray(o).shape == (config.num_layers, config.num_heads)
  assert mcq.predictions.shape[:2] == (config.num_layers, config.num_heads)
  assert safety.refused.shape[:2] == (config.num_layers, config.num_heads)
  changed = float((mcq.predictions != mcq.base_predictions).mean())
  return dict(device=jax.devices()[0].device_kind, seconds=times, heads=n_heads,
              mcq_predictions_changed=changed)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", choices=tuple(SHAPES), default="8b")
  ap.add_argument("--n_safe", type=int, default=100)
  ap.add_argument("--n_util", type=int, default=100)
  ap.add_argument("--gen_len", type=int, default=64)
  ap.add_argument("--prompt_len", type=int, default=64, help="longest random prompt (tokens)")
  ap.add_argument("--ref_heads", type=int, default=2, help="heads the HF loop times")
  ap.add_argument("--ref_batch", type=int, default=100, help="reference prompts per batch")
  ap.add_argument("--grad_batch", type=int, default=25, help="our gradient batch")
  ap.add_argument("--mask_block", type=int, default=8, help="our masks per safety program")
  ap.add_argument("--skip_reference", action="store_true")
  ap.add_argument("--out", default=None, help="JSON of the results")
  args = ap.parse_args()
  shape = SHAPES[args.shape]
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  cal = _calibration(args, shape["vocab"])
  print(f"shape {args.shape}: {shape}; D_safe {args.n_safe}, D_util {args.n_util}, gen_len "
        f"{args.gen_len}, prompts <= {args.prompt_len} tokens", flush=True)
  result = dict(shape=shape, args=vars(args))
  if not args.skip_reference:
    result["reference"] = reference(args, shape, cal)
  result["ours"] = ours(args, shape, cal)
  o = result["ours"]
  total = sum(o["seconds"].values())
  print(f"\nours, all {o['heads']} heads (cold, compilation included): {total:.1f} s = "
        f"{total / 60:.2f} min, {o['heads'] / total:.2f} heads/s")
  if "reference" in result:
    r = result["reference"]
    ref_total = r["seconds"]["gradients"] + r["per_head_s"] * o["heads"]
    result["ratio"] = ref_total / total
    print(f"reference (HF per-head loop on {r['device']}), projected from {r['heads_timed']} "
          f"heads + base: {r['per_head_s']:.2f} s/head, {ref_total / 3600:.2f} h for "
          f"{o['heads']} heads ({o['heads'] / ref_total:.3f} heads/s); ratio "
          f"{result['ratio']:.1f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
