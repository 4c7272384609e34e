"""LCDD sparse behavioural carriers (lcdd-sft-eraser.md 3.1-3.2): straight-through gates, gated
weight deltas as a decoder adapter, the adaptive multiplier, the LCDD objective (SFT
cross-entropy or KL distillation to the SFT model), its early stop and its sharding."""

from carrier_jax.delta import (GATE_GROUPS, GATED_BIASES, GATED_WEIGHTS, active_channels,
                               apply_carrier, carrier_stats, delta_names, expand_v_to_heads,
                               gate_shapes, init_carrier, layer_masks, merge_carrier)
from carrier_jax.distill import (attach_teacher, build_teacher_cache, full_token_kl,
                                 topk_token_kl)
from carrier_jax.early_stop import StopConfig, make_stop_fn, stop_config, stop_reason
from carrier_jax.gates import (GateInit, count_active, count_gates, gate_values, heaviside_ste,
                               init_gate_logits, sparsity_loss)
from carrier_jax.lcdd import (GateOptimizerConfig, build_lcdd_optimizer, make_lcdd_loss_fn,
                              make_lcdd_train_step)
from carrier_jax.outputs import load_carrier, save_carrier, sparsity_report, write_outputs
from carrier_jax.sharding import carrier_shardings, carrier_specs, shard_batch, shard_state
from carrier_jax.multiplier import (MultiplierConfig, MultiplierState, find_multiplier_state,
                                    init_multiplier, multiplier_controller, multiplier_view,
                                    penalty_weight)

__all__ = [
    "GATED_BIASES", "GATED_WEIGHTS", "GATE_GROUPS", "GateInit", "GateOptimizerConfig",
    "MultiplierConfig", "MultiplierState", "StopConfig", "active_channels", "apply_carrier",
    "attach_teacher", "build_lcdd_optimizer", "build_teacher_cache", "carrier_shardings",
    "carrier_specs", "carrier_stats", "count_active", "count_gates", "delta_names",
    "expand_v_to_heads", "find_multiplier_state", "full_token_kl", "gate_shapes", "gate_values",
    "heaviside_ste", "init_carrier", "init_gate_logits", "init_multiplier", "layer_masks",
    "load_carrier", "make_lcdd_loss_fn", "make_lcdd_train_step", "make_stop_fn", "merge_carrier",
    "multiplier_controller", "multiplier_view", "penalty_weight", "save_carrier", "shard_batch",
    "shard_state", "sparsity_loss", "sparsity_report", "stop_config", "stop_reason",
    "topk_token_kl", "write_outputs",
]
