"""CAST sparse tuning (cast.md 3.5, 4.2): head-restricted LoRA on W_q through the decoder's
adapter seam, budget-matched head sets from a conflict map, PCGrad against a utility reference
gradient, and export to PEFT / merged HF checkpoints."""

from cast_jax.tuning.head_sets import (all_heads_mask, bottom_count_mask, bottom_fraction_mask,
                                       bucket_mask, fraction_count, heads_to_mask, mask_to_heads,
                                       random_mask, top_count_mask, top_fraction_mask)
from cast_jax.tuning.lora import (LoraConfig, adapter_params, apply_lora, check_head_mask,
                                  init_lora, lora_delta, make_adapter_fn, merge_lora)
from cast_jax.tuning.pcgrad import (make_pcgrad_grad_fn, project_one_sided, project_symmetric,
                                    tree_vdot)
from cast_jax.tuning.peft_export import (adapter_config, load_peft_adapter, peft_state_dict,
                                         save_merged, save_peft_adapter)
from cast_jax.tuning.evaluation import EvalSets, evaluate_alignment, load_eval_sets
from cast_jax.tuning.experiment import (RunSpec, bucket_table, correlation_table, drift_stats,
                                        method_table, plan_runs, table_markdown)
from cast_jax.tuning.runner import (ConflictTables, Recipe, head_set_mask, load_conflict_map,
                                    run_alignment, run_base)
from cast_jax.tuning.train import (check_pcgrad_batch, count_trainable, lora_frozen,
                                   make_lora_loss_fn, make_lora_train_step, run_lora)

__all__ = [
    "ConflictTables", "EvalSets", "Recipe", "RunSpec", "bucket_table", "correlation_table",
    "drift_stats", "evaluate_alignment", "head_set_mask", "load_conflict_map", "load_eval_sets",
    "method_table", "plan_runs", "run_alignment", "run_base", "table_markdown",
    "LoraConfig", "adapter_config", "adapter_params", "all_heads_mask", "apply_lora",
    "bottom_count_mask", "bottom_fraction_mask", "bucket_mask", "check_head_mask",
    "check_pcgrad_batch", "count_trainable", "fraction_count", "heads_to_mask", "init_lora",
    "load_peft_adapter", "lora_delta", "lora_frozen", "make_adapter_fn", "make_lora_loss_fn",
    "make_lora_train_step", "make_pcgrad_grad_fn", "mask_to_heads", "merge_lora",
    "peft_state_dict", "project_one_sided", "project_symmetric", "random_mask", "run_lora",
    "save_merged", "save_peft_adapter", "top_count_mask", "top_fraction_mask", "tree_vdot",
]
