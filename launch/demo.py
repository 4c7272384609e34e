"""Smoke demo: tiny random HF checkpoint -> load -> greedy generation -> per-head ablation table.

  python -m launch.demo --workdir=/tmp/cast_demo [--config=configs/demo.py --config.seed=1] [-v 0]

Writes config.json, metrics.json and head_ablation.png into --workdir.
"""

import os
import tempfile

from absl import app, logging

from launch import common

_CONFIG, _WORKDIR = common.define_flags("demo.py")
# Prompt ids are drawn from [FIRST_ID, vocab_size): ids 0-2 are pad / bos / eos.
FIRST_ID = 3


def _validate(cfg) -> None:
  """Every config value the run depends on, before anything is written (app.UsageError)."""
  for name, low in (("seed", 0), ("batch_size", 1), ("prompt_len", 1), ("max_new_tokens", 0)):
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise app.UsageError(f"--config.{name}={value!r}: use an integer >= {low}.")
  m = dict(cfg.model)
  std = m.pop("init_std")
  if not std > 0:
    raise app.UsageError(f"--config.model.init_std={std!r}: use a value > 0.")
  for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim"):
    if not isinstance(m.get(name), int) or m[name] < 1:
      raise app.UsageError(f"--config.model.{name}={m.get(name)!r}: use an integer >= 1.")
  if m["vocab_size"] <= FIRST_ID:
    raise app.UsageError(f"--config.model.vocab_size={m['vocab_size']}: use > {FIRST_ID} (ids "
                         f"0-{FIRST_ID - 1} are special).")
  from cast_jax.models import ModelConfig
  try:
    ModelConfig(**m)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--config.model: {e}") from None


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from cast_jax import workdir as wd
  from cast_jax.diagnosis import ablate_each_head
  from cast_jax.generate import generate
  from cast_jax.models import ModelConfig, forward, init_params, load_pretrained, save_pretrained

  from cast_jax.models.sharding import maybe_initialize_distributed
  maybe_initialize_distributed()  # no-op on one host
  cfg = _CONFIG.value
  out = _WORKDIR.value
  common.write_config(out, cfg)
  m = dict(cfg.model)
  std = m.pop("init_std")
  config = ModelConfig(**m, eos_token_ids=(2,), pad_token_id=0, bos_token_id=1)
  key = jax.random.PRNGKey(cfg.seed)
  common.stage(f"round trip: random {config.model_type} checkpoint -> save_pretrained -> load")
  with tempfile.TemporaryDirectory() as tmp:
    path = save_pretrained(init_params(config, key, std=std), config, os.path.join(tmp, "ckpt"))
    config, params = load_pretrained(path)
    logging.info("round-tripped a random %s checkpoint through %s", config.model_type, path)

  common.stage(f"greedy generation: {cfg.batch_size} prompts x {cfg.max_new_tokens} tokens")
  rng = np.random.default_rng(cfg.seed)
  ids = rng.integers(FIRST_ID, config.vocab_size, size=(cfg.batch_size, cfg.prompt_len))
  gen = generate(params, config, ids, max_new_tokens=cfg.max_new_tokens)
  for i, row in enumerate(gen.trimmed()):
    print(f"prompt {i}: {ids[i].tolist()}\n  greedy -> {row}")

  # Per-head sanity: KL(full || head ablated) of next-token distributions, all heads in one jit.
  common.stage(f"head ablation: {config.num_layers} layers x {config.num_heads} heads")
  x = jnp.asarray(ids)
  base = jax.nn.log_softmax(forward(params, config, x))

  def kl_without(head_mask):
    lp = jax.nn.log_softmax(forward(params, config, x, head_mask=head_mask))
    return jnp.mean(jnp.sum(jnp.exp(base) * (base - lp), -1))

  table = np.asarray(jax.jit(lambda: ablate_each_head(kl_without, config))())
  print("\nKL(full || one head ablated), rows = layers, cols = heads")
  print("      " + " ".join(f"h{h:<6d}" for h in range(config.num_heads)))
  for l, row in enumerate(table):
    print(f"L{l:<4d} " + " ".join(f"{v:.5f}" for v in row))
  if not (np.all(table >= 0) and np.all(np.isfinite(table))):
    raise FloatingPointError(f"head-ablation KL must be finite and >= 0; got min {table.min()}.")

  fig, ax = plt.subplots(figsize=(6, 3))
  im = ax.imshow(table, cmap="viridis", aspect="auto")
  ax.set(xlabel="head", ylabel="layer", title="KL(full || head ablated)")
  fig.colorbar(im, ax=ax)
  wd.save_figure(fig, os.path.join(out, "head_ablation.png"))
  wd.write_json(os.path.join(out, "metrics.json"), {
      "generated_lengths": gen.lengths, "head_ablation_kl": table,
      "most_important_head": np.unravel_index(table.argmax(), table.shape)})
  common.stage(f"wrote {out}")


if __name__ == "__main__":
  common.run(main, validate=_validate)
