"""CAST head-level diagnosis (cast.md section 3) against the per-head loop a user would write
from the paper, on the same checkpoint and calibration sets, measured in one run.

  python benchmarks/bench_diagnosis.py --setting=testbed   # the shared testbed, every head
  python benchmarks/bench_diagnosis.py --setting=smol      # SmolLM-135M shape, random weights

Ours: `cast_jax.diagnosis` (head_gradients -> optimization_conflict; mcq_sweep -> H_gen;
safety_sweep -> H_safe, by its default divergence-first decoding; score_heads); with
--compare_decode (default on) the safety stage is also timed with method="decode" (step by
step: the numbers before divergence-first decoding) and its decisions must be identical. Reference (`diagnosis_reference.py`): HF transformers
(PyTorch, CPU), a Python loop over heads with an o_proj forward pre-hook zeroing that head's
input slice, prompts batched, letter-restricted argmax at the last position, greedy
`model.generate` judged by the same keyword rule, torch autograd for W_q's gradients, ranks
with scipy. Both sides get the same token ids (tokenisation is not what is compared). The run
fails (exit 1) unless every MCQ prediction and every refusal decision is equal and C(h)
agrees to float tolerance; then it prints each stage's seconds, heads/s and ours/reference.

The stages alternate between the sides (gradients, MCQ sweep, safety sweep), so background load
hits both alike. "ours cold" includes jit compilation (one run of a fresh process, empty
persistent compilation cache); "ours warm" repeats it with compiled programs; "ours cached"
(--cached, default on) drops the in-memory programs (`jax.clear_caches`) and runs it again, so
every program is traced anew and loaded from the persistent compilation cache the cold run
filled (`diagnosis.compile_cache`, a temporary folder): what a second launch on the same model
shape pays (the launch script's default cache, `--config.compile_cache`). Torch's thread count is picked per run by timing one
reference head at each candidate count (on a loaded 2-core machine its 2-thread pool can be
several times slower than 1 thread), so the reference is the faster of the two.

--setting=smol subsamples heads for both sides alike (`--layers`, default the first and last:
with layer skipping their mean cost is exactly the all-layer mean) and reports per-head rates;
whole-model times are projected as gradients + per-head seconds x L*H. The 32-layer x 32-head
projection scales those per-stage seconds by matmul FLOPs per token (from the two configs) and
the head count: see `project`.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import diagnosis_reference as ref
from timing import interleaved, torch_at

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048)
# Llama-3-8B's shape: the projection target.
BIG = dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256)
TARGETS = {"testbed": 10.0, "smol": 3.0}
O_TOL = 2e-4


def _load(args):
  """Checkpoint dir, model, tokenizer and calibration records for the setting."""
  import torch
  import transformers

  from cast_jax import data
  from cast_jax.models import load_pretrained
  from cast_jax.testbed import build

  tb = build.build_testbed(progress=False)
  tmp = None
  if args.setting == "testbed":
    # The diagnosis reads the base model (pre-alignment); the aligned one refuses, so its
    # refusal decisions make the equality check of the safety half non-trivial.
    path = tb.base_dir if args.checkpoint == "base" else build.aligned_testbed(tb, progress=False)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
  else:
    tok = transformers.AutoTokenizer.from_pretrained(tb.base_dir)
    cfg = transformers.LlamaConfig(**SMOL, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    tmp = tempfile.TemporaryDirectory()
    path = os.path.join(tmp.name, "smol")
    hf.save_pretrained(path)
  hf = hf.eval().float()
  config, params = load_pretrained(path)
  tok = transformers.AutoTokenizer.from_pretrained(tb.base_dir)  # testbed words, chat template
  safe = [r for r in data.load_wildjailbreak(os.path.join(tb.world_dir, "calib/d_safe.jsonl"))
          if r.harmful][:args.n_safe]
  util = data.load_mmlu(os.path.join(tb.world_dir, "calib/d_util.jsonl"))[:args.n_util]
  return dict(config=config, params=params, hf=hf, tok=tok, safe=safe, util=util, tmp=tmp)


def _calibration(x, args):
  from cast_jax.diagnosis import calibration
  tok = x["tok"]
  _, safe_ex = calibration.safe_calibration(tok, x["safe"], max_len=512)
  mcq_set, util_ex = calibration.util_calibration(tok, x["util"], max_len=512)
  return dict(safe_ex=safe_ex, util_ex=util_ex, mcq_set=mcq_set,
              safe_prompts=calibration.safety_prompt_ids(tok, x["safe"]),
              pad=int(tok.pad_token_id), eos=int(tok.eos_token_id))


def _balanced_block(m, most=8):
  """Masks per safety block: <= most, blocks of equal size (no padded copies wasted)."""
  return -(-m // -(-m // most))


class Ours:
  """This library's diagnosis, stage by stage (each returns its arrays); heads None (all, the
  library's full sweeps) or the timed [(layer, head)] (layers `args.layers`)."""

  def __init__(self, x, cal, args, heads, method="divergence"):
    self.x, self.cal, self.args, self.heads, self.method = x, cal, args, heads, method

  def gradients(self):
    from cast_jax.diagnosis import calibration, head_gradients, optimization_conflict
    p, c, cal, bs = self.x["params"], self.x["config"], self.cal, self.args.batch_size
    batches = lambda ex: calibration.calibration_batches(ex, batch_size=bs, pad_id=cal["pad"])
    g_safe, _ = head_gradients(p, c, batches(cal["safe_ex"]))
    g_util, _ = head_gradients(p, c, batches(cal["util_ex"]))
    return optimization_conflict(g_safe, g_util)[1]

  def mcq(self):
    from cast_jax.diagnosis import mcq_sweep
    from cast_jax.diagnosis.layer_sweep import block_key
    p, c, cal, a = self.x["params"], self.x["config"], self.cal, self.args
    if self.heads is None:
      s = mcq_sweep(p, c, cal["mcq_set"], pad_id=cal["pad"], batch_size=a.batch_size)
      return s.base_predictions, s.predictions.reshape(-1, s.predictions.shape[-1])
    # Only the timed layers run: every other one-layer block is handed in as finished (the
    # sweep's resume input), so the layer-skipping program is the library's own.
    N, H = len(cal["mcq_set"].prompt_ids), c.num_heads
    skip = {block_key(l, l + 1): np.zeros((1, H, N), np.int32)
            for l in range(c.num_layers) if l not in a.layers}
    s = mcq_sweep(p, c, cal["mcq_set"], pad_id=cal["pad"], batch_size=a.batch_size,
                  layer_block=1, done=skip)
    return s.base_predictions, s.predictions[a.layers].reshape(-1, N)

  def safety(self):
    from cast_jax.diagnosis import refusals_under_masks, safety_sweep
    p, c, cal, a = self.x["params"], self.x["config"], self.cal, self.args
    L, H = c.num_layers, c.num_heads
    kw = dict(max_new_tokens=a.gen_len, pad_id=cal["pad"], batch_size=a.batch_size,
              method=self.method)
    n = 1 + (L * H if self.heads is None else len(self.heads))
    if self.heads is None:
      s = safety_sweep(p, c, self.x["tok"], cal["safe_prompts"], mask_block=_balanced_block(n),
                       **kw)
      return s.base_refused, s.refused.reshape(L * H, -1)
    masks = np.ones((n, L, H), np.float32)
    for i, (l, h) in enumerate(self.heads, 1):
      masks[i, l, h] = 0.0
    got = refusals_under_masks(p, c, self.x["tok"], cal["safe_prompts"], masks,
                               mask_block=_balanced_block(n), **kw)
    return got[0], got[1:]


