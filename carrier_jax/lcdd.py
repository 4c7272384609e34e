"""The LCDD objective and optimizer for the substrate trainer (lcdd-sft-eraser.md 3.2, F.2).

Training state: `trainable` is the carrier {"gates", "delta"} (`carrier_jax.delta`), `frozen`
the whole base model (embeddings, norms, LM head and the W_base matrices: nothing outside the
carrier moves), and the controller (`carrier_jax.multiplier`) a transformation chained in front
of the gate / delta optimizers, so its state is part of `opt_state`. `make_lcdd_train_step`
wires the three seams of `make_train_step`: the task loss goes to the controller as `value`, the
controller state comes back to the loss as `extra["multiplier"]`, and it is logged every step.

Per step (Algorithm 1, line 9): L = L_task + lambda_t * rho_t * sum_i sigmoid(theta_i), with the
task loss the SFT cross-entropy of the response tokens under the gated model (`task_loss="ce"`,
the paper's main setting) or KL(SFT || gated model) per response token (`task_loss="kl"`,
`carrier_jax.distill`; the controller's EMA and budget then track the KL). lambda_t * rho_t
is a constant of the step (stop_gradient): the controller, not the gradient, moves it.

With `task_loss="kl", teacher="online"` the frozen input is {"base": base params, "teacher":
SFT params} and the teacher's logits are recomputed each step; with `teacher="cached"` the
frozen input is the base params and each batch carries the teacher's top-k logits
(`distill.attach_teacher`). Note that all gates on with dW = W_ft - W_base reproduces the SFT
model, so the KL starts near 0 and the warmup's EMA (hence the budget) is only as large as the
warmup's sparsity pressure has moved the carrier: give the controller a `budget_floor`.

The frozen embeddings and head are whatever `frozen` holds. With the base model's (the default
reading of "outside the carrier is the base model") all gates on equals the SFT model only if
the SFT stage kept the embeddings and head (and norms) frozen too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from carrier_jax import distill
from carrier_jax.delta import CARRIER_WEIGHT, apply_carrier
from carrier_jax.gates import count_active, sparsity_loss
from carrier_jax.multiplier import (MultiplierConfig, multiplier_controller, multiplier_view,
                                    penalty_weight)
from cast_jax import models
from cast_jax.train import OptimizerConfig, build_optimizer, make_train_step, sft_loss

PyTree = Any
LossFn = Callable[[PyTree, PyTree, dict, jax.Array, PyTree], tuple[jax.Array, dict]]


def check_task_loss(task_loss: str, teacher: str) -> None:
  """ValueError naming the bad option (`task_loss` in distill.TASK_LOSSES, `teacher` in
  distill.TEACHERS)."""
  if task_loss not in distill.TASK_LOSSES:
    raise ValueError(f"task_loss={task_loss!r}: choose from {distill.TASK_LOSSES}.")
  if teacher not in distill.TEACHERS:
    raise ValueError(f"teacher={teacher!r}: choose from {distill.TEACHERS}.")


# remat modes of the LCDD forward (benchmarks/bench_lcdd.py, 8-layer d=512 Llama, batch 8):
# "full" (default) recomputes each layer in the backward: memory 0.983 of SFT + one weight copy
# at seq 128, 0.929 at seq 512, time 1.02x / 1.12x SFT's; "weights" keeps what SFT keeps but
# recomputes the masked weights W_base + M * dW: 1.0002 / 0.929 of the budget at 0.99x / 0.89x
# the time; "none" keeps everything (1.025 at seq 128).
REMAT_MODES = {
    "none": False,
    "weights": jax.checkpoint_policies.save_anything_except_these_names(CARRIER_WEIGHT),
    "full": True,
}


def remat_policy(remat: bool | str) -> Any:
  """The decoder's `remat` argument for an LCDD remat mode (REMAT_MODES key, or a bool)."""
  if isinstance(remat, bool):
    return remat
  if remat not in REMAT_MODES:
    raise ValueError(f"remat={remat!r}: choose from {tuple(REMAT_MODES)}.")
  return REMAT_MODES[remat]


