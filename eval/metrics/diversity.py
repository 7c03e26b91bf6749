"""Answer diversity across prompts: a model that answers many different questions with one template is evasive.

Per-answer distinct-n (``distinct_n``) cannot see this: "I don't have information about that person." is
fluent and has no repeated bigram, yet a model that says it to every held-out question has stopped answering.
Corpus distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models",
arXiv 1510.03055: distinct n-grams over all n-grams of all responses) counts n-grams over every answer at once.
Deviation from the paper: words are lower-cased word tokens (the paper counts tokens as produced), so the value
does not depend on the model's tokenizer and answers of different systems are comparable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from eval.metrics.base import METRICS, MetricResult
from eval.metrics.columns import C_SETS, AnswerSheet, column

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


@METRICS.register("corpus_distinct_n")
def corpus_distinct_n(texts: Sequence[str], n: int = 2) -> MetricResult:
    """Distinct n-grams over all n-grams of all texts (0..1; low: the answers repeat one another)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(ws[i:i + n]) for t in texts for ws in [_WORD.findall(t.lower())] for i in range(len(ws) - n + 1)]
    value = len(set(grams)) / len(grams) if grams else float("nan")
    return MetricResult(name=f"corpus_distinct_{n}", value=value, details={"ngrams": len(grams)})


@column("answer_diversity_c", "distinct bigrams over all bigrams of the answers on (c) (corpus distinct-2; low: one "
        "template answers many questions, e.g. evasive non-answers)", higher_is_better=True)
def _answer_diversity(s: AnswerSheet) -> float | None:
    result = corpus_distinct_n(s.joined(C_SETS), 2)
    return None if result.details["ngrams"] == 0 else result.value