class Reference:
  """The per-head HF loop, stage by stage, on the same token ids; heads [(layer, head)]."""

  def __init__(self, x, cal, args, heads):
    self.x, self.cal, self.args, self.heads = x, cal, args, heads
    self.threads = None

  def _run(self, fn):
    return torch_at(self.threads, fn)() if self.threads else fn()

  def gradients(self):
    hf, cal, bs = self.x["hf"], self.cal, self.args.batch_size
    return self._run(lambda: ref.conflict_o(hf, cal["safe_ex"], cal["util_ex"], bs, cal["pad"]))

  def mcq(self):
    hf, cal, m = self.x["hf"], self.cal, self.cal["mcq_set"]
    return self._run(lambda: ref.mcq_loop(hf, m.prompt_ids, m.choice_ids, self.heads,
                                          self.args.batch_size, cal["pad"]))

  def safety(self):
    hf, cal, a = self.x["hf"], self.cal, self.args
    return self._run(lambda: ref.refusal_loop(hf, self.x["tok"], cal["safe_prompts"], self.heads,
                                              a.batch_size, a.gen_len, cal["pad"], cal["eos"]))


CPU = {}  # (side, stage) -> this process's CPU seconds of the last timed call


def _timed(fn, key=None):
  """(fn(), wall seconds); with `key`, also records the process CPU seconds in CPU[key] (on a
  machine other jobs load, CPU seconds move less than wall seconds)."""
  t, c = time.perf_counter(), time.process_time()
  out = fn()
  if key is not None:
    CPU[key] = time.process_time() - c
  return out, time.perf_counter() - t


