"""Decoder speed and loading memory against HF transformers, measured in one run.

  python benchmarks/bench_decoder.py [--hidden=512 --layers=8 --batch=8 --seq=256 --new=64]

Prints forward tokens/s and greedy-generation tokens/s for this library and for HF (PyTorch,
same checkpoint, same batch, same machine), their ratios, and the peak host memory growth while
loading a multi-shard checkpoint relative to the checkpoint's size (measured in a subprocess).

Calls alternate between the sides (`timing.interleaved`) so background load on a shared machine
hits both alike; torch is timed at its default thread count and at 1 thread and the faster is
the reference (on a loaded 2-core machine its 2-thread pool can be several times slower). The
generated tokens of both sides are compared (a mismatch is printed: near-ties of the random
model, not a speed question).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from timing import interleaved, torch_at


def _load_peak(path: str) -> None:
  """Subprocess body: prints the peak growth of anonymous RSS (bytes) across load_pretrained.

  Anonymous memory is what holds copies of the weights; file-backed pages of the mmapped
  safetensors are page cache the kernel can drop, so they are reported separately.
  """
  import threading

  import jax
  import jax.numpy as jnp

  from cast_jax.models import load_pretrained
  jnp.zeros(1).block_until_ready()  # backend up before the baseline
  base = _rss_kib()
  peak = dict(base)
  done = threading.Event()

  def sample():
    while not done.is_set():
      now = _rss_kib()
      for k in peak:
        peak[k] = max(peak[k], now[k])
      time.sleep(0.002)

  thread = threading.Thread(target=sample)
  thread.start()
  _, params = load_pretrained(path)
  jax.block_until_ready(params)
  done.set()
  thread.join()
  print(json.dumps({k: (peak[k] - base[k]) * 1024 for k in peak}))


def _rss_kib() -> dict:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("RssAnon", "RssFile")):
        name, value = line.split(":")
        out[name] = int(value.split()[0])
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv_heads", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--torch_threads", type=int, nargs="*", default=None,
                  help="torch thread counts to time (default: torch's default and 1)")
  ap.add_argument("--_load_peak", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args._load_peak:
    return _load_peak(args._load_peak)

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from cast_jax.generate import generate
  from cast_jax.models import forward, load_pretrained

  hf_cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=4096, pad_token_id=0,
      bos_token_id=1, eos_token_id=2)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}); torch threads {torch.get_num_threads()}")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ckpt")
    hf.save_pretrained(path, max_shard_size="20MB")
    ckpt_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                     if f.endswith(".safetensors"))
    shards = len([f for f in os.listdir(path) if f.endswith(".safetensors")])
    out = subprocess.run([sys.executable, __file__, f"--_load_peak={path}"], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    mem = json.loads(out)
    config, params = load_pretrained(path)

  threads = args.torch_threads or sorted({torch.get_num_threads(), 1}, reverse=True)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, args.vocab, size=(args.batch, args.seq))
  fwd = jax.jit(lambda p, x: forward(p, config, x))
  x = jnp.asarray(ids)
  tid = torch.tensor(ids)

  def hf_fwd():
    with torch.inference_mode():
      hf(tid)

  fwd_times, _ = interleaved([lambda: fwd(params, x).block_until_ready()]
                             + [torch_at(n, hf_fwd) for n in threads], args.repeats)
  ntok = args.batch * args.seq

  prompt = ids[:, :64]
  tp = torch.tensor(prompt)
  got = {}

  def ours_gen():
    got["ours"] = generate(params, config, prompt, max_new_tokens=args.new,
                           eos_token_ids=()).tokens

  def hf_gen():
    with torch.inference_mode():
      out = hf.generate(tp, attention_mask=torch.ones_like(tp), max_new_tokens=args.new,
                        min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    got["hf"] = out[:, prompt.shape[1]:].numpy()

  gen_times, _ = interleaved([ours_gen] + [torch_at(n, hf_gen) for n in threads],
                             max(1, args.repeats - 1))
  ngen = args.batch * args.new
  same = float(np.mean(got["ours"] == got["hf"]))
  t_ours, t_hf = fwd_times[0], min(fwd_times[1:])
  t_gen, t_hf_gen = gen_times[0], min(gen_times[1:])

  print(f"model: llama hidden={args.hidden} layers={args.layers} heads={args.heads}/"
        f"{args.kv_heads} vocab={args.vocab}; batch={args.batch} seq={args.seq}")
  print(f"forward   ours {ntok / t_ours:10.0f} tok/s   HF {ntok / t_hf:10.0f} tok/s   "
        f"ratio ours/HF = {t_hf / t_ours:.2f}   (HF: "
        + ", ".join(f"{ntok / t:.0f} at {n} thread(s)" for n, t in zip(threads, fwd_times[1:]))
        + ")")
  print(f"generate  ours {ngen / t_gen:10.0f} tok/s   HF {ngen / t_hf_gen:10.0f} tok/s   "
        f"ratio ours/HF = {t_hf_gen / t_gen:.2f}  (prompt 64, {args.new} new, greedy; HF: "
        + ", ".join(f"{ngen / t:.0f} at {n} thread(s)" for n, t in zip(threads, gen_times[1:]))
        + f"; same tokens {same:.3f})")
  print(f"loading {shards} shards, {ckpt_bytes / 2**20:.1f} MiB fp32: peak anonymous-RSS growth "
        f"{mem['RssAnon'] / 2**20:.1f} MiB = {mem['RssAnon'] / ckpt_bytes:.2f}x checkpoint size "
        f"(mmapped file pages, droppable: {mem['RssFile'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
