"""The LCDD objective and optimizer for the substrate trainer (lcdd-sft-eraser.md 3.2, F.2).

Training state: `trainable` is the carrier {"gates", "delta"} (`carrier_jax.delta`), `frozen`
the whole base model (embeddings, norms, LM head and the W_base matrices: nothing outside the
carrier moves), and `extra[multiplier_key]` the controller state (`carrier_jax.multiplier`),
advanced by `make_update_extra` after every optimizer update.

Per step (Algorithm 1, line 9): L = L_task + lambda_t * rho_t * sum_i sigmoid(theta_i), with the
task loss the SFT cross-entropy of the response tokens under the gated model. lambda_t * rho_t
is a constant of the step (stop_gradient): the controller, not the gradient, moves it.

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

from carrier_jax.delta import apply_carrier
from carrier_jax.gates import count_active, sparsity_loss
from carrier_jax.multiplier import penalty_weight
from cast_jax import models
from cast_jax.train import OptimizerConfig, build_optimizer, sft_loss

PyTree = Any
LossFn = Callable[[PyTree, PyTree, dict, jax.Array, PyTree], tuple[jax.Array, dict]]


def make_lcdd_loss_fn(config: models.ModelConfig, *, multiplier_key: str = "multiplier",
                      remat: bool = False, per_sequence: bool = False) -> LossFn:
  """`loss_fn(carrier, base_params, batch, rng, extra) -> (loss, metrics)` for make_train_step.

  Args:
    config: the model config.
    multiplier_key: where the controller state sits in `extra`.
    remat: rematerialise each layer in the backward pass.
    per_sequence: average the cross-entropy per row first (see `cast_jax.train.sft_loss`).

  The batch follows the training contract (input_ids, attention_mask, loss_mask, all [B, T]).

  Returns:
    loss_fn. Its metrics: "task_loss" (what the controller reads), "sparsity_loss" (Eq. 3),
    "penalty_weight" (lambda_t * rho_t), "active_gates" (float32 count of theta > 0), plus
    sft_loss's "target_tokens" and "accuracy".
  """

  def loss_fn(trainable, frozen, batch, rng, extra):
    del rng
    logits = models.forward(frozen, config, batch["input_ids"],
                            attention_mask=batch["attention_mask"], adapter_fn=apply_carrier,
                            adapter_params=trainable, remat=remat)
    task, metrics = sft_loss(logits, batch["input_ids"], batch["loss_mask"],
                             per_sequence=per_sequence)
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
                         accum_steps: int = 1) -> optax.GradientTransformation:
  """Gates on SGD, deltas on the substrate's AdamW (schedule, clipping), via multi_transform.

  Args:
    delta: the dW optimizer (its accum_steps must be 1; accumulation is `accum_steps` here, so
      gates and deltas update on the same calls); None freezes dW at its initial value
      (mask-only LCDD, Appendix E).
    gates: the gate-logit SGD settings.
    accum_steps: micro-batches per optimizer update (optax.MultiSteps around both groups);
      give the multiplier the same number.

  Returns:
    a GradientTransformation over a carrier {"gates": ..., "delta": ...}. Gradient clipping,
    if `delta` asks for it, applies to the dW gradients only.
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
  return optax.MultiSteps(tx, every_k_schedule=accum_steps) if accum_steps > 1 else tx
