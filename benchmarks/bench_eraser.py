"""One SFT-Eraser trigger step against one forward + backward of the LCDD model with respect to
its input embeddings, on the same batch, measured in one run.

  python benchmarks/bench_eraser.py [--models=llama4x256,llama8x512,testbed --batch=16
                                     --seq=64 --length=20 --repeats=7 --warmup=2
                                     --reference=tail]

LCDD model: base + a carrier from `init_carrier` (release gate init, dW = W_ft - W_base) through
`apply_carrier`, as the eraser sees it. Both sides read the same [B, seq + length, D] triggered
embeddings:
  * trigger step: `carrier_jax.eraser_train.trigger_step` (insertion, forward collecting both
    write paths, MSE at C_write against cached base targets, tail-k KL, L2, backward to the
    trigger, Adam, PGD projection);
  * reference: `jax.grad` of the LCDD model's forward with respect to input_embeds; its scalar
    reads the logits at the last `tail_k` positions (`--reference=tail`, the least a tail-k
    loss must compute) or at every position (`--reference=full`, a plain LM-loss pass).
The base targets are computed once before timing (they are cached in training too).

Time: calls alternate reference, step, reference, step, ... (`benchmarks.timing.interleaved`);
median of `--repeats` after `--warmup`. Ratio = step / reference; target (issue 12) <= 1.2.
Exit status 1 if missed.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lcdd import _model  # noqa: E402  (the same base / SFT model pairs)
from timing import interleaved  # noqa: E402

TIME_TARGET = 1.2


def bench(name, args):
  import jax
  import jax.numpy as jnp
  import optax

  from carrier_jax import eraser, eraser_train
  from carrier_jax.delta import apply_carrier, init_carrier
  from carrier_jax.trigger import init_trigger, insert_trigger
  from carrier_jax.write_channels import carrier_channels
  from cast_jax.eval import EvalModel
  from cast_jax.models import forward
  from cast_jax.models.decoder import embed

  config, base, ft = _model(name)
  carrier = init_carrier(config, base, ft, jax.random.PRNGKey(1))
  channels = carrier_channels(carrier)
  model = EvalModel(base, config, adapter_fn=apply_carrier, adapter_params=carrier)
  rng = np.random.default_rng(0)
  lengths = rng.integers(args.seq // 2, args.seq + 1, args.batch)
  bos = config.bos_token_id if config.bos_token_id is not None else 1
  ids = [[bos] + rng.integers(3, config.vocab_size, n - 1).tolist() for n in lengths]
  prompts = eraser.prompt_set(ids, pad_id=0, bos_token_id=bos, multiple=args.seq)
  cfg = eraser.EraserConfig(length=args.length, batch_size=args.batch, tail_k=args.tail_k,
                            align=args.align)
  targets = eraser.base_targets(EvalModel(base, config), prompts, channels, cfg=cfg)
  frozen = eraser.frozen_arrays(model, channels)
  trigger = init_trigger(base, config, jax.random.PRNGKey(2), args.length)
  opt = optax.adam(cfg.lr).init(trigger)
  p = jax.tree.map(jnp.asarray, prompts)
  idx = jnp.arange(args.batch)
  state = {"t": trigger, "opt": opt}

  def step():
    state["t"], state["opt"], terms = eraser_train.trigger_step(
        state["t"], state["opt"], frozen, p, targets, idx, config=config,
        adapter_fn=apply_carrier, cfg=cfg)
    jax.block_until_ready((state["t"], terms))

  ins = insert_trigger(trigger, embed(base, p["input_ids"]), p["attention_mask"],
                       p["insert_at"])
  at = None if args.reference == "full" else jnp.arange(-args.tail_k, 0)

  @jax.jit
  def ref_grad(embeds, mask, carrier):
    def scalar(e):
      logits = forward(base, config, input_embeds=e, attention_mask=mask,
                       adapter_fn=apply_carrier, adapter_params=carrier, logits_at=at)
      return jax.nn.logsumexp(logits, axis=-1).mean()
    return jax.grad(scalar)(embeds)

  def reference():
    jax.block_until_ready(ref_grad(ins.embeds, ins.attention_mask, carrier))

  (t_ref, t_step), _ = interleaved([reference, step], args.repeats, args.warmup)
  ratio = t_step / t_ref
  print(f"\n== {name}: L={config.num_layers} D={config.hidden_size} V={config.vocab_size}, "
        f"batch {args.batch} x {prompts['input_ids'].shape[1]} + trigger {args.length}, "
        f"tail-k {args.tail_k}, align {args.align}, {jax.devices()[0].platform}")
  print(f"median of {args.repeats} (interleaved): fwd+bwd wrt embeds ({args.reference} logits) "
        f"{t_ref * 1e3:.1f} ms, trigger step {t_step * 1e3:.1f} ms -> step / reference = "
        f"{ratio:.3f} (target <= {TIME_TARGET})")
  return ratio <= TIME_TARGET


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="llama4x256,llama8x512")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--length", type=int, default=20)
  p.add_argument("--tail_k", type=int, default=8)
  p.add_argument("--align", default="prompt", choices=("prompt", "mean", "last"))
  p.add_argument("--reference", default="tail", choices=("tail", "full"))
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--warmup", type=int, default=2)
  args = p.parse_args()
  ok = [bench(name, args) for name in args.models.split(",")]
  if not all(ok):
    raise SystemExit("a target was missed (see above)")


if __name__ == "__main__":
  main()