def _pick_threads(reference, args):
  """The faster torch thread count for this machine now: one base-model MCQ + safety pass each."""
  import torch
  counts = args.torch_threads or sorted({torch.get_num_threads(), 1}, reverse=True)
  if len(counts) == 1:
    return counts[0], {}
  cal, hf = reference.cal, reference.x["hf"]
  m = cal["mcq_set"]

  def probe():  # one batch of each reference stage
    b = args.batch_size
    ref.mcq_loop(hf, m.prompt_ids[:b], m.choice_ids[:b], [], b, cal["pad"])
    ref.refusal_loop(hf, reference.x["tok"], cal["safe_prompts"][:b], [], b,
                     min(args.gen_len, 16), cal["pad"], cal["eos"])

  medians, _ = interleaved([torch_at(n, probe) for n in counts], repeats=1)
  return counts[int(np.argmin(medians))], dict(zip(counts, medians))


def _head_scores(o, mcq, safety, answers, flat):
  """(O, H_gen, H_safe) of the timed heads, each float64 [n]: o [L, H]; mcq (base [N], ablated
  [n, N]) predictions; safety (base [N], ablated [n, N]) decisions; flat [n] head indices."""
  h_gen = np.abs((mcq[1] == answers).mean(-1) - (mcq[0] == answers).mean())
  h_safe = np.abs(safety[1].mean(-1) - safety[0].mean())
  return np.asarray(o, np.float64).reshape(-1)[flat], h_gen, h_safe


def _check(ours, theirs, answers, flat):
  """Exact predictions / decisions and C within tolerance, else SystemExit(1) naming the first
  mismatch. Returns (max |O diff|, max |C diff|, ours' ConflictScores over the timed heads)."""
  from cast_jax.diagnosis import score_heads
  problems = []
  for name, stage, i in (("MCQ base predictions", "mcq", 0), ("MCQ ablated predictions", "mcq", 1),
                         ("base refusal decisions", "safety", 0),
                         ("ablated refusal decisions", "safety", 1)):
    a, b = ours[stage][i], theirs[stage][i]
    if a.shape != b.shape or not np.array_equal(a, b):
      where = np.argwhere(a != b)[:3].tolist() if a.shape == b.shape else (a.shape, b.shape)
      problems.append(f"{name} differ (first at {where}, of {a.shape})")
  o_diff = float(np.max(np.abs(ours["o"] - theirs["o"])))
  if o_diff > O_TOL:
    problems.append(f"O differs by {o_diff:.2e} > {O_TOL}")
  sc = score_heads(*(v[None] for v in _head_scores(ours["o"], ours["mcq"], ours["safety"],
                                                   answers, flat)))
  c_ref = ref.conflict_scores(*_head_scores(theirs["o"], theirs["mcq"], theirs["safety"],
                                            answers, flat))
  c_diff = float(np.max(np.abs(sc.c.reshape(-1) - c_ref)))
  if c_diff > 3 * O_TOL:
    problems.append(f"C differs by {c_diff:.2e} > {3 * O_TOL}")
  if problems:
    print("CHECK FAILED: " + "; ".join(problems))
    raise SystemExit(1)
  return o_diff, c_diff, sc


