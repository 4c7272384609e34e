"""Train state and the trainable / frozen split of a parameter tree.

The trainer only ever sees two pytrees: `trainable` (optimised, kept fp32) and `frozen`
(passed through to the loss untouched). Full fine-tuning splits the model params with a boolean
mask; LoRA and LCDD build `trainable` themselves (adapter factors, gates + deltas) and pass the
whole base model as `frozen`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
  """Everything that changes during training and must be checkpointed for an exact resume.

  Attributes:
    step: int32 scalar, number of micro-steps (train_step calls) applied so far; it is also the
      data position (batches are indexed by step).
    trainable: the optimised pytree (fp32 master weights).
    opt_state: the optax state of `tx` over `trainable` (including the state of any
      transformation that reads extra args, e.g. the LCDD multiplier; see `make_train_step`'s
      `tx_extra_args` / `opt_state_view`).
    extra: free pytree updated inside the jitted step by `update_extra` (e.g. a running
      statistic); `{}` when unused.
    rng: uint32[2] base PRNG key; each step uses `fold_in(rng, step)`, so the key stream is a pure
      function of (seed, step) and resumes exactly.
  """

  step: jax.Array
  trainable: PyTree
  opt_state: PyTree
  extra: PyTree
  rng: jax.Array

  @classmethod
  def create(cls, trainable: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
             extra: PyTree = None) -> "TrainState":
    """A step-0 state. `rng` is a raw uint32[2] key (`jax.random.PRNGKey(seed)`).

    Typed keys (`jax.random.key`) are unwrapped to their uint32 data, because checkpoints store
    plain arrays.
    """
    rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    if rng.shape != (2,) or rng.dtype != jnp.uint32:
      raise ValueError(f"TrainState.create: rng must be a uint32[2] key, got {rng.dtype}"
                       f"{list(rng.shape)}; use jax.random.PRNGKey(seed).")
    return cls(step=jnp.zeros((), jnp.int32), trainable=trainable,
               opt_state=tx.init(trainable), extra={} if extra is None else extra, rng=rng)


def partition(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits a nested-dict params tree into (trainable, frozen) by a boolean mask.

  Args:
    params: nested dict of arrays (e.g. the decoder params in docs/design.md).
    mask: a prefix of `params` whose leaves are Python bools: `True` at a dict node makes the
      whole subtree trainable, e.g. `{"embed": False, "layers": True, "final_norm": False,
      "lm_head": False}` or `{"embed": False, "layers": {"wq": True, ...}, ...}`. Every key of
      `params` must appear in `mask` (a missing key is an error, not a silent freeze).

  Returns:
    (trainable, frozen): two nested dicts holding disjoint subsets of the leaves of `params`
    (same objects, no copies). Subtrees with no leaf on one side are dropped from that side.
  """
  trainable, frozen = _split(params, mask, "params")
  return ({} if trainable is None else trainable), ({} if frozen is None else frozen)


def _split(node, mask, path):
  if isinstance(mask, bool) or (hasattr(mask, "dtype") and getattr(mask, "shape", None) == ()):
    return (node, None) if bool(mask) else (None, node)
  if not isinstance(mask, Mapping) or not isinstance(node, Mapping):
    raise TypeError(f"partition: mask at {path} must be a bool or a dict matching the params "
                    f"dict there; got mask {type(mask).__name__} for {type(node).__name__}.")
  missing = sorted(set(node) - set(mask))
  extra = sorted(set(mask) - set(node))
  if missing or extra:
    raise KeyError(f"partition: mask at {path} does not match params: keys missing from the "
                   f"mask {missing}, keys not in params {extra}. Give every key a bool.")
  trainable, frozen = {}, {}
  for k in node:
    t, f = _split(node[k], mask[k], f"{path}/{k}")
    if t is not None:
      trainable[k] = t
    if f is not None:
      frozen[k] = f
  return (trainable or None), (frozen or None)


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `partition`: the union of two nested dicts with disjoint leaves.

  Works inside jit (pure dict manipulation). Raises if a leaf is present in both.
  """
  if not isinstance(trainable, Mapping) or not isinstance(frozen, Mapping):
    raise TypeError("merge: trainable and frozen must both be dicts (from partition); got "
                    f"{type(trainable).__name__} and {type(frozen).__name__}.")
  out = dict(frozen)
  for k, v in trainable.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
      out[k] = merge(v, out[k])
    else:
      raise ValueError(f"merge: key {k!r} is in both trainable and frozen; they must be disjoint.")
  return out


def mask_from_fn(params: PyTree, fn: Callable[[str, Any], bool]) -> PyTree:
  """A full boolean mask for `partition`: `fn("layers/wq", leaf) -> bool` for every leaf."""

  def walk(node, path):
    if isinstance(node, Mapping):
      return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
    return bool(fn(path, node))

  return walk(params, "")


def cast_floating(tree: PyTree, dtype) -> PyTree:
  """Casts the floating-point leaves of `tree` to `dtype`; integer leaves are left alone."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def tree_equal(a: PyTree, b: PyTree) -> bool:
  """Bitwise equality of two pytrees (same structure, dtypes, shapes, and bytes)."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      return False
  return True


# Matrices decay; norm weights and biases do not (HF Trainer's rule). Embeddings and the untied
# head decay too, as in HF Trainer and nanoGPT, so a run here matches those recipes' settings.
DECAYED_PARAMS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "embed", "lm_head")
UNDECAYED_PARAMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm", "bq", "bk", "bv")


def weight_decay_mask(tree: PyTree) -> PyTree:
  """AdamW decay mask (`build_optimizer(weight_decay_mask=...)`) for a decoder param tree.

  Chosen by the leaf's name, not its ndim: stacked norms are [L, D] and stacked biases
  [L, H, Dh], so a "decay only ndim >= 2" rule would decay them.

  Args:
    tree: the decoder params (docs/design.md) or any sub-tree of them, e.g. `trainable` from
      `partition`.

  Returns:
    The same nested dict with a Python bool per leaf: True for DECAYED_PARAMS, False for
    UNDECAYED_PARAMS. Any other leaf name (e.g. adapter factors) raises ValueError: build
    those trees' masks yourself rather than inherit a silent default.
  """

  def decays(path: str, leaf) -> bool:
    name = path.rsplit("/", 1)[-1]
    if name in DECAYED_PARAMS:
      return True
    if name in UNDECAYED_PARAMS:
      return False
    raise ValueError(f"weight_decay_mask: no decay rule for param {path!r}; known names decay "
                     f"{DECAYED_PARAMS} and skip {UNDECAYED_PARAMS}. Pass your own mask.")

  return mask_from_fn(tree, decays)
