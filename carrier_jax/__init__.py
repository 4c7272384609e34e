"""LCDD sparse behavioural carriers (lcdd-sft-eraser.md 3.1-3.2): straight-through gates, gated
weight deltas as a decoder adapter, the adaptive multiplier, the LCDD objective and its early
stop."""

from carrier_jax.delta import (GATE_GROUPS, GATED_BIASES, GATED_WEIGHTS, active_channels,
                               apply_carrier, carrier_stats, delta_names, expand_v_to_heads,
                               gate_shapes, init_carrier, layer_masks, merge_carrier)
from carrier_jax.early_stop import StopConfig, make_stop_fn, stop_reason
from carrier_jax.gates import (GateInit, count_active, count_gates, gate_values, heaviside_ste,
                               init_gate_logits, sparsity_loss)
from carrier_jax.lcdd import GateOptimizerConfig, build_lcdd_optimizer, make_lcdd_loss_fn
from carrier_jax.multiplier import (MultiplierConfig, init_multiplier, make_update_extra,
                                    penalty_weight, update_multiplier)

__all__ = [
    "GATED_BIASES", "GATED_WEIGHTS", "GATE_GROUPS", "GateInit", "GateOptimizerConfig",
    "MultiplierConfig", "StopConfig", "active_channels", "apply_carrier", "build_lcdd_optimizer",
    "carrier_stats", "count_active", "count_gates", "delta_names", "expand_v_to_heads",
    "gate_shapes", "gate_values", "heaviside_ste", "init_carrier", "init_gate_logits",
    "init_multiplier", "layer_masks", "make_lcdd_loss_fn", "make_stop_fn",
    "make_update_extra", "merge_carrier", "penalty_weight", "sparsity_loss", "stop_reason",
    "update_multiplier",
]
