"""SatImp: the token weights p^beta1 (1-p)^beta2 on a fixed batch, their stop-gradient, a few steps on a tiny model."""

from __future__ import annotations

import math
import re

import pytest
import torch

from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark, training_qa
from training.finetune import FinetuneConfig, finetune
from training.loop import TrainConfig
from training.losses import mean_nll, token_nll
from training.methods import METHODS
from training.methods.satimp import SatImpConfig, satimp_weights
from training.methods.wga import weighted_token_mean
from training.unlearn import UnlearnConfig, build_streams, collate_streams, unlearn

# 2 sequences x 3 positions x vocab 4; position t predicts labels[:, t + 1]. -100 marks prompt/padding.
LOGITS = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0], [1.0, 1.0, 1.0, 1.0]],
                       [[-0.5, 1.5, 0.0, 0.5], [0.0, -2.0, 2.5, 1.0], [4.0, 0.0, 0.0, 0.0]]])
LABELS = torch.tensor([[-100, 0, 3], [-100, 1, -100]])
COUNTED = [(0, 0, 0), (0, 1, 3), (1, 0, 1)]  # (row, position, target) of the answer tokens


def _p(row: int, pos: int, y: int) -> float:
    z = LOGITS[row, pos].tolist()
    return math.exp(z[y]) / sum(math.exp(v) for v in z)


@pytest.mark.parametrize(("beta1", "beta2", "loss"), [(5.0, 1.0, 0.014708), (2.0, 0.5, 0.086341), (0.0, 0.0, 0.352147)])
def test_weights_and_weighted_nll_match_a_hand_computation(beta1, beta2, loss):
    nll, mask = token_nll(LOGITS, LABELS)
    w = satimp_weights(nll, beta1, beta2)
    for r, t, y in COUNTED:
        p = _p(r, t, y)
        assert float(w[r, t]) == pytest.approx(p ** beta1 * (1 - p) ** beta2, rel=1e-4)
    expected = sum(_p(*c) ** beta1 * (1 - _p(*c)) ** beta2 * -math.log(_p(*c)) for c in COUNTED) / len(COUNTED)
    assert expected == pytest.approx(loss, rel=1e-4)
    assert float(weighted_token_mean(nll, mask, w)) == pytest.approx(expected, rel=1e-4)


def test_weight_peaks_at_beta1_over_beta1_plus_beta2():
    p = torch.linspace(0.01, 0.99, 99)
    w = satimp_weights(-torch.log(p), 5.0, 1.0)
    assert float(p[int(w.argmax())]) == pytest.approx(5 / 6, abs=0.01)
    assert float(w.max()) == pytest.approx((5 / 6) ** 5 / 6, rel=1e-3)


def test_no_gradient_flows_through_the_weights():
    logits = LOGITS.clone().requires_grad_(True)
    nll, mask = token_nll(logits, LABELS)
    w = satimp_weights(nll, 5.0, 1.0)
    assert not w.requires_grad
    weighted_token_mean(nll, mask, w).backward()
    # With w constant, d/dz [w * NLL] / n = w (softmax(z) - onehot(y)) / n at each answer token, 0 elsewhere.
    expected = torch.zeros_like(LOGITS)
    for r, t, y in COUNTED:
        p, q = _p(r, t, y), torch.softmax(LOGITS[r, t], -1)
        expected[r, t] = p ** 5 * (1 - p) * (q - torch.nn.functional.one_hot(torch.tensor(y), 4)) / len(COUNTED)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-4, atol=1e-7)


def test_registered_with_the_reference_defaults():
    m = METHODS.get("satimp")
    cfg = SatImpConfig()
    assert (cfg.beta1, cfg.beta2, cfg.gamma, cfg.alpha, cfg.retain_loss) == (5.0, 1.0, 1.0, 0.1, "nll")
    assert (m.forget_term, m.forget_direction, m.retain_term) == ("forget_nll", "up", "retain_nll")
    assert m.train_defaults["max_steps"] == 30 and m.train_defaults["schedule"] == "constant"


TASK = generate_benchmark(BenchmarkConfig(num_people=4, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A 2-layer tiny model fitted to the task's QA, so forget tokens start with high p."""
    out = tmp_path_factory.mktemp("satimp") / "target"
    llm = tiny_llm(0, num_layers=2)
    cfg = FinetuneConfig(train=TrainConfig(lr=5e-3, max_steps=80, batch_size=8, warmup_ratio=0.0, save_every=100))
    finetune(llm.model, llm.tokenizer, training_qa(TASK), cfg, out)
    return llm


def _nll(model, tok, stream: str) -> float:
    """Mean answer NLL of a stream's examples (at most 8), in one fixed batch."""
    items = build_streams(tok, TASK, UnlearnConfig(max_retain=8))[stream]
    batch = collate_streams([{stream: {**e, "idx": i}} for i, e in enumerate(items)], tok.pad_token_id)
    with torch.no_grad():
        return float(mean_nll(model, batch[stream]))


def test_forget_nll_rises_more_than_retain_and_frozen_params_stay(target, tmp_path):
    model, tok = target.model, target.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    f0, r0 = _nll(model, tok, "forget"), _nll(model, tok, "retain")
    cfg = UnlearnConfig(method="satimp", max_retain=8, cache_dir=str(tmp_path / "cache"),
                        train=TrainConfig(lr=3e-3, max_steps=8, batch_size=4, save_every=100,
                                          trainable=[r"layers\.1\.mlp\."]))
    res = unlearn(model, tok, TASK, cfg, tmp_path / "out")
    h = res.train.history
    assert len(h) == 8 and {"forget_nll", "forget_wnll", "retain_nll"} <= set(h[0])
    assert all(x["forget_wnll"] <= 0.0671 * x["forget_nll"] + 1e-6 for x in h)  # weights <= (5/6)^5 / 6
    f1, r1 = _nll(model, tok, "forget"), _nll(model, tok, "retain")
    assert f1 > f0 + 0.05 and f1 - f0 > r1 - r0, (f0, f1, r0, r1)
    changed = 0
    for n, p in model.named_parameters():
        if re.search(r"layers\.1\.mlp\.", n):
            changed += int(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), n
    assert changed > 0
