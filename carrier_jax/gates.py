"""Binary gates learned through a straight-through estimator (lcdd-sft-eraser.md 3.2, App. B).

Each gate element has a real logit theta. The forward pass uses the exact Heaviside value
`m = 1[theta > 0]` (Eq. 26), so a trained carrier is evaluated with the very masks it was
trained with; the backward pass replaces the zero-almost-everywhere derivative of the step by
the sigmoid's, `dL/dtheta = dL/dm * sigmoid'(theta)` (Eq. 27). `sigmoid(theta)` is the
differentiable proxy for "gate on" and the sparsity loss sums it over every gate element (Eq. 3).

Initialisation. Algorithm 1 (App. C, line 1) writes theta <- 0; with the strict `theta > 0`
of Eq. 26 that starts every gate *off*, i.e. LCDD would start from the base model and the task
loss would have to switch gates on (each gate then sits where sigmoid' is largest, 1/4). The
authors' release instead draws theta ~ N(1.5, 0.5), so ~99.9% of gates start on and LCDD starts
from the full SFT model (Eq. 1 with M = 1), which is what "compress the SFT behaviour" means.
The release draw is the default here (`GateInit()`); `GateInit(mode="constant", value=0.0)` is
Algorithm 1 as written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
GATE_INIT_MODES = ("normal", "constant")


@jax.custom_vjp
def heaviside_ste(theta: jax.Array) -> jax.Array:
  """Binary gate values with a sigmoid straight-through gradient.

  Args:
    theta: gate logits, any shape, floating dtype.

  Returns:
    m, same shape and dtype: exactly 1 where theta > 0 and exactly 0 elsewhere (theta = 0 is
    off). Its VJP is `g * sigmoid(theta) * (1 - sigmoid(theta))` (Eq. 27).
  """
  return (theta > 0).astype(theta.dtype)


def _heaviside_fwd(theta):
  return heaviside_ste(theta), theta


def _heaviside_bwd(theta, g):
  # The derivative is taken in float32 so a bf16 logit near 0 still gets sigmoid'(theta) ~ 1/4
  # to bf16 precision rather than a product of two rounded sigmoids.
  s = jax.nn.sigmoid(theta.astype(jnp.float32))
  return ((g.astype(jnp.float32) * s * (1.0 - s)).astype(theta.dtype),)


heaviside_ste.defvjp(_heaviside_fwd, _heaviside_bwd)


@dataclasses.dataclass(frozen=True)
class GateInit:
  """How gate logits start.

  mode "normal": theta ~ N(mean, std^2) (the authors' release: mean 1.5, std 0.5, so
    P(theta <= 0) = Phi(-3) ~ 0.13% of gates start off).
  mode "constant": theta = value everywhere (Algorithm 1: value 0.0, every gate off at start).
  """

  mode: str = "normal"
  mean: float = 1.5
  std: float = 0.5
  value: float = 0.0

  def __post_init__(self):
    if self.mode not in GATE_INIT_MODES:
      raise ValueError(f"GateInit.mode={self.mode!r}; choose from {GATE_INIT_MODES}.")
    if self.mode == "normal" and not self.std >= 0:
      raise ValueError(f"GateInit.std={self.std!r} must be >= 0.")


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def init_gate_logits(shapes: PyTree, key: jax.Array, init: GateInit = GateInit(),
                     dtype=jnp.float32) -> PyTree:
  """Gate logits for a pytree of shapes.

  Args:
    shapes: pytree whose leaves are shape tuples (e.g. {"attn_read": (L, D), ...}).
    key: PRNG key; leaf i (in `jax.tree.flatten` order) draws from `fold_in(key, i)`.
    init: the GateInit.
    dtype: of the logits (float32: SGD at lr 0.1 on bf16 logits would lose small steps).

  Returns:
    pytree of arrays with the given shapes.
  """
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  out = []
  for i, shape in enumerate(leaves):
    if init.mode == "constant":
      out.append(jnp.full(shape, init.value, dtype))
    else:
      z = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
      out.append((init.mean + init.std * z).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def gate_values(thetas: PyTree) -> PyTree:
  """`heaviside_ste` on every leaf: the binary masks m (same shapes), STE gradient."""
  return jax.tree.map(heaviside_ste, thetas)


def sparsity_loss(thetas: PyTree) -> jax.Array:
  """Eq. 3: sum of sigmoid(theta) over every element of every leaf -> float32 scalar."""
  return sum(jnp.sum(jax.nn.sigmoid(t.astype(jnp.float32))) for t in jax.tree.leaves(thetas))


def count_active(thetas: PyTree) -> jax.Array:
  """Number of gate elements with theta > 0 over the whole tree -> int32 scalar."""
  return sum(jnp.sum(t > 0, dtype=jnp.int32) for t in jax.tree.leaves(thetas))


def count_gates(thetas: PyTree) -> int:
  """Total number of gate elements in the tree (host int)."""
  return int(sum(t.size for t in jax.tree.leaves(thetas)))
