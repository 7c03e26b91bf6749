"""Model mixing: interpolation endpoints and the binary search on the mixing weight."""

from __future__ import annotations

import pytest
import torch

from core.models import tiny_llm
from training.mixing import calibrate_mixing, mix_models


def _pair():
    return tiny_llm(0).model, tiny_llm(1).model


def _a_of(model, orig, unl) -> float:
    """Recover the mixing weight from one weight entry (the retain score below is a function of it)."""
    name = "model.layers.0.mlp.down_proj.weight"
    p, o, u = (dict(m.named_parameters())[name].detach().flatten()[0] for m in (model, orig, unl))
    return float((p - o) / (u - o))


def test_mix_endpoints_and_midpoint():
    orig, unl = _pair()
    for a, ref in ((0.0, orig), (1.0, unl)):
        mixed = mix_models(orig, unl, a)
        for (n, x), (_, y) in zip(mixed.named_parameters(), ref.named_parameters(), strict=True):
            torch.testing.assert_close(x, y, msg=n)
    half = dict(mix_models(orig, unl, 0.5).named_parameters())
    for n, p in orig.named_parameters():
        torch.testing.assert_close(half[n], (p + dict(unl.named_parameters())[n]) / 2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mix_models(orig, unl, 1.5)


def test_binary_search_reaches_the_retain_target():
    orig, unl = _pair()
    calls = []

    def retain_score(m) -> float:  # utility falls linearly with a: 1.0 at a=0, 0.2 at a=1
        a = _a_of(m, orig, unl)
        calls.append(a)
        return 1.0 - 0.8 * a

    res = calibrate_mixing(orig, unl, retain_score, target=0.7, tol=0.01)
    assert res.reached and res.score >= 0.7
    assert 0.375 - 0.01 <= res.a <= 0.375 and len(calls) <= 2 + 8
    assert res.history[0][0] == 1.0 and res.history[1][0] == 0.0


def test_calibration_edge_cases():
    orig, unl = _pair()
    assert calibrate_mixing(orig, unl, lambda m: 0.9, target=0.5).a == 1.0  # unlearned model already good enough
    res = calibrate_mixing(orig, unl, lambda m: 0.1, target=0.5)
    assert res.a == 0.0 and not res.reached
