"""Head-level diagnosis: ablation sweeps (and, later, per-head gradients and conflict scores)."""

from cast_jax.diagnosis.head_ablation import ablate_each_head, single_head_masks

__all__ = ["ablate_each_head", "single_head_masks"]
