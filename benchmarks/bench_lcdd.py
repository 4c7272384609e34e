"""One LCDD step against one full-SFT step on the same model and batch, measured in one run.

  python benchmarks/bench_lcdd.py [--models=testbed,llama8x512 --batch=8 --seq=128
                                   --repeats=7 --warmup=2 --task_loss=ce --remat=full]

Both steps are the library's jitted train steps with donated state, as training runs them:
  * SFT: `make_sft_loss_fn` + `build_optimizer` (AdamW, clipping) + `make_train_step`, every
    parameter trainable (what `run_sft` does by default, embeddings and head included);
  * LCDD: `make_lcdd_train_step` over a carrier from `init_carrier` (release gate init, dW =
    W_ft - W_base), gates on SGD, dW on the same AdamW, the multiplier chained in front; the
    frozen input is the base model. `--task_loss`: ce (default), kl_online (the SFT teacher is
    a second frozen model, its forward recomputed every step) or kl_cached (the batch carries
    the teacher's top-64 logits, `carrier_jax.distill`).

Time: calls alternate SFT, LCDD, SFT, LCDD, ... (background load on a shared machine hits both
alike); after `--warmup` calls each, the median of `--repeats` calls. Ratio = LCDD / SFT.

Memory: from XLA's analysis of each compiled step (`step.lower(...).compile()
.memory_analysis()`): arguments + outputs + temporaries - aliased bytes (the donated state's
outputs reuse its input buffers, so they are counted once). That is the bytes the program
needs live at its peak under XLA's buffer assignment: parameters, optimizer state, batch,
activations kept for the backward pass and scratch. It does not include the Python process or
the allocator's fragmentation. The target is LCDD <= SFT + one float32 copy of the model's
weights (the frozen base the carrier is added to).

Targets (issue 11): time <= 1.25x, memory <= SFT + one weight copy. Exit status 1 if missed.
"""

import argparse
import time

import numpy as np

TIME_TARGET = 1.25
MODELS = {  # name: (hidden, layers, heads, kv heads, ffn, vocab) for random Llamas
    "llama8x512": (512, 8, 8, 4, 1408, 4096),
    "llama4x256": (256, 4, 4, 2, 704, 2048),
}


def _model(name):
  import jax

  from cast_jax.models import ModelConfig, init_params, load_pretrained
  if name == "testbed":
    from cast_jax.testbed import build
    tb = build.build_testbed(progress=False)
    config, base = load_pretrained(tb.base_dir)
    _, ft = build.aligned_testbed(tb, progress=False)  # the aligned model as W_ft
    return config, base, ft
  D, L, H, K, F, V = MODELS[name]
  config = ModelConfig(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=F,
                       num_layers=L, num_heads=H, num_kv_heads=K, head_dim=D // H,
                       bos_token_id=1)
  base = init_params(config, jax.random.PRNGKey(0))
  # The "SFT" model: the base's layer matrices moved a little, embeddings / norms / head kept.
  ft = init_params(config, jax.random.PRNGKey(1), std=0.002)
  layers = {n: base["layers"][n] + ft["layers"][n] if n.startswith("w") else base["layers"][n]
            for n in base["layers"]}
  return config, base, {**base, "layers": layers}


def _batch(config, batch, seq, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, config.vocab_size, (batch, seq)).astype(np.int32)
  loss = (np.arange(seq)[None] >= seq // 2).astype(np.int32).repeat(batch, 0)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}


def _analysis(step, *args):
  """XLA's memory and cost analyses of the compiled step."""
  compiled = step.lower(*args).compile()
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
           m.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
          "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes, "peak": total,
          "flops": float(cost.get("flops", np.nan)),
          "bytes": float(cost.get("bytes accessed", np.nan))}


