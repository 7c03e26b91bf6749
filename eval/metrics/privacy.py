"""Membership inference for unlearning: Min-K% probability, forget-vs-holdout AUC, and MUSE's PrivLeak.

Orientation. :func:`min_k_prob` returns, per text, the mean log-probability of its k% least likely
tokens: *higher means more member-like*. :func:`mia_auc` is the conventional ROC AUC with forget
texts as the positive class, so a model that memorised the forget set scores near 1 and one that
never saw it near 0.5. MUSE (Shi et al. 2024) reports the complementary AUC (``1 - AUC``): its
``metrics/privleak.py`` labels the forget texts 0 and the holdout texts 1 and ranks by the Min-K%
log-probability, and open-unlearning's ``src/evals/metrics/privacy.py`` (``privleak``) flips its
conventional AUC with ``1 - x`` to match. So PrivLeak is strongly *negative* for an under-unlearned
model (about -100% for the target model). :func:`privleak` follows MUSE's sign by default
(``muse_convention=True``), so numbers compare with the published tables; pass
``muse_convention=False`` to use the AUCs as given.

Defaults follow the references: k = 0.4 (MUSE's ``eval.py`` scores PrivLeak on
``forget_holdout_Min-40%``; open-unlearning's ``configs/eval/{muse,tofu}_metrics/mia_min_k.yaml`` set
``k: 0.4``), and PrivLeak is in percent, as both report it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from eval.metrics.base import METRICS, MetricResult, finite_mean
from eval.metrics.scoring import score_texts

# k of Min-K% in MUSE and open-unlearning (see the module docstring).
MIN_K_DEFAULT = 0.4


def min_k_from_logprobs(token_logprobs: Sequence[float] | np.ndarray, k: float = MIN_K_DEFAULT) -> float:
    """Mean of the ``max(1, floor(n * k))`` lowest of ``n`` token log-probs; NaN for no tokens.

    The count is ``int(n * k)`` as in MUSE (``metrics/privleak.py``: ``int(len(all_prob)*ratio)``) and
    open-unlearning (``src/evals/metrics/mia/min_k.py``: ``max(1, int(len(lp) * self.k))``), with
    open-unlearning's floor of one token: MUSE would average an empty slice (NaN) for texts shorter
    than ``1/k`` tokens, where this takes the single lowest token. The sign is ours (higher = more
    member-like); both references return the negated mean.
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.size == 0:
        return float("nan")
    n = max(1, int(lp.size * k))
    return float(np.sort(lp)[:n].mean())


@METRICS.register("min_k_prob")
def min_k_prob(model: Any, tokenizer: Any | None, texts: Sequence[str], *, k: float = MIN_K_DEFAULT,
               max_length: int = 512, batch_size: int = 8) -> MetricResult:
    """Min-K% Prob (Shi et al. 2023) of each text, k = 0.4 as MUSE: higher means the model more likely trained on it."""
    scores = score_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    per = [min_k_from_logprobs(s.logprobs, k) for s in scores]
    return MetricResult(name="min_k_prob", value=finite_mean(per), per_item=per, details={"k": k})


def _scores_of(x: Sequence[float] | MetricResult) -> np.ndarray:
    """Per-text scores from a list or from a MetricResult's ``per_item`` (NaNs dropped)."""
    vals = np.asarray(x.per_item if isinstance(x, MetricResult) else x, dtype=np.float64)
    return vals[~np.isnan(vals)]


@METRICS.register("mia_auc")
def mia_auc(forget_scores: Sequence[float] | MetricResult, holdout_scores: Sequence[float] | MetricResult) -> MetricResult:
    """ROC AUC of telling forget texts (positives) from holdout texts by a member-likeness score (1 = fully exposed)."""
    from sklearn.metrics import roc_auc_score

    f, h = _scores_of(forget_scores), _scores_of(holdout_scores)
    if f.size == 0 or h.size == 0:
        raise ValueError(f"AUC needs forget and holdout scores; got {f.size} and {h.size}")
    auc = float(roc_auc_score(np.r_[np.ones(f.size), np.zeros(h.size)], np.r_[f, h]))
    return MetricResult(name="mia_auc", value=auc, details={"n_forget": int(f.size), "n_holdout": int(h.size)})


@METRICS.register("privleak")
def privleak(auc_unlearned: float | MetricResult, auc_retain: float | MetricResult, *,
             muse_convention: bool = True) -> MetricResult:
    """MUSE PrivLeak in percent: ``(AUC_unlearned - AUC_retain) / AUC_retain * 100`` (``details['fraction']`` is /100).

    As MUSE's ``eval.py`` (``out['privleak'] = (auc - AUC_RETRAIN) / AUC_RETRAIN * 100``) and
    open-unlearning's ``privleak`` (``(score - ref) / (ref + 1e-10) * 100``, without the epsilon here).
    With ``muse_convention`` the conventional AUCs of :func:`mia_auc` are first turned into MUSE's
    ``1 - AUC``, so an under-unlearned model is negative (target model about -100) and an
    over-unlearned one positive; 0 is ideal and closer to 0 is better either way.
    """
    u = auc_unlearned.value if isinstance(auc_unlearned, MetricResult) else float(auc_unlearned)
    r = auc_retain.value if isinstance(auc_retain, MetricResult) else float(auc_retain)
    for name, v in (("auc_unlearned", u), ("auc_retain", r)):
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {v}")
    if muse_convention:
        u, r = 1.0 - u, 1.0 - r
    if r == 0.0:
        raise ValueError("the reference AUC is 0 (in the chosen convention): PrivLeak is undefined")
    fraction = (u - r) / r
    return MetricResult(name="privleak", value=100.0 * fraction,
                        details={"fraction": fraction, "unit": "percent", "auc_unlearned": u, "auc_retain": r,
                                 "muse_convention": muse_convention})
