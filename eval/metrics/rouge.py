"""ROUGE-L recall, TOFU's main generation metric, via the ``rouge-score`` package."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from eval.metrics.base import METRICS, MetricResult, check_pairs

__all__ = ["MetricResult", "rouge_l_recall"]


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    """One shared stemming ROUGE-L scorer (building it loads NLTK's stemmer)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@METRICS.register("rougeL_recall")
def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> MetricResult:
    """Mean ROUGE-L recall of predictions against references (TOFU uses recall: answers may ramble)."""
    check_pairs("predictions", predictions, "references", references)
    scores = [_scorer().score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references, strict=True)]
    return MetricResult(name="rougeL_recall", value=sum(scores) / len(scores) if scores else 0.0, per_item=scores)