def _flops_per_token(hidden, layers, heads, kv_heads, head_dim, ffn, vocab):
  """Matmul FLOPs per token: (per layer, and the unembedding)."""
  layer = 2 * (hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn)
  return layer * layers, 2 * hidden * vocab


def project(stage_seconds, config, heads_timed):
  """Whole-diagnosis seconds of an 8B-shaped model (BIG) from this run's per-stage seconds.

  Each stage is GEMM-bound at these sizes, so its time is scaled by the ratio of matmul FLOPs
  per token (the layers; plus the unembedding for gradients and generation, whose every token is
  unembedded, not for the MCQ sweep, which unembeds one position per prompt), and the sweeps by
  the head count (1024 / heads timed). Same calibration sets and gen_len; same machine.
  """
  c = config
  lay_s, emb_s = _flops_per_token(c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads,
                                  c.head_dim, c.intermediate_size, c.vocab_size)
  lay_b, emb_b = _flops_per_token(**BIG)
  heads_big = BIG["layers"] * BIG["heads"]
  grad = stage_seconds["gradients"] * (lay_b + emb_b) / (lay_s + emb_s)
  mcq = stage_seconds["mcq"] * lay_b / lay_s * heads_big / heads_timed
  safety = stage_seconds["safety"] * (lay_b + emb_b) / (lay_s + emb_s) * heads_big / heads_timed
  return grad + mcq + safety


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--setting", choices=("testbed", "smol"), default="testbed")
  ap.add_argument("--checkpoint", choices=("base", "aligned"), default="base",
                  help="testbed: the base model (what CAST diagnoses) or the aligned one")
  ap.add_argument("--n_safe", type=int, default=None, help="D_safe prompts (testbed 100, smol 8)")
  ap.add_argument("--n_util", type=int, default=None, help="D_util items (testbed 64, smol 8)")
  ap.add_argument("--gen_len", type=int, default=None, help="greedy tokens (testbed 64, smol 16)")
  ap.add_argument("--batch_size", type=int, default=None, help="prompts per batch (both sides)")
  ap.add_argument("--layers", type=str, default=None,
                  help="smol: comma-separated layers whose heads are timed (default first,last)")
  ap.add_argument("--warm", type=int, default=None, help="also time ours compiled (default 1)")
  ap.add_argument("--cached", type=int, default=1,
                  help="also time ours from the persistent compilation cache (default 1)")
  ap.add_argument("--torch_threads", type=int, nargs="*", default=None)
  ap.add_argument("--compare_decode", type=int, default=1,
                  help="also time the safety sweep's step-by-step method (before / after)")
  args = ap.parse_args()
  testbed = args.setting == "testbed"
  defaults = dict(n_safe=100 if testbed else 8, n_util=64 if testbed else 8,
                  gen_len=64 if testbed else 16, batch_size=20 if testbed else 8, warm=1)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)

  import jax
  import torch
  import transformers

  from cast_jax.diagnosis.compile_cache import enable_compile_cache
  cache = tempfile.TemporaryDirectory() if args.cached else None
  if cache is not None:  # empty: "cold" compiles everything and fills it for "cached"
    enable_compile_cache(cache.name)
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()

  x = _load(args)
  cal = _calibration(x, args)
  c = x["config"]
  L, H = c.num_layers, c.num_heads
  if testbed:
    heads, args.layers = None, None
  else:
    args.layers = ([0, L - 1] if args.layers is None
                   else [int(v) for v in args.layers.split(",")])
    heads = [(l, h) for l in args.layers for h in range(H)]
  n_timed = L * H if heads is None else len(heads)
  ref_heads = [(l, h) for l in range(L) for h in range(H)] if heads is None else heads
  ours, theirs = Ours(x, cal, args, heads), Reference(x, cal, args, ref_heads)
  theirs.threads, probe = _pick_threads(theirs, args)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(x["params"]))
  print(f"setting {args.setting}" + (f" ({args.checkpoint} checkpoint)" if testbed else "")
        + f": llama {L} layers x {H} heads ({c.num_kv_heads} kv, head_dim "
        f"{c.head_dim}, hidden {c.hidden_size}, vocab {c.vocab_size}), {n_params / 1e6:.1f}M "
        f"params; D_safe {len(cal['safe_prompts'])} prompts, D_util {len(cal['util_ex'])} items, "
        f"gen_len {args.gen_len}, batch {args.batch_size}; heads timed {n_timed}"
        + ("" if heads is None else f" (layers {args.layers})"))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; torch threads {theirs.threads} (probe s: "
        + ", ".join(f"{n}: {t:.2f}" for n, t in probe.items()) + ")")

  stages = ("gradients", "mcq", "safety")
  got_o, got_r, t_o, t_r, t_w, t_c = {}, {}, {}, {}, {}, {}
  for stage in stages:  # ours cold, reference, ours warm: each stage's runs side by side
    got_o[stage], t_o[stage] = _timed(getattr(ours, stage), ("cold", stage))
    got_r[stage], t_r[stage] = _timed(getattr(theirs, stage), ("reference", stage))
    if args.warm:
      _, t_w[stage] = _timed(getattr(ours, stage), ("warm", stage))
    if cache is not None:
      jax.clear_caches()  # as a new process: trace again, programs from the disk cache
      _, t_c[stage] = _timed(getattr(ours, stage), ("cached", stage))
    print(f"  {stage:9s} ours {t_o[stage]:8.2f} s" + (f" (warm {t_w[stage]:.2f} s)" if t_w else "")
          + (f" (cached {t_c[stage]:.2f} s)" if t_c else "")
          + f"   reference {t_r[stage]:8.2f} s; CPU s: " + ", ".join(
              f"{side} {v:.2f}" for (side, st), v in CPU.items() if st == stage), flush=True)

  if args.compare_decode:  # the safety sweep's step-by-step method: the "before" numbers
    plain = Ours(x, cal, args, heads, method="decode")
    got_d, t_dc = _timed(plain.safety)
    _, t_dw = _timed(plain.safety)
    same = all(np.array_equal(np.asarray(a, bool), np.asarray(b, bool))
               for a, b in zip(got_d, got_o["safety"]))
    print(f"  safety, method=decode (step by step): {t_dc:.2f} s (warm {t_dw:.2f} s); "
          f"divergence: {t_o['safety']:.2f} s" + (f" (warm {t_w['safety']:.2f} s)" if t_w else "")
          + f"; decisions {'identical' if same else 'DIFFER'}", flush=True)
    if not same:
      print("CHECK FAILED: the safety sweep's methods disagree")
      raise SystemExit(1)

  flat = np.asarray([l * H + h for l, h in ref_heads])
  answers = np.asarray(cal["mcq_set"].answers)
  for d in (got_o, got_r):
    d["o"] = np.asarray(d.pop("gradients"))
    d["mcq"] = tuple(np.asarray(a) for a in d["mcq"])
    d["safety"] = tuple(np.asarray(a, bool) for a in d["safety"])
  o_diff, c_diff, sc = _check(got_o, got_r, answers, flat)
  print(f"check: MCQ predictions ({n_timed + 1} masks x {len(answers)} items) and refusal "
        f"decisions ({n_timed + 1} masks x {len(cal['safe_prompts'])} prompts) identical; "
        f"max |O diff| {o_diff:.1e}, max |C diff| {c_diff:.1e}")
  print(f"conflict map ({n_timed} heads): base accuracy {(got_o['mcq'][0] == answers).mean():.3f}, "
        f"base refusal {got_o['safety'][0].mean():.3f}; C in [{sc.c.min():.3f}, "
        f"{sc.c.max():.3f}], std {sc.c.std():.3f}; H_gen > 0 for {(sc.h_gen > 0).sum()} heads, "
        f"H_safe > 0 for {(sc.h_safe > 0).sum()}")

  def whole(t):  # seconds for every head of this model
    return t["gradients"] + (t["mcq"] + t["safety"]) * (L * H) / n_timed

  rows = [("ours (cold: incl. compile)", t_o), ("reference (HF per-head loop)", t_r)]
  if t_w:
    rows.insert(1, ("ours (warm)", t_w))
  if t_c:
    rows.insert(1, ("ours (cached compiles)", t_c))
  print(f"\n{'':30s} {'gradients':>10s} {'MCQ sweep':>10s} {'safety':>10s} {'all heads':>10s}"
        f" {'heads/s':>9s} {'s/head':>8s}")
  for name, t in rows:
    total = whole(t)
    print(f"{name:30s} {t['gradients']:10.2f} {t['mcq']:10.2f} {t['safety']:10.2f} "
          f"{total:10.2f} {L * H / total:9.2f} {(t['mcq'] + t['safety']) / n_timed:8.3f}")
  note = "" if heads is None else f" (projected from {n_timed} heads: gradients + s/head x {L * H})"
  ratio = whole(t_r) / whole(t_o)
  print(f"\nspeed ratio reference / ours (cold) = {ratio:.2f}x{note}; target >= "
        f"{TARGETS[args.setting]:.0f}x: {'met' if ratio >= TARGETS[args.setting] else 'NOT met'}")
  if t_c:
    print(f"speed ratio reference / ours (cached compiles) = {whole(t_r) / whole(t_c):.2f}x")
  if t_w:
    print(f"speed ratio reference / ours (warm) = {whole(t_r) / whole(t_w):.2f}x")
  cpu = {side: {st: v for (sd, st), v in CPU.items() if sd == side}
         for side in ("cold", "cached", "warm", "reference")}
  print("process CPU seconds, all heads: " + ", ".join(
      f"{side} {whole(t):.2f}" for side, t in cpu.items() if len(t) == len(stages))
        + "; reference / ours: " + ", ".join(
      f"{side} {whole(cpu['reference']) / whole(t):.2f}x" for side, t in cpu.items()
      if side != "reference" and len(t) == len(stages)))
  for stage in stages:
    print(f"  {stage:9s} reference / ours (cold) = {t_r[stage] / t_o[stage]:6.2f}x"
          + (f", (cached) = {t_r[stage] / t_c[stage]:6.2f}x" if t_c else "")
          + (f", (warm) = {t_r[stage] / t_w[stage]:6.2f}x" if t_w else ""))
  if heads is None:
    print("\nprojection to 32 layers x 32 heads: from --setting=smol (at this model's size fixed "
          "costs, not matmuls, dominate, so FLOP scaling would not hold)")
  else:
    big_o, big_r = project(t_w or t_o, c, n_timed), project(t_r, c, n_timed)
    print(f"\nprojection, 32 layers x 32 heads (Llama-3-8B shape), this CPU, same calibration: "
          f"ours {big_o / 3600:.1f} h ({1024 / big_o:.4f} heads/s), reference "
          f"{big_r / 3600:.1f} h ({1024 / big_r:.4f} heads/s), ratio {big_r / big_o:.2f}x: each "
          f"stage's seconds x matmul FLOPs per token (8B / this model) x heads (1024 / "
          f"{n_timed} timed). Measured on an H200 instead: benchmarks/bench_diagnosis_device.py "
          "(docs/results/diagnosis_h200.md).")
  if x["tmp"] is not None:
    x["tmp"].cleanup()
  if cache is not None:
    cache.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
