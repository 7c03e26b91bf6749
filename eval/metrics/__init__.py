"""Evaluation metrics, each a small tested function returning a typed result and registered in ``METRICS``.

Importing this package registers every metric: ``METRICS.get("truth_ratio")``, and every report column in
:data:`~eval.metrics.columns.COLUMNS`. Every module of the package is imported, so a new metric (or column) is one
new file (see CONTRIBUTING.md). Model-based metrics take ``(model, tokenizer, ...)`` or ``(loaded_llm, None, ...)``
and import torch only when called.
"""

from core.facts import answer_novel_span, leaked_facts, normalise_for_match, target_fact_values
from core.registry import import_submodules
from eval.metrics.base import METRICS, MetricResult, resolve_model
from eval.metrics.behaviour import (
    IGNORANCE_PATTERNS,
    REFUSAL_PATTERNS,
    FluencyStats,
    GibberishConfig,
    distinct_n,
    extract_reasoning,
    fluency_stats,
    gibberish_rate,
    is_gibberish,
    is_refusal,
    over_refusal_rate,
    refusal_kind,
    refusal_rate,
    trace_leakage,
)
from eval.metrics.continual import deviation_score, utility_stability
from eval.metrics.mcq import (
    WMDP_SUBJECTS,
    choice_length,
    choice_logprobs,
    cloze_logprobs,
    mcq_accuracy,
    mcq_prompt,
)
from eval.metrics.privacy import MIN_K_DEFAULT, mia_auc, min_k_from_logprobs, min_k_prob, privleak
from eval.metrics.qa import (
    answer_probability,
    extraction_strength,
    extraction_strength_from_greedy,
    forget_quality,
    model_utility,
    normalised_answer_probability,
    tofu_model_utility,
    tofu_split_metrics,
    tofu_utility,
    truth_ratio,
    truth_ratio_from_logprobs,
    truth_ratio_score,
    truth_ratios,
)
from eval.metrics.rouge import rouge_l_f1, rouge_l_recall
from eval.metrics.scoring import (
    TokenScores,
    next_token_logprobs,
    score_answers,
    score_continuations,
    score_texts,
    token_logprobs_from_logits,
)

import_submodules(__name__, __path__)

__all__ = [
    "answer_novel_span",
    "IGNORANCE_PATTERNS", "METRICS", "MIN_K_DEFAULT", "REFUSAL_PATTERNS", "WMDP_SUBJECTS", "FluencyStats",
    "GibberishConfig", "MetricResult", "TokenScores", "answer_probability", "choice_length", "choice_logprobs",
    "cloze_logprobs", "deviation_score", "distinct_n",
    "extract_reasoning", "extraction_strength", "extraction_strength_from_greedy", "fluency_stats",
    "forget_quality", "gibberish_rate", "is_gibberish", "is_refusal", "leaked_facts", "mcq_accuracy", "mcq_prompt",
    "mia_auc", "min_k_from_logprobs", "min_k_prob", "model_utility", "next_token_logprobs",
    "normalise_for_match", "normalised_answer_probability", "over_refusal_rate", "privleak", "refusal_kind",
    "refusal_rate", "resolve_model", "rouge_l_f1", "rouge_l_recall", "score_answers", "score_continuations",
    "score_texts", "target_fact_values", "tofu_model_utility", "tofu_split_metrics", "tofu_utility",
    "token_logprobs_from_logits", "trace_leakage", "truth_ratio", "truth_ratio_from_logprobs", "truth_ratio_score",
    "truth_ratios", "utility_stability",
]
