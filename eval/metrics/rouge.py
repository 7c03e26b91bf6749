"""ROUGE-L via the ``rouge-score`` package: TOFU's stemmed recall and MUSE's unstemmed F1.

* TOFU / open-unlearning's TOFU configs: ROUGE-L *recall* with Porter stemming
  (open-unlearning ``src/evals/metrics/utils.py``, ``eval_text_similarity``:
  ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True)``, ``rouge_type: rougeL_recall``).
* MUSE (verbmem and knowmem): ROUGE-L *F1* without stemming (MUSE ``metrics/logger.py``:
  ``RougeScorer([...], use_stemmer=False)``, ``score['rougeL'].fmeasure``, aggregated as
  ``mean_rougeL`` in ``eval.py``, which prints it x100).

Both score ``scorer.score(reference, prediction)`` and return NaN for an empty list: a mean over
nothing is undefined, and 0 would read as perfect forgetting.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from eval.metrics.base import METRICS, MetricResult, check_pairs

__all__ = ["MetricResult", "rouge_l_f1", "rouge_l_recall"]


@functools.lru_cache(maxsize=2)
def _scorer(use_stemmer: bool = True) -> Any:
    """One shared ROUGE-L scorer per stemming setting (building a stemming one loads NLTK's stemmer)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def _mean(scores: Sequence[float]) -> float:
    """Mean of per-item scores; NaN for none (undefined, not "nothing recalled")."""
    return sum(scores) / len(scores) if scores else float("nan")


@METRICS.register("rougeL_recall")
def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> MetricResult:
    """Mean stemmed ROUGE-L recall against references (TOFU: answers may ramble); NaN for no pairs."""
    check_pairs("predictions", predictions, "references", references)
    scores = [_scorer(True).score(ref, pred)["rougeL"].recall
              for pred, ref in zip(predictions, references, strict=True)]
    return MetricResult(name="rougeL_recall", value=_mean(scores), per_item=scores)


@METRICS.register("rougeL_f1")
def rouge_l_f1(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False) -> MetricResult:
    """Mean ROUGE-L F1 against references, unstemmed by default as MUSE scores verbmem/knowmem; NaN for no pairs.

    A fraction in [0, 1]: MUSE's tables show it x100. open-unlearning's MUSE configs use the same
    F1 but with stemming (``use_stemmer=True`` reproduces those).
    """
    check_pairs("predictions", predictions, "references", references)
    scores = [_scorer(use_stemmer).score(ref, pred)["rougeL"].fmeasure
              for pred, ref in zip(predictions, references, strict=True)]
    return MetricResult(name="rougeL_f1", value=_mean(scores), per_item=scores, details={"use_stemmer": use_stemmer})
