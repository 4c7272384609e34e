"""Trigger optimisation for the SFT-Eraser (lcdd-sft-eraser.md 3.3, App. D, F.3): Adam on the
trigger only, PGD projection after every step, best trigger chosen on held-out prompts, loss
curves as rows and a PNG.

The model weights are frozen jit inputs: the step differentiates `trigger_loss` with respect to
its first argument only, so no gradient or optimizer state exists for any weight.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from carrier_jax.eraser import EraserConfig, base_targets, frozen_arrays, trigger_loss
from carrier_jax.trigger import init_trigger, project_l2_ball
from cast_jax.eval.runners import EvalModel

TERMS = ("loss", "mse", "kl", "l2")


@dataclasses.dataclass(frozen=True)
class EraserResult:
  """trigger: float32 [L, D], the held-out-best one; last_trigger: after the final step;
  best_step / best_heldout: where it was chosen and its held-out terms; rows: curve rows
  {"step", "split": "train" | "heldout", "loss", "mse", "kl", "l2"}."""
  trigger: np.ndarray
  last_trigger: np.ndarray
  best_step: int
  best_heldout: dict[str, float]
  rows: list[dict[str, Any]]


def _take(tree, idx):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


@functools.partial(jax.jit, static_argnames=("config", "adapter_fn", "cfg"), donate_argnums=(1,))
def trigger_step(trigger, opt_state, frozen, prompts, targets, idx, *, config, adapter_fn, cfg):
  """One Adam step on the trigger for rows `idx` [B] of the prompt set, then the PGD
  projection. Returns (trigger [L, D], opt_state, terms)."""
  batch, tgt = _take(prompts, idx), _take(targets, idx)
  grad_fn = jax.value_and_grad(trigger_loss, has_aux=True)
  (_, terms), g = grad_fn(trigger, frozen, batch, tgt, config=config, adapter_fn=adapter_fn,
                          cfg=cfg)
  updates, opt_state = optax.adam(cfg.lr).update(g, opt_state, trigger)
  trigger = project_l2_ball(optax.apply_updates(trigger, updates), cfg.radius)
  return trigger, opt_state, terms


@functools.partial(jax.jit, static_argnames=("config", "adapter_fn", "cfg"))
def _eval_chunk(trigger, frozen, prompts, targets, idx, weight, *, config, adapter_fn, cfg):
  batch = dict(_take(prompts, idx), weight=weight)
  _, terms = trigger_loss(trigger, frozen, batch, _take(targets, idx), config=config,
                          adapter_fn=adapter_fn, cfg=cfg)
  return terms


def evaluate_trigger(trigger, model: EvalModel, channels, prompts, targets, *,
                     cfg: EraserConfig) -> dict[str, float]:
  """Loss terms of `trigger` over a whole prompt set (chunks of cfg.batch_size, each chunk's
  terms weighted by its real rows; the padding rows of the last chunk have weight 0)."""
  frozen = frozen_arrays(model, channels)
  n = prompts["input_ids"].shape[0]
  bs = cfg.batch_size
  total, count = {t: 0.0 for t in TERMS}, 0
  for s in range(0, n, bs):
    real = min(bs, n - s)
    idx = jnp.asarray(np.arange(s, s + bs) % n)
    weight = jnp.asarray((np.arange(bs) < real).astype(np.float32))
    got = _eval_chunk(jnp.asarray(trigger), frozen, prompts, targets, idx, weight,
                      config=model.config, adapter_fn=model.adapter_fn, cfg=cfg)
    for t in TERMS:
      total[t] += float(got[t]) * real
    count += real
  return {t: v / count for t, v in total.items()}


def optimize_trigger(model: EvalModel, base: EvalModel, channels: dict[str, Any],
                     train_prompts: dict[str, np.ndarray], heldout_prompts: dict[str, np.ndarray],
                     *, cfg: EraserConfig = EraserConfig(), key: jax.Array | None = None,
                     init: Any = None, exclude_ids: tuple[int, ...] = (),
                     progress: Callable[[int, dict], None] | None = None) -> EraserResult:
  """Optimises a soft trigger that reverts `model` (LCDD or SFT) to `base` (Eqs. 6-8, PGD).

  Args:
    model: the model to erase (its adapter / carrier included); base: the base model.
    channels: C_write {path: [L, D]} (`write_channels.carrier_channels(carrier)`).
    train_prompts / heldout_prompts: `eraser.prompt_set`s (the first cfg.num_prompts training
      rows are used); the held-out set only selects the best trigger.
    cfg: settings (F.3 defaults); key: PRNG key of the init and the minibatches (default:
      PRNGKey(cfg.seed)); init: a starting trigger [L, D] instead of random token embeddings.
    exclude_ids: token ids the random init never copies (e.g. special tokens).
    progress: optional callable(step, train terms) after every step (a progress bar).

  Returns:
    EraserResult (best-on-held-out trigger, curves).
  """
  key = jax.random.PRNGKey(cfg.seed) if key is None else key
  init_key, batch_key = jax.random.split(key)
  train_prompts = {k: v[:cfg.num_prompts] for k, v in train_prompts.items()}
  n = train_prompts["input_ids"].shape[0]
  if n < cfg.batch_size:
    raise ValueError(f"optimize_trigger: {n} training prompts < batch_size {cfg.batch_size}; "
                     "pass more prompts or lower cfg.batch_size.")
  targets = base_targets(base, train_prompts, channels, cfg=cfg)
  held_targets = base_targets(base, heldout_prompts, channels, cfg=cfg)
  if init is None:
    trigger = init_trigger(model.params, model.config, init_key, cfg.length, cfg.radius,
                           exclude_ids)
  else:
    trigger = project_l2_ball(jnp.asarray(init, jnp.float32), cfg.radius)
  frozen = frozen_arrays(model, channels)
  opt_state = optax.adam(cfg.lr).init(trigger)
  prompts = jax.tree.map(jnp.asarray, train_prompts)
  held = jax.tree.map(jnp.asarray, heldout_prompts)
  rows: list[dict[str, Any]] = []

  def heldout(step, t):
    got = evaluate_trigger(t, model, channels, held, held_targets, cfg=cfg)
    rows.append({"step": step, "split": "heldout", **got})
    return got

  best = (heldout(0, trigger), 0, np.asarray(trigger))
  for step in range(1, cfg.num_steps + 1):
    idx = jax.random.choice(jax.random.fold_in(batch_key, step), n, (cfg.batch_size,),
                            replace=False)
    trigger, opt_state, terms = trigger_step(trigger, opt_state, frozen, prompts, targets, idx,
                                             config=model.config, adapter_fn=model.adapter_fn,
                                             cfg=cfg)
    if step % cfg.log_every == 0 or step == cfg.num_steps or progress is not None:
      terms = {t: float(v) for t, v in terms.items()}
      if step % cfg.log_every == 0 or step == cfg.num_steps:
        rows.append({"step": step, "split": "train", **terms})
      if progress is not None:
        progress(step, terms)
    if step % cfg.eval_every == 0 or step == cfg.num_steps:
      got = heldout(step, trigger)
      if got["loss"] < best[0]["loss"]:
        best = (got, step, np.asarray(trigger))
  return EraserResult(trigger=best[2], last_trigger=np.asarray(trigger), best_step=best[1],
                      best_heldout=best[0], rows=rows)


def plot_curves(rows: list[dict[str, Any]], path: str | os.PathLike) -> str:
  """The four loss terms against the step, train and held-out, as a PNG (atomic write)."""
  from matplotlib.figure import Figure

  from cast_jax import workdir as wd
  fig = Figure(figsize=(12, 3))
  axes = fig.subplots(1, len(TERMS))
  for ax, term in zip(axes, TERMS):
    for split, style in (("train", "-"), ("heldout", "o-")):
      pts = [(r["step"], r[term]) for r in rows if r["split"] == split]
      if pts:
        ax.plot(*zip(*pts), style, label=split, markersize=3)
    ax.set(title=term, xlabel="step")
  axes[0].legend()
  return wd.save_figure(fig, path)
