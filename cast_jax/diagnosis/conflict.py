"""Optimization conflict O(h) of CAST section 3.2: per-unit gradients of L_safe and L_util.

The paper's unit is a query head and its parameters are its slice of W_q; `target` generalises
this to K, V (one unit per KV head) and O (one unit per query head), see `diagnosis.targets`.
One backward pass of a loss w.r.t. the whole target projection gives every unit's gradient as a
slice (e.g. `grad_wq[l, :, h, :]`, plus `bq[l, h]` when the architecture has a bias and
`include_bias`): per-unit vectors [L, U, P] (`targets.unit_vectors`), never one pass per unit.

Losses follow the issue: summed response-token cross-entropy over the whole calibration set,
divided by the set's number of target tokens; gradients of the per-batch sums are accumulated
over minibatches in float32 and divided once at the end, so the result does not depend on how
the set was cut into batches.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cast_jax.diagnosis import targets
from cast_jax.models import ModelConfig, forward
from cast_jax.models.decoder import Params
from cast_jax.train.losses import sft_token_nll

Batch = Mapping[str, np.ndarray]
DEFAULT_EPS = 1e-12


def query_params(params: Params, include_bias: bool = False) -> dict[str, jnp.ndarray]:
  """The q target's leaves: {"wq": [L, D, H, Dh]} (+ "bq": [L, H, Dh] if asked and present)."""
  return targets.target_params(params, "q", include_bias)


def _with_leaves(params: Params, leaves: dict[str, jnp.ndarray]) -> Params:
  return dict(params, layers=dict(params["layers"], **leaves))


def response_ce_sum(params: Params, config: ModelConfig, batch: Batch
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Summed next-token cross-entropy over response tokens and their count.

  Args: batch {"input_ids", "attention_mask", "loss_mask"} int [B, T], right padded
  (docs/design.md: loss_mask[b, t] = 1 marks token t, predicted at t - 1).
  Returns: (float32 sum of -log p over target tokens, float32 number of target tokens).
  """
  logits = forward(params, config, batch["input_ids"], attention_mask=batch["attention_mask"])
  w = jnp.asarray(batch["loss_mask"])[:, 1:].astype(jnp.float32)
  return jnp.sum(sft_token_nll(logits, batch["input_ids"]) * w), jnp.sum(w)


def head_vectors(grads: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
  """Gradient leaves of one target ({"wq", optional "bq"}, {"wk", ...}, ..., {"wo"}) -> per-unit
  vectors [L, U, P]: `targets.unit_vectors` (layout in `diagnosis.targets`)."""
  return targets.unit_vectors(grads)


def _batch_grad_sum(params, config, batch, include_bias, target="q"):
  """Gradient of the batch's summed CE w.r.t. the target's leaves, float32, and its token count."""

  def loss(leaves):
    return response_ce_sum(_with_leaves(params, leaves), config, batch)

  g, n = jax.grad(loss, has_aux=True)(targets.target_params(params, target, include_bias))
  return jax.tree.map(lambda x: x.astype(jnp.float32), g), n


def _accumulate(params, config, batch, total, include_bias, target):
  """total + this batch's gradient sum (one program: no eager add per batch), and its count."""
  g, n = _batch_grad_sum(params, config, batch, include_bias, target)
  return jax.tree.map(jnp.add, total, g), n


_accumulate_jit = jax.jit(_accumulate, static_argnames=("config", "include_bias", "target"))


@jax.jit
def _unit_mean(total, count):
  return targets.unit_vectors(total) / count


def head_gradients(params: Params, config: ModelConfig, batches: Iterable[Batch], *,
                   include_bias: bool = False, target: str = "q") -> tuple[jnp.ndarray, float]:
  """Per-unit gradient of L = (sum of response-token CE over all batches) / (their token count).

  Args:
    batches: training batches (`collate_train` dicts, [B, T]); equal shapes compile once.
    include_bias: append each unit's bias gradient (q / k / v of architectures with
      `attention_bias`).
    target: "q" | "k" | "v" | "o" (`diagnosis.targets`); "q" is the paper's query heads.
  Returns:
    (float32 [L, U, P] per-unit gradients (U, P in `diagnosis.targets`), total target tokens).
  """
  targets.check_target(target)
  # Zeros made on the host and transferred: no program compiles for them.
  total = jax.tree.map(lambda w: jnp.asarray(np.zeros(w.shape, np.float32)),
                       targets.target_params(params, target, include_bias))
  count, seen = 0.0, False
  for batch in batches:
    total, n = _accumulate_jit(params, config, {k: jnp.asarray(v) for k, v in batch.items()},
                               total, include_bias, target)
    count += float(n)
    seen = True
  if not seen or count == 0:
    raise ValueError("head_gradients: no target tokens in the calibration batches")
  return _unit_mean(total, jnp.float32(count)), count


@jax.jit
def head_cosine(a: jnp.ndarray, b: jnp.ndarray, eps: float = DEFAULT_EPS) -> jnp.ndarray:
  """cos(a[..., :], b[..., :]) over the last axis: a.b / max(|a| |b|, eps); [..., P] -> [...].

  The epsilon only matters for a (near) zero gradient, whose cosine is then 0 (O = 0.5).
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return dot / jnp.maximum(norms, eps)


def optimization_conflict(g_safe: jnp.ndarray, g_util: jnp.ndarray, eps: float = DEFAULT_EPS
                          ) -> tuple[np.ndarray, np.ndarray]:
  """O(h) = (1 - cos(g_safe(h), g_util(h))) / 2, Eq. 2.

  Args: g_safe, g_util [L, U, P] from `head_gradients`. Returns (cos, O), float64 [L, U].
  """
  cos = np.asarray(head_cosine(g_safe, g_util, eps), np.float64)
  return cos, (1.0 - cos) / 2.0


def _example_cosines(params, config, batch, reference, include_bias, eps, target="q"):
  """cos of each row's own gradient with `reference` [L, U, P]: [B, L, U], and row has targets."""

  def one(ids, attn, loss_mask):
    row = {"input_ids": ids[None], "attention_mask": attn[None], "loss_mask": loss_mask[None]}
    g, n = _batch_grad_sum(params, config, row, include_bias, target)
    return head_cosine(targets.unit_vectors(g), reference, eps), n > 0

  return jax.vmap(one)(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])


