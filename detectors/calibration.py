"""Split-conformal thresholds and the rates that describe them.

Given scores of ``n`` held-out negatives and a target false-positive rate ``alpha``, the threshold
is the ``ceil((n+1)(1-alpha))``-th smallest score, and a prompt is flagged when its score is
*strictly greater*. For a new negative exchangeable with the calibration ones,
``P(score > threshold) <= alpha`` (Vovk et al.; Angelopoulos & Bates 2021, section 1), ties included.
When ``n < 1/alpha - 1`` no finite order statistic gives the guarantee; we then fall back to the
largest calibration score and say so (``guaranteed=False``; the bound is then ``1/(n+1)``).

Raising a threshold never breaks the guarantee (``P(s > t') <= P(s > t)`` for ``t' >= t``), so
with ``placement="midpoint"`` the threshold is then moved up into the gap between the negatives and
the positives: to the logit-space midpoint of the conformal threshold and a low quantile of the
(leave-one-group-out) positive scores, when that quantile lies above it. This keeps the FPR
guarantee and buys margin against negatives the calibration set did not represent (e.g. namesakes
of a target added at run time).

Group-conditional ("Mondrian") mode takes the maximum of the pooled threshold and one threshold per
negative group (neighbour, retain, benign, ...). The guarantee then holds for each group on its
own, not only for the mixture: a pooled threshold is dominated by the many easy benign questions and
can let the few hard neighbour questions through. A group too small for its own guarantee
(``n < 1/alpha - 1``) gets none, and the report says so (``not_guaranteed``: group -> n); as the
fallback, the small groups are pooled into one ``(small groups)`` group that gets its own conformal
threshold (its guarantee then covers their mixture), and only when even that pool is too small does
the threshold fall back to its largest score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

SMALL_GROUPS = "(small groups)"


class CalibrationReport(BaseModel):
    """A calibrated threshold with the evidence behind it."""

    threshold: float = Field(ge=0.0, le=1.0)
    target_fpr: float
    n_negatives: int
    rank: int = Field(description="1-based rank of the threshold among sorted calibration scores.")
    guaranteed: bool = Field(description="False when too few negatives gave a finite conformal rank.")
    fpr_calibration: float = Field(description="Share of calibration negatives strictly above the threshold.")
    tpr: float | None = Field(None, description="Share of the positives given strictly above the threshold.")
    n_positives: int = 0
    fpr_by_group: dict[str, float] = Field(default_factory=dict)
    mode: str = Field("pooled", description="'pooled' or 'group' (max of pooled and per-group thresholds).")
    group_thresholds: dict[str, float] = Field(default_factory=dict)
    group_guaranteed: dict[str, bool] = Field(default_factory=dict)
    group_sizes: dict[str, int] = Field(default_factory=dict)
    conformal_threshold: float | None = Field(None, description="The conformal threshold before midpoint placement.")
    placement: str = "conformal"
    similarity_threshold: float | None = Field(None, description="The second decision: flag when an item's cosine to the "
                                           "nearest forget entry exceeds this where that entry is nearer than any "
                                           "known negative and no foreign name occurs; conformal at similarity_fpr on the "
                                           "same calibration items.")
    similarity_fpr: float = Field(0.0, description="The share of target_fpr the similarity decision may spend "
                                               "(the classifier's threshold is calibrated at the rest).")
    rule_fpr: float = Field(0.0, description="Share of the calibration items the rules (a stored question, a full "
                                             "name) flag; spent from target_fpr before the thresholds are set.")
    scope: str = Field("text", description="What one calibration score is: 'deployed' (a whole prompt or answer "
                                          "scored as detection does: all units, turns and rules, the max) or "
                                          "'text' (one text).")

    @property
    def not_guaranteed(self) -> dict[str, int]:
        """Groups too small for their own FPR guarantee, with their sizes (empty in pooled mode)."""
        return {g: self.group_sizes.get(g, 0) for g, ok in sorted(self.group_guaranteed.items()) if not ok}

    def guarantee_note(self) -> str:
        """One line for tables and reports: what the target FPR is guaranteed for, and what not."""
        head = f"target FPR {self.target_fpr:g}" + ("" if self.guaranteed else f" not guaranteed: n={self.n_negatives}")
        if self.rule_fpr >= self.target_fpr:
            head += f" not guaranteed: the rules alone flag {self.rule_fpr:.4f} of the calibration prompts"
        elif self.rule_fpr > 0:
            head += f" (rules flag {self.rule_fpr:.4f} of the calibration prompts, counted in it)"
        small = self.not_guaranteed
        if not small:
            return head
        return head + "; not guaranteed per group: " + ", ".join(f"{g} n={n}" for g, n in small.items())


def conformal_rank(n: int, alpha: float) -> int:
    """The 1-based rank ``ceil((n+1)(1-alpha))`` of the conformal threshold among ``n`` scores."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    # Guard against float error (e.g. 100 * 0.99 = 98.99999999999999).
    return int(math.ceil(round((n + 1) * (1.0 - alpha), 9)))


