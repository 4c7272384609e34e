"""Chat templating, batching and dataset adapters (see docs/design.md, Batches)."""

from cast_jax.data.adapters import (WILDJAILBREAK_TYPES, gsm8k_final_answer, last_boxed,
                                    load_advbench, load_alpaca, load_commonsense_qa, load_gsm8k,
                                    load_harmbench, load_hellaswag, load_math, load_mmlu,
                                    load_style_pairs, load_wildjailbreak)
from cast_jax.data.batching import (bucket_length, collate_prompts, collate_train, encode_dataset,
                                    epoch_order, iterate_train_batches, prompt_batches,
                                    steps_per_epoch, train_batch_at, truncate_examples)
from cast_jax.data.chat import (encode_example, encode_prompt, has_chat_template,
                                render_conversation, render_prompt, special_token_ids,
                                split_rendered_turn)
from cast_jax.data.prompts import (LETTERS, MCQ_INSTRUCTION, REASONING_INSTRUCTION, answer_letter,
                                   mcq_prompt, reasoning_prompt, safety_chat_record, safety_prompt)
from cast_jax.data.readers import DataError, read_rows, resolve_fields
from cast_jax.data.records import ChatRecord, MCQRecord, ReasoningRecord, SafetyRecord, StylePair
