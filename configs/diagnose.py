"""Config for launch/diagnose.py: the CAST head-level conflict diagnosis (cast.md section 3).

Override any field on the command line, e.g.
  --config.model=/path/to/hf_dir --config.safe_data=d_safe.jsonl --config.util_data=d_util.jsonl
"""

import ml_collections

from cast_jax.diagnosis.calibration import DEFAULT_REFUSAL_TARGET


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ""  # HF checkpoint dir or hub id (tokenizer from the same place)
  c.safe_data = ""  # D_safe in the WildJailbreak schema (local file or hub id); harmful rows only
  c.util_data = ""  # D_util: MMLU (util_kind mcq) or GSM8K schema (reasoning); file or hub id
  # "mcq": L_util = CE of the answer letter, H_gen from letter accuracy; "reasoning" (the paper's
  # F.4): L_util = CE of the reference solution, H_gen from generated final answers
  c.util_kind = "mcq"
  # Projection whose units are diagnosed: "q" (query heads, the paper's), "k" / "v" (KV heads;
  # ablating one zeroes every query head reading it), "o" (query heads' slices of o_proj)
  c.target = "q"
  c.n_safe = 500  # harmful prompts drawn (seeded) from safe_data; all when fewer
  c.n_util = 500  # MCQ items drawn (seeded) from util_data; all when fewer
  c.seed = 0  # which items are drawn
  c.refusal_target = DEFAULT_REFUSAL_TARGET  # L_safe's response when a record has no refusal
  c.gen_len = 64  # greedy tokens generated per D_safe prompt for the refusal rate
  c.buckets = 4  # M equal buckets by C (B1 = highest)
  c.max_len = 512  # token limit of one calibration example
  c.batch_size = 16  # calibration / sweep batch (prompts)
  c.fraction_batch_size = 4  # rows per vmapped per-example gradient (memory ~ this x W_q)
  c.mask_block = 8  # head masks decoded together in the safety sweep
  c.include_bias = False  # append each unit's q / k / v bias gradient (architectures with one)
  c.reasoning_gen_len = 256  # greedy tokens per D_util problem in the reasoning sweep
  c.reasoning_answer = "boxed"  # reasoning correctness: "boxed" (last \boxed{}) or "last_number"
  # Refusal rule of the safety sweep: "" = keyword rule (eval.refusal), else a text file with one
  # refusal string per line ('#' comments, blank lines ignored): refused iff the response
  # contains one of them (GCG-style test prefixes)
  c.refusal_prefixes = ""
  # H_safe that goes into S and C: "generation" (refusal rate of greedy generations, the
  # paper's) or "teacher_forced" (|change of the mean log-prob of refusal openings|, no decoding)
  c.safety_proxy = "generation"
  # Teacher-forced targets: "" = each D_safe prompt's calibration refusal (L_safe's target), else
  # refusal openings separated by "|" scored after every prompt, e.g. "I'm sorry|I can't"
  c.proxy_openings = ""
  c.report_proxy_spearman = False  # run both H_safe and report their Spearman rank correlation
  # JAX's persistent compilation cache (`diagnosis.compile_cache`): a later run on the same model
  # shape loads its compiled programs instead of compiling them ("" = off)
  c.compile_cache = "~/.cache/cast_jax/xla"
  return c