def conformal_threshold(neg_scores: Sequence[float] | np.ndarray, alpha: float,
                        warn: bool = True) -> tuple[float, int, bool]:
    """Return (threshold, rank, guaranteed) such that P(new negative > threshold) <= alpha."""
    s = np.sort(np.asarray(neg_scores, dtype=np.float64).reshape(-1))
    n = len(s)
    if n == 0:
        raise ValueError("conformal calibration needs at least one negative score")
    if not np.all(np.isfinite(s)):
        raise ValueError("calibration scores must be finite")
    k = conformal_rank(n, alpha)
    if k > n:
        log.log(logging.WARNING if warn else logging.INFO,
                "only %d calibration negatives: target FPR %.4g needs at least %d; using the maximum score "
                "(FPR bound 1/(n+1) = %.3f instead)", n, alpha, math.ceil(1.0 / alpha) - 1, 1.0 / (n + 1))
        return float(s[-1]), n, False
    return float(s[k - 1]), k, True


def rate_above(scores: Sequence[float] | np.ndarray, threshold: float) -> float:
    """Share of scores strictly above ``threshold`` (TPR for positives, FPR for negatives)."""
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    return float(np.mean(arr > threshold)) if len(arr) else float("nan")


def auroc(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (ties count one half), via the Mann-Whitney statistic."""
    p = np.asarray(pos, dtype=np.float64).reshape(-1)
    n = np.asarray(neg, dtype=np.float64).reshape(-1)
    if len(p) == 0 or len(n) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([p, n]))
    return float((ranks[: len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n)))


def _logit(p: float) -> float:
    """log(p / (1 - p)) with p clipped away from 0 and 1."""
    p = min(1.0 - 1e-9, max(1e-9, p))
    return math.log(p / (1.0 - p))


def midpoint_threshold(conformal: float, pos_scores: np.ndarray, quantile: float) -> float:
    """Move ``conformal`` up to the logit midpoint with the ``quantile`` of positive scores, if higher."""
    if len(pos_scores) == 0:
        return conformal
    p_q = float(np.quantile(np.asarray(pos_scores, dtype=np.float64), quantile, method="lower"))
    if p_q <= conformal:
        return conformal
    mid = 0.5 * (_logit(conformal) + _logit(p_q))
    return float(max(conformal, 1.0 / (1.0 + math.exp(-mid))))


def group_thresholds(scores: np.ndarray, alpha: float, groups: np.ndarray
                     ) -> tuple[dict[str, float], dict[str, bool], dict[str, int]]:
    """Conformal threshold, guarantee and size per group; groups too small for a guarantee share one threshold,
    conformal on their pooled scores (the ``(small groups)`` entry), see the module docstring."""
    g_thr: dict[str, float] = {}
    g_ok: dict[str, bool] = {}
    g_n: dict[str, int] = {}
    small = []
    for name in sorted(set(groups.tolist())):
        t_g, _, ok_g = conformal_threshold(scores[groups == name], alpha, warn=False)
        g_thr[name], g_ok[name], g_n[name] = float(t_g), ok_g, int((groups == name).sum())
        if not ok_g:
            small.append(name)
    if len(small) > 1:  # the fallback: small groups pooled, with a conformal threshold of their own when n allows
        pooled = np.isin(groups, small)
        t_s, _, ok_s = conformal_threshold(scores[pooled], alpha, warn=False)
        for name in small:
            g_thr[name] = float(t_s)
        g_thr[SMALL_GROUPS], g_ok[SMALL_GROUPS], g_n[SMALL_GROUPS] = float(t_s), ok_s, int(pooled.sum())
    return g_thr, g_ok, g_n


def calibrate(neg_scores: np.ndarray, alpha: float, pos_scores: np.ndarray | None = None,
              neg_groups: Sequence[str] | None = None, per_group: bool = False,
              placement: str = "conformal", pos_quantile: float = 0.02, scope: str = "text") -> CalibrationReport:
    """Choose the conformal threshold on ``neg_scores`` (optionally per group) and report FPR and TPR."""
    neg = np.asarray(neg_scores, dtype=np.float64).reshape(-1)
    thr, rank, ok = conformal_threshold(neg, alpha)
    g = None
    if neg_groups is not None:
        g = np.asarray([str(x) for x in neg_groups])
        if len(g) != len(neg):
            raise ValueError(f"{len(g)} groups for {len(neg)} negative scores")
    if per_group and g is None:
        raise ValueError("per-group calibration needs neg_groups")
    g_thr: dict[str, float] = {}
    g_ok: dict[str, bool] = {}
    g_n: dict[str, int] = {}
    if per_group and g is not None:
        g_thr, g_ok, g_n = group_thresholds(neg, alpha, g)
        thr = max([thr, *g_thr.values()])
    thr = float(min(1.0, max(0.0, thr)))
    conformal = thr
    if placement not in ("conformal", "midpoint"):
        raise ValueError(f"placement must be 'conformal' or 'midpoint', got {placement!r}")
    if placement == "midpoint" and pos_scores is not None:
        thr = midpoint_threshold(thr, np.asarray(pos_scores), pos_quantile)
    by_group: dict[str, float] = {}
    if g is not None:
        by_group = {name: rate_above(neg[g == name], thr) for name in sorted(set(g.tolist()))}
    return CalibrationReport(
        threshold=thr, target_fpr=alpha, n_negatives=len(neg), rank=int(np.searchsorted(np.sort(neg), thr, "right")),
        guaranteed=ok, fpr_calibration=rate_above(neg, thr),
        tpr=None if pos_scores is None else rate_above(pos_scores, thr),
        n_positives=0 if pos_scores is None else len(pos_scores), fpr_by_group=by_group,
        mode="group" if per_group else "pooled", group_thresholds=g_thr, group_guaranteed=g_ok, group_sizes=g_n,
        conformal_threshold=conformal, placement=placement, scope=scope)