_example_cosines_jit = jax.jit(_example_cosines,
                               static_argnames=("config", "include_bias", "eps", "target"))


def conflict_fraction(params: Params, config: ModelConfig, batches: Iterable[Batch],
                      reference: jnp.ndarray, *, include_bias: bool = False,
                      eps: float = DEFAULT_EPS, target: str = "q") -> np.ndarray:
  """Fraction of examples whose own gradient conflicts (cos < 0) with `reference`, per unit.

  Each row's gradient (of its own summed CE; the normalisation does not change a sign) comes
  from a `jax.vmap` over the rows of a batch. Typical use: the rows of D_safe against the set
  gradient of L_util, and the rows of D_util against that of L_safe. Rows without target
  tokens (batch padding) are not counted.

  Args:
    batches: `collate_train` dicts [B, T]; memory grows with B times the target's weight size.
    reference: [L, U, P] per-unit gradient of the other objective (`head_gradients`, same
      target and include_bias).
    target: "q" | "k" | "v" | "o" (`diagnosis.targets`).
  Returns:
    float64 [L, U] in [0, 1].
  """
  targets.check_target(target)
  conflicts, rows = 0.0, 0
  for batch in batches:
    cos, real = _example_cosines_jit(params, config,
                                     {k: jnp.asarray(v) for k, v in batch.items()},
                                     jnp.asarray(reference), include_bias, eps, target)
    cos, real = np.asarray(cos), np.asarray(real)
    conflicts = conflicts + (cos[real] < 0).sum(axis=0)
    rows += int(real.sum())
  if rows == 0:
    raise ValueError("conflict_fraction: no example with target tokens")
  return np.asarray(conflicts, np.float64) / rows