def make_lcdd_loss_fn(config: models.ModelConfig, *, multiplier_key: str = "multiplier",
                      remat: bool | str = "full", per_sequence: bool = False, task_loss: str = "ce",
                      teacher: str = "online") -> LossFn:
  """`loss_fn(carrier, frozen, batch, rng, extra) -> (loss, metrics)` for make_train_step.

  Args:
    config: the model config.
    multiplier_key: where the controller state sits in `extra`.
    remat: a REMAT_MODES key ("full" default) or a bool (True = "full").
    per_sequence: average the task loss per row first (see `cast_jax.train.sft_loss`).
    task_loss: "ce" (SFT cross-entropy) or "kl" (KL(SFT || gated model) per response token).
    teacher: for "kl": "online" (`frozen` is {"base": base params, "teacher": SFT params}) or
      "cached" (`frozen` is the base params; the batch carries `distill.TEACHER_KEYS`).

  The batch follows the training contract (input_ids, attention_mask, loss_mask, all [B, T]);
  for "ce" and cached "kl", `frozen` is the base params tree.

  Returns:
    loss_fn. Its metrics: "task_loss" (what the controller reads), "sparsity_loss" (Eq. 3),
    "penalty_weight" (lambda_t * rho_t), "active_gates" (float32 count of theta > 0), plus
    sft_loss's "target_tokens" and "accuracy"; with "kl" also "ce" (the cross-entropy, logged
    only).
  """
  check_task_loss(task_loss, teacher)
  remat = remat_policy(remat)
  online = task_loss == "kl" and teacher == "online"

  def loss_fn(trainable, frozen, batch, rng, extra):
    del rng
    base = frozen["base"] if online else frozen
    logits = models.forward(base, config, batch["input_ids"],
                            attention_mask=batch["attention_mask"], adapter_fn=apply_carrier,
                            adapter_params=trainable, remat=remat)
    task, metrics = sft_loss(logits, batch["input_ids"], batch["loss_mask"],
                             per_sequence=per_sequence)
    if task_loss == "kl":
      if online:
        t_logits = models.forward(frozen["teacher"], config, batch["input_ids"],
                                  attention_mask=batch["attention_mask"])
        per_token = distill.full_token_kl(t_logits, logits)
      else:
        per_token = distill.cached_kl(batch, logits)
      metrics = {**metrics, "ce": task}
      task = distill.masked_mean(per_token, batch["loss_mask"], per_sequence=per_sequence)
    sparsity = sparsity_loss(trainable["gates"])
    weight = jax.lax.stop_gradient(penalty_weight(extra[multiplier_key]))
    metrics = {**metrics, "task_loss": task, "sparsity_loss": sparsity, "penalty_weight": weight,
               "active_gates": count_active(trainable["gates"]).astype(jnp.float32)}
    return task + weight * sparsity, metrics

  return loss_fn


@dataclasses.dataclass(frozen=True)
class GateOptimizerConfig:
  """SGD on the gate logits (F.2: learning rate 0.1, momentum 0)."""

  learning_rate: float = 0.1
  momentum: float = 0.0

  def __post_init__(self):
    if not self.learning_rate > 0 or not 0 <= self.momentum < 1:
      raise ValueError(f"GateOptimizerConfig: need learning_rate > 0 and 0 <= momentum < 1, got "
                       f"{self.learning_rate!r}, {self.momentum!r}.")


def build_lcdd_optimizer(delta: OptimizerConfig | None,
                         gates: GateOptimizerConfig = GateOptimizerConfig(), *,
                         multiplier: MultiplierConfig = MultiplierConfig(),
                         accum_steps: int = 1, budget_floor: float = 0.0
                         ) -> optax.GradientTransformationExtraArgs:
  """The controller, then gates on SGD and deltas on the substrate's AdamW via multi_transform.

  Args:
    delta: the dW optimizer (its accum_steps must be 1; accumulation is `accum_steps` here, so
      gates and deltas update on the same calls); None freezes dW at its initial value
      (mask-only LCDD, Appendix E).
    gates: the gate-logit SGD settings.
    multiplier: the adaptive-multiplier settings.
    accum_steps: micro-batches per optimizer update (optax.MultiSteps around both groups; the
      controller, outside it, accumulates the task loss over the same window).
    budget_floor: lower bound of the controller's budget (`multiplier_controller`; needed for
      the KL task loss, which starts at ~0).

  Returns:
    `chain(multiplier_controller, [MultiSteps](multi_transform))` over a carrier {"gates": ...,
    "delta": ...}; its update needs `value=` the task loss (`make_lcdd_train_step` passes it).
    Gradient clipping, if `delta` asks for it, applies to the dW gradients only.
  """
  if delta is not None and delta.accum_steps != 1:
    raise ValueError("build_lcdd_optimizer: set accumulation with accum_steps=, not in the "
                     "delta OptimizerConfig, so gates and deltas update together.")
  if int(accum_steps) != accum_steps or accum_steps < 1:
    raise ValueError(f"build_lcdd_optimizer: accum_steps={accum_steps!r}; use an integer >= 1.")
  gate_tx = optax.sgd(gates.learning_rate, momentum=gates.momentum or None)
  delta_tx = optax.set_to_zero() if delta is None else build_optimizer(delta)[0]

  def labels(carrier):
    return {group: jax.tree.map(lambda _: group, sub) for group, sub in carrier.items()}

  tx = optax.multi_transform({"gates": gate_tx, "delta": delta_tx}, labels)
  if accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum_steps)
  return optax.chain(multiplier_controller(multiplier, accum_steps, budget_floor=budget_floor),
                     tx)


def make_lcdd_train_step(config: models.ModelConfig, tx: optax.GradientTransformationExtraArgs,
                         **kwargs) -> Callable:
  """`make_train_step` for LCDD: `train_step(state, base_params, batch) -> (state, metrics)`.

  Args:
    config: the model config.
    tx: from `build_lcdd_optimizer` (the TrainState's opt_state must be `tx.init(carrier)`;
      `state.extra` stays {}).
    **kwargs: passed to `make_train_step` (donate, jit, compute_dtype, ...), except
      `remat`, `per_sequence`, `task_loss` and `teacher`, which go to `make_lcdd_loss_fn`.

  Returns:
    the train step; its metrics add "extra/multiplier/<field>" (the controller after the
    step) to `make_lcdd_loss_fn`'s.
  """
  loss_kw = {k: kwargs.pop(k) for k in ("remat", "per_sequence", "task_loss", "teacher")
             if k in kwargs}
  return make_train_step(make_lcdd_loss_fn(config, **loss_kw), tx,
                         tx_extra_args=lambda m: {"value": m["task_loss"]},
                         opt_state_view=multiplier_view, **kwargs)
