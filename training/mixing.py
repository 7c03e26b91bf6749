"""Model mixing calibration (Wang et al., ICLR 2025): compare unlearning methods at equal utility.

A mixed model is ``(1 - a) * theta_orig + a * theta_unlearned``; ``a = 0`` is the original and
``a = 1`` the unlearned model. :func:`calibrate_mixing` binary-searches the largest ``a`` whose
retain score (a callable supplied by the caller, e.g. retain-QA ROUGE-L) still reaches a chosen
level, assuming the score falls as ``a`` grows; forget metrics are then read at that ``a``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)


class MixResult(BaseModel):
    """The calibrated mixing weight, its retain score, and every (a, score) evaluated on the way."""

    a: float
    score: float
    target: float
    reached: bool = Field(description="False when even a=0 (the original) misses the target.")
    history: list[tuple[float, float]] = Field(default_factory=list)


def _float_state(model: Any) -> dict[str, torch.Tensor]:
    """A detached copy of a model's floating-point tensors (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def mix_into(model: Any, original: Mapping[str, torch.Tensor], unlearned: Mapping[str, torch.Tensor], a: float) -> Any:
    """Set ``model``'s floating tensors to ``(1-a) * original + a * unlearned`` in place; returns the model."""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"mixing weight a={a} must be in [0, 1]")
    missing = set(original) ^ set(unlearned)
    if missing:
        raise ValueError(f"original and unlearned models differ in tensors {sorted(missing)[:5]}...; "
                         f"mixing needs the same architecture")
    state = model.state_dict()
    with torch.no_grad():
        for k, o in original.items():
            u = unlearned[k]
            if o.shape != u.shape:
                raise ValueError(f"tensor {k}: shape {tuple(o.shape)} vs {tuple(u.shape)}; mixing needs the same architecture")
            state[k].copy_(torch.lerp(o.to(state[k].dtype), u.to(state[k].dtype), a))
    return model


def mix_models(original: Any, unlearned: Any, a: float) -> Any:
    """A new model equal to ``(1-a) * original + a * unlearned`` (``original`` is deep-copied)."""
    import copy

    out = copy.deepcopy(original)
    return mix_into(out, _float_state(original), _float_state(unlearned), a)


def calibrate_mixing(original: Any, unlearned: Any, retain_score: Callable[[Any], float], target: float,
                     tol: float = 0.01, max_iter: int = 8, work: Any = None) -> MixResult:
    """Largest ``a`` in [0, 1] with ``retain_score(mixed) >= target``, by binary search to within ``tol``.

    ``retain_score`` is called on the mixed model (``work``, a copy of ``original`` unless given,
    which is left holding the calibrated mixture). Scores at a=1 and a=0 are tried first: if the
    unlearned model already meets the target, a=1; if even the original misses it, a=0 with
    ``reached=False``.
    """
    if tol <= 0 or max_iter < 1:
        raise ValueError("tol must be > 0 and max_iter >= 1")
    o, u = _float_state(original), _float_state(unlearned)
    if work is None:
        import copy

        work = copy.deepcopy(original)
    history: list[tuple[float, float]] = []

    def score(a: float) -> float:
        s = float(retain_score(mix_into(work, o, u, a)))
        history.append((a, s))
        log.info("mixing a=%.4f: retain score %.4f (target %.4f)", a, s, target)
        return s

    s1 = score(1.0)
    if s1 >= target:
        return MixResult(a=1.0, score=s1, target=target, reached=True, history=history)
    s0 = score(0.0)
    if s0 < target:
        return MixResult(a=0.0, score=s0, target=target, reached=False, history=history)
    lo, lo_s, hi = 0.0, s0, 1.0
    for _ in range(max_iter):
        if hi - lo <= tol:
            break
        mid = (lo + hi) / 2
        s = score(mid)
        if s >= target:
            lo, lo_s = mid, s
        else:
            hi = mid
    mix_into(work, o, u, lo)
    return MixResult(a=lo, score=lo_s, target=target, reached=True, history=history)
