"""Continual-unlearning stability over a sequence of unlearning steps: deviation (DDS) and utility stability (DUS).

DRAGON (Wang et al. 2025) evaluates continual unlearning, where forget requests arrive one after
another, with a deviation score and a utility-stability score. We could not check the paper's exact
formulas, so these are *our* definitions, chosen to match the scores' stated intent; cite them as
such. Both take one number per step ``t = 1..T`` (each measured after the t-th request):

* **DDS** (deviation score, lower is better): the mean absolute deviation of the forget score from
  its target, ``DDS = (1/T) * sum_t |s_t - s*_t|``, where ``s*`` is the ideal forget score (a
  constant such as 0 for ROUGE on forgotten facts, or per step, e.g. the retain model's score after
  the same requests). With ``scale`` (e.g. the pre-unlearning deviation ``|s_0 - s*|``) the result
  is divided by it, so 1 means "no better than before unlearning".
* **DUS** (utility stability, higher is better, in [0, 1]): one minus the relative root-mean-square
  drift of utility from a reference, ``DUS = max(0, 1 - sqrt((1/T) * sum_t (u_t - u_ref)^2) / |u_ref|)``.
  ``u_ref`` is the utility before any unlearning when given; otherwise the mean utility across
  steps, in which case DUS is one minus the coefficient of variation (population std / mean).
  A method whose utility neither decays nor fluctuates scores 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from eval.metrics.base import METRICS, MetricResult


def _series(name: str, values: Sequence[float]) -> np.ndarray:
    """A non-empty float array of per-step values, with a clear error otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty sequence of per-step numbers")
    if np.any(np.isnan(arr)):
        raise ValueError(f"{name} contains NaN at steps {np.flatnonzero(np.isnan(arr)).tolist()}")
    return arr


@METRICS.register("dds")
def deviation_score(forget_scores: Sequence[float], target: float | Sequence[float] = 0.0,
                    scale: float | None = None) -> MetricResult:
    """DDS: mean absolute deviation of per-step forget scores from their ideal (lower is better)."""
    s = _series("forget_scores", forget_scores)
    tgt = np.broadcast_to(np.asarray(target, dtype=np.float64), s.shape) if np.ndim(target) == 0 else \
        _series("target", target)  # type: ignore[arg-type]
    if tgt.shape != s.shape:
        raise ValueError(f"{s.size} forget scores but {tgt.size} targets; give one target or one per step")
    dev = np.abs(s - tgt)
    if scale is not None:
        if not scale > 0 or math.isnan(scale):
            raise ValueError(f"scale must be positive, got {scale}")
        dev = dev / scale
    return MetricResult(name="dds", value=float(dev.mean()), per_item=dev.tolist(),
                        details={"scale": scale})


@METRICS.register("dus")
def utility_stability(utilities: Sequence[float], reference: float | None = None) -> MetricResult:
    """DUS: 1 minus the relative RMS drift of per-step utility from a reference (1 = perfectly stable)."""
    u = _series("utilities", utilities)
    ref = float(u.mean()) if reference is None else float(reference)
    if ref == 0.0 or math.isnan(ref):
        raise ValueError("the reference utility is 0 or NaN; DUS is relative to it and undefined")
    rel = (u - ref) / abs(ref)
    value = max(0.0, 1.0 - float(np.sqrt(np.mean(rel ** 2))))
    return MetricResult(name="dus", value=value, per_item=rel.tolist(),
                        details={"reference": ref, "reference_given": reference is not None})
