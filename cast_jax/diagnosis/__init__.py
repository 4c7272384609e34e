"""Head-level conflict diagnosis (CAST section 3): calibration batches (MCQ or, F.4, reasoning
D_util), per-unit gradient conflict for the q / k / v / o projections (`targets`), the batched
single-unit ablation sweep, the scores, ranks and buckets built on them, and the conflict-map
files (`report`; `stage_cache` makes a launch resumable). Each
step is a pure function; a launch script only composes them."""

from cast_jax.diagnosis.calibration import (DEFAULT_REFUSAL_TARGET, MCQSet, calibration_batches,
                                            first_target_only, safe_calibration, safe_pairs,
                                            safety_prompt_ids, util_calibration, util_pairs)
from cast_jax.diagnosis.conflict import (conflict_fraction, head_cosine, head_gradients,
                                         head_vectors, optimization_conflict, query_params,
                                         response_ce_sum)
from cast_jax.diagnosis.head_ablation import (ablate_each_head, num_units, single_head_masks,
                                             unit_masks)
from cast_jax.diagnosis.report import (bucket_record, conflict_map, heatmap_figure,
                                      summary_markdown, write_report)
from cast_jax.diagnosis.scores import (ConflictScores, bucket_bounds, bucket_of, buckets,
                                       conflict_score, percentile_ranks, ranking, score_heads,
                                       sensitivity_score, spearman)
from cast_jax.diagnosis.sensitivity import (MCQSweep, SafetySweep, decode_under_masks,
                                            layer_head_masks, mcq_sweep, refusals_under_masks,
                                            safety_blocks, safety_sweep)
from cast_jax.diagnosis.safety_proxy import (DEFAULT_OPENINGS, ProxySweep, proxy_examples,
                                             proxy_safety_sweep)
from cast_jax.diagnosis.reasoning import (ReasoningSet, ReasoningSweep, correct_under_masks,
                                          reasoning_calibration, reasoning_pairs,
                                          reasoning_response, reasoning_sweep)
from cast_jax.diagnosis.targets import (TARGETS, target_params, unit_group, unit_head_masks,
                                        unit_name, unit_vectors)

__all__ = [
    "ReasoningSet", "ReasoningSweep", "TARGETS", "correct_under_masks", "reasoning_calibration",
    "reasoning_pairs", "reasoning_response", "reasoning_sweep", "target_params", "unit_group",
    "unit_head_masks", "unit_name", "unit_vectors",
    "ConflictScores", "DEFAULT_OPENINGS", "decode_under_masks", "num_units", "safety_blocks",
    "unit_masks", "DEFAULT_REFUSAL_TARGET", "MCQSet", "MCQSweep",
    "ProxySweep", "SafetySweep", "ablate_each_head", "bucket_bounds", "bucket_of",
    "bucket_record", "buckets", "calibration_batches", "conflict_fraction", "conflict_map",
    "conflict_score", "first_target_only", "head_cosine", "head_gradients", "head_vectors",
    "heatmap_figure", "layer_head_masks", "mcq_sweep", "optimization_conflict",
    "percentile_ranks", "proxy_examples", "proxy_safety_sweep", "query_params", "ranking",
    "refusals_under_masks", "response_ce_sum", "safe_calibration", "safe_pairs",
    "safety_prompt_ids", "safety_sweep", "score_heads", "sensitivity_score", "single_head_masks",
    "spearman", "summary_markdown", "util_calibration", "util_pairs", "write_report"
]
