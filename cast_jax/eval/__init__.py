"""Scorers and metrics: MCQ, boxed / last-number answers, refusal, fixed response, style, KL,
UCR / MMLU-CR and correlations; plus batched jitted runners that drive the decoder."""

from cast_jax.eval.answer_extraction import (ReasoningScores, answers_match, extract_boxed,
                                             extract_last_number, normalize_answer,
                                             parse_gsm8k_reference, parse_math_reference,
                                             score_reasoning)
from cast_jax.eval.divergence import KLResult, kl, teacher_forced_kl, token_kl
from cast_jax.eval.fixed_response import (FIXED_RESPONSE_KEYWORDS, FIXED_RESPONSE_MAX_WORDS,
                                          fixed_response_flags, fixed_response_rate,
                                          is_fixed_response)
from cast_jax.eval.judge import DEFAULT_JUDGE_TEMPLATE, LMJudge
from cast_jax.eval.mcq import (ChoiceTokens, answer_indices, gather_choice_logits, mcq_accuracy,
                               resolve_choice_tokens, restricted_argmax)
from cast_jax.eval.metrics import (SeedSummary, average_ranks, mean_std, mmlu_cost_ratio, pearson,
                                   spearman, utility_cost_ratio)
from cast_jax.eval.refusal import (DEFAULT_REFUSAL_PHRASES, Judge, KeywordJudge, RefusalCounts,
                                   Verdict, classify_response, classify_responses, score_refusals)
from cast_jax.eval.runners import (EvalModel, MCQResult, choice_logits_on_batch, generate_texts,
                                   next_token_choice_logits, score_mcq, score_reasoning_generation,
                                   score_refusal_generation)
from cast_jax.eval.style import ArchaicRate, archaic_word_rate, default_lexicon, tokenize_words