def bench(name, args):
  import jax
  import jax.numpy as jnp

  from carrier_jax import build_lcdd_optimizer, init_carrier, make_lcdd_train_step
  from cast_jax.train import (OptimizerConfig, TrainState, build_optimizer, make_sft_loss_fn,
                              make_train_step, partition)
  from cast_jax.train.state import weight_decay_mask

  from carrier_jax import distill
  config, base, ft = _model(name)
  batch = _batch(config, args.batch, args.seq)
  task_loss, teacher = (args.task_loss.split("_") + ["online"])[:2]
  if teacher == "cached":
    examples = list(zip(batch["input_ids"], batch["loss_mask"]))
    cache = distill.build_teacher_cache(ft, config, examples, top_k=64, pad_id=0,
                                        batch_size=args.batch, pad_multiple=args.seq)
    batch = distill.attach_teacher(batch, range(args.batch), examples, cache)
  batch = jax.device_put(batch)
  opt = OptimizerConfig(learning_rate=2e-5, schedule="constant")
  weight_bytes = sum(x.size * 4 for x in jax.tree.leaves(base))

  trainable, frozen = partition(jax.tree.map(jnp.copy, ft), True)
  sft_tx, _ = build_optimizer(opt, weight_decay_mask=weight_decay_mask(trainable))
  sft_step = make_train_step(make_sft_loss_fn(config), sft_tx)
  sft_state = TrainState.create(trainable, sft_tx, jax.random.PRNGKey(0))

  lcdd_tx = build_lcdd_optimizer(opt)
  lcdd_step = make_lcdd_train_step(config, lcdd_tx, task_loss=task_loss, teacher=teacher,
                                   remat=args.remat)
  carrier = init_carrier(config, base, ft, jax.random.PRNGKey(1))
  lcdd_state = TrainState.create(carrier, lcdd_tx, jax.random.PRNGKey(0))
  lcdd_frozen = {"base": base, "teacher": ft} if args.task_loss == "kl_online" else base

  mem = {"sft": _analysis(sft_step, sft_state, frozen, batch),
         "lcdd": _analysis(lcdd_step, lcdd_state, lcdd_frozen, batch)}
  states = {"sft": sft_state, "lcdd": lcdd_state}
  runs = {"sft": (sft_step, frozen), "lcdd": (lcdd_step, lcdd_frozen)}
  times = {"sft": [], "lcdd": []}
  for _ in range(args.warmup + args.repeats):
    for side in ("sft", "lcdd"):
      step, fz = runs[side]
      t = time.perf_counter()
      states[side], metrics = step(states[side], fz, batch)
      jax.block_until_ready((states[side], metrics))
      times[side].append(time.perf_counter() - t)
  med = {k: float(np.median(v[args.warmup:])) for k, v in times.items()}
  best = {k: float(np.min(v[args.warmup:])) for k, v in times.items()}
  ratio = med["lcdd"] / med["sft"]
  budget = mem["sft"]["peak"] + weight_bytes
  mib = lambda b: b / 2**20
  print(f"\n== {name}: L={config.num_layers} D={config.hidden_size} F={config.intermediate_size} "
        f"V={config.vocab_size}, batch {args.batch} x {args.seq}, task loss {args.task_loss}, "
        f"{jax.devices()[0].platform}")
  print(f"time per step (median of {args.repeats}, interleaved): SFT {med['sft'] * 1e3:.1f} ms, "
        f"LCDD {med['lcdd'] * 1e3:.1f} ms -> LCDD / SFT = {ratio:.3f} (target <= {TIME_TARGET})")
  print(f"  fastest calls: SFT {best['sft'] * 1e3:.1f} ms, LCDD {best['lcdd'] * 1e3:.1f} ms -> "
        f"{best['lcdd'] / best['sft']:.3f}")
  print(f"  all SFT times (ms): {[round(t * 1e3, 1) for t in times['sft']]}")
  print(f"  all LCDD times (ms): {[round(t * 1e3, 1) for t in times['lcdd']]}")
  # XLA's static cost model: independent of the machine's load.
  print(f"  XLA cost analysis: GFLOP SFT {mem['sft']['flops'] / 1e9:.2f}, LCDD "
        f"{mem['lcdd']['flops'] / 1e9:.2f} ({mem['lcdd']['flops'] / mem['sft']['flops']:.3f}x); "
        f"bytes accessed {mem['lcdd']['bytes'] / mem['sft']['bytes']:.3f}x")
  for side in ("sft", "lcdd"):
    m = mem[side]
    print(f"memory {side:4s}: peak {mib(m['peak']):8.1f} MiB = args {mib(m['argument']):.1f} + "
          f"out {mib(m['output']):.1f} + temp {mib(m['temp']):.1f} - aliased {mib(m['alias']):.1f}")
  print(f"LCDD - SFT = {mib(mem['lcdd']['peak'] - mem['sft']['peak']):.1f} MiB; one weight copy "
        f"= {mib(weight_bytes):.1f} MiB -> LCDD / (SFT + weights) = "
        f"{mem['lcdd']['peak'] / budget:.3f} (target <= 1)")
  return ratio <= TIME_TARGET and mem["lcdd"]["peak"] <= budget


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="testbed,llama8x512")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--task_loss", default="ce", choices=("ce", "kl_online", "kl_cached"))
  p.add_argument("--remat", default="full", choices=("none", "weights", "full"),
                 help="LCDD's remat mode (carrier_jax.lcdd.REMAT_MODES); SFT never remats.")
  args = p.parse_args()
  ok = [bench(name, args) for name in args.models.split(",")]
  if not all(ok):
    raise SystemExit("a target was missed (see above)")


if __name__ == "__main__":
  main()
