"""PCGrad against a utility reference gradient (cast.md 4.2; Yu et al. 2020's projection).

Merge convention (both variants): a gradient is the WHOLE trainable pytree flattened into one
vector (every leaf, in tree order; for LoRA that is A and B of every layer, and a frozen
head's B gradient, exactly 0, adds nothing). Inner products and norms are global over that vector,
accumulated in float32, never per leaf or per layer. One projection per train-step call, i.e.
per micro-batch: with gradient accumulation the projected micro-batch gradients are what
optax.MultiSteps averages, and clipping (`OptimizerConfig.grad_clip_norm`) applies to the final
update gradient after projection.

  g_a: gradient of the alignment loss on a D_align batch
  g_u: gradient of the same loss on the D_util batch drawn alongside it
  dot = <g_a, g_u>

* "one_sided" (the paper's PCGrad baseline): if dot < 0, g_a <- g_a - (dot / |g_u|^2) g_u; the
  update uses g_a only (g_u is a reference, never descended on). Afterwards <g_a', g_u> = 0 up
  to rounding; with dot >= 0 (or g_u = 0) g_a is used unchanged.
* "symmetric" (two-task PCGrad): if dot < 0, each gradient is projected off the other's
  ORIGINAL vector, g_a' = g_a - (dot / |g_u|^2) g_u and g_u' = g_u - (dot / |g_a|^2) g_a, and
  the update is g_a' + g_u' (otherwise g_a + g_u). With two tasks the order Yu et al. shuffle
  does not matter, since each projection uses the other's unprojected gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from cast_jax.train.state import cast_floating

PyTree = Any
MODES = ("one_sided", "symmetric")
ALIGN, UTIL = "align", "util"


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """<a, b> over all leaves of two same-structured pytrees, float32 scalar."""
  parts = jax.tree.map(lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b)
  return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


def _axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
  """y + alpha * x, leaf by leaf, in each leaf of y's dtype."""
  return jax.tree.map(lambda xi, yi: (yi.astype(jnp.float32) + alpha * xi.astype(jnp.float32)
                                      ).astype(yi.dtype), x, y)


def _coef(dot: jax.Array, norm_sq: jax.Array) -> jax.Array:
  """dot / norm_sq where dot < 0 (a conflict), else 0 (also when norm_sq is 0: then dot is 0)."""
  safe = jnp.where(norm_sq > 0, norm_sq, 1.0)
  return jnp.where(dot < 0, dot / safe, 0.0)


def project_one_sided(g_a: PyTree, g_u: PyTree) -> tuple[PyTree, dict]:
  """One-sided PCGrad: g_a projected off g_u when they conflict (module doc).

  Args: g_a, g_u: same-structured gradient pytrees (any leaf shapes).
  Returns: (g_a' like g_a, stats: "dot" <g_a, g_u> before, "cos" their cosine, "conflict" 1.0
  if projected else 0.0; float32 scalars).
  """
  dot, na2, nu2 = tree_vdot(g_a, g_u), tree_vdot(g_a, g_a), tree_vdot(g_u, g_u)
  out = _axpy(-_coef(dot, nu2), g_u, g_a)
  return out, _stats(dot, na2, nu2)


def project_symmetric(g_a: PyTree, g_u: PyTree) -> tuple[PyTree, dict]:
  """Two-task PCGrad: (g_a off g_u) + (g_u off g_a) when they conflict, else g_a + g_u.

  Returns: (the summed update gradient like g_a, the same stats as `project_one_sided`).
  """
  dot, na2, nu2 = tree_vdot(g_a, g_u), tree_vdot(g_a, g_a), tree_vdot(g_u, g_u)
  ga = _axpy(-_coef(dot, nu2), g_u, g_a)
  gu = _axpy(-_coef(dot, na2), g_a, g_u)
  return jax.tree.map(lambda x, y: x + y, ga, gu), _stats(dot, na2, nu2)


def _stats(dot, na2, nu2) -> dict:
  denom = jnp.sqrt(na2) * jnp.sqrt(nu2)
  cos = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
  return {"dot": dot, "cos": cos, "conflict": (dot < 0).astype(jnp.float32)}


def make_pcgrad_grad_fn(loss_fn: Callable, mode: str = "one_sided", *,
                        compute_dtype: Any = None) -> Callable:
  """A `grad_fn` for `cast_jax.train.make_train_step(None, tx, grad_fn=...)`.

  Args:
    loss_fn: `loss_fn(trainable, frozen, batch, rng, extra) -> (loss, metrics)` (e.g.
      `cast_jax.tuning.train.make_lora_loss_fn`), applied to both halves of the batch.
    mode: "one_sided" or "symmetric" (module doc).
    compute_dtype: cast the floating trainable leaves to it inside the differentiated function
      (gradients stay in the master dtype), as make_train_step does for its own grad_fn.

  The step's batch is `{"align": batch, "util": batch}`, two training batches (any shapes).

  Returns:
    `grad_fn(trainable, frozen, batch, rng, extra) -> (update grads, alignment loss, metrics)`;
    metrics: the alignment loss_fn's, plus "util_loss", "pcgrad/dot" (<g_a, g_u> before
    projection), "pcgrad/cos" and "pcgrad/conflict" (1.0 when the projection fired).
  """
  if mode not in MODES:
    raise ValueError(f"make_pcgrad_grad_fn: mode={mode!r}; choose from {MODES}.")
  project = project_one_sided if mode == "one_sided" else project_symmetric

  def scalar_loss(trainable, frozen, batch, rng, extra):
    if compute_dtype is not None:
      trainable = cast_floating(trainable, compute_dtype)
    loss, metrics = loss_fn(trainable, frozen, batch, rng, extra)
    return jnp.asarray(loss, jnp.float32), metrics

  value_and_grad = jax.value_and_grad(scalar_loss, has_aux=True)

  def grad_fn(trainable, frozen, batch, rng, extra):
    if not (isinstance(batch, dict) and set(batch) == {ALIGN, UTIL}):
      raise ValueError("PCGrad step: the batch must be {'align': D_align batch, 'util': D_util "
                       f"batch}}; got keys {sorted(batch) if isinstance(batch, dict) else batch}.")
    (loss_a, metrics), g_a = value_and_grad(trainable, frozen, batch[ALIGN],
                                            jax.random.fold_in(rng, 0), extra)
    (loss_u, _), g_u = value_and_grad(trainable, frozen, batch[UTIL],
                                      jax.random.fold_in(rng, 1), extra)
    grads, stats = project(g_a, g_u)
    metrics = {**metrics, "util_loss": loss_u, **{f"pcgrad/{k}": v for k, v in stats.items()}}
    return grads, loss_a, metrics

  return grad_fn
