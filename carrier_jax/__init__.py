"""LCDD sparse behavioural carriers (lcdd-sft-eraser.md 3.1-3.2): straight-through gates, gated
weight deltas as a decoder adapter, the adaptive multiplier, the LCDD objective (SFT
cross-entropy or KL distillation to the SFT model), its early stop and its sharding; and the
SFT-Eraser (3.3): write channels C_write, soft triggers as an input, the trigger objective and
its optimisation, and a GCG-style hard-token trigger on the same objective."""

from carrier_jax.delta import (GATE_GROUPS, GATED_BIASES, GATED_WEIGHTS, active_channels,
                               apply_carrier, carrier_stats, delta_names, expand_v_to_heads,
                               gate_shapes, init_carrier, layer_masks, merge_carrier)
from carrier_jax.distill import (attach_teacher, build_teacher_cache, full_token_kl,
                                 topk_token_kl)
from carrier_jax.eraser import (EraserConfig, base_targets, frozen_arrays, prompt_set,
                                trigger_loss)
from carrier_jax.eraser_train import (EraserResult, evaluate_trigger, optimize_trigger,
                                      plot_curves, trigger_step)
from carrier_jax.early_stop import StopConfig, make_stop_fn, stop_config, stop_reason
from carrier_jax.hard_trigger import (HardTriggerConfig, HardTriggerResult, allowed_tokens,
                                      gcg_search, optimize_hard_trigger, text_equivalence,
                                      text_prompt_ids)
from carrier_jax.gates import (GateInit, count_active, count_gates, gate_values, heaviside_ste,
                               init_gate_logits, sparsity_loss)
from carrier_jax.lcdd import (GateOptimizerConfig, build_lcdd_optimizer, make_lcdd_loss_fn,
                              make_lcdd_train_step)
from carrier_jax.outputs import load_carrier, save_carrier, sparsity_report, write_outputs
from carrier_jax.trigger import (PLACES, init_trigger, insert_trigger, insertion_offsets,
                                 project_l2_ball, triggered)
from carrier_jax.write_channels import (all_channels, carrier_channels, channels_from_json,
                                        write_activations)
from carrier_jax.sharding import carrier_shardings, carrier_specs, shard_batch, shard_state
from carrier_jax.multiplier import (MultiplierConfig, MultiplierState, find_multiplier_state,
                                    init_multiplier, multiplier_controller, multiplier_view,
                                    penalty_weight)

__all__ = [
    "EraserConfig", "EraserResult", "PLACES", "all_channels", "base_targets",
    "channels_from_json", "evaluate_trigger", "frozen_arrays", "init_trigger", "insert_trigger",
    "insertion_offsets", "optimize_trigger", "plot_curves", "project_l2_ball", "prompt_set",
    "trigger_loss", "trigger_step", "triggered", "write_activations",
    "carrier_channels", "HardTriggerConfig", "HardTriggerResult", "allowed_tokens", "gcg_search",
    "optimize_hard_trigger", "text_equivalence", "text_prompt_ids",
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
