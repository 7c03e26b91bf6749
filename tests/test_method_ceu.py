"""CE-U: the masked target on a fixed batch, its stop-gradient, the first-token trick, a tiny run."""

from __future__ import annotations

import math
import re

import pytest
import torch

from core.models import tiny_llm, tiny_tokenizer
from eval.tasks.offline import BenchmarkConfig, generate_benchmark, training_qa
from training.finetune import FinetuneConfig, finetune
from training.loop import TrainConfig
from training.methods import METHODS
from training.methods.ceu import CEUConfig, ceu_loss, ceu_target, drop_first_answer_tokens
from training.unlearn import UnlearnConfig, unlearn

# 2 sequences x 3 positions x vocab 4, aligned: LOGITS[r, i] predicts TARGETS[r, i]; -100 is not counted.
LOGITS = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0], [1.0, 1.5, 0.7, -0.2]],
                       [[-0.5, 1.5, 0.0, 0.5], [0.0, -2.0, 2.5, 1.0], [4.0, 0.0, 0.1, 0.2]]])
TARGETS = torch.tensor([[-100, 3, 1], [2, -100, 0]])
COUNTED = [(0, 1, 3), (0, 2, 1), (1, 0, 2), (1, 2, 0)]  # (row, position, target)


def _masked(r: int, i: int, y: int) -> list[float]:
    """The model's own distribution renormalised over every token but y (y gets 0)."""
    e = [0.0 if j == y else math.exp(v) for j, v in enumerate(LOGITS[r, i].tolist())]
    return [v / sum(e) for v in e]


def test_masked_target_and_loss_match_a_hand_computation():
    t = ceu_target(LOGITS, TARGETS)
    total = 0.0
    for r, i, y in COUNTED:
        assert t[r, i].tolist() == pytest.approx(_masked(r, i, y), abs=1e-6)
        z = LOGITS[r, i].tolist()
        lse = math.log(sum(math.exp(v) for v in z))
        ce = -sum(q * (v - lse) for q, v in zip(_masked(r, i, y), z, strict=True))
        # CE = H(target) - log(1 - p(y)); the loss is the KL, CE - H(target), which has the same gradient.
        p_y = math.exp(z[y] - lse)
        entropy = -sum(q * math.log(q) for q in _masked(r, i, y) if q > 0)
        assert ce == pytest.approx(entropy - math.log(1 - p_y), rel=1e-9)
        total += ce - entropy  # the KL form: -log(1 - p(y))
    assert float(t[0, 0].abs().sum()) == 0.0 and float(t[1, 1].abs().sum()) == 0.0
    assert float(ceu_loss(LOGITS, TARGETS)) == pytest.approx(total / len(COUNTED), rel=1e-5)
    assert float(ceu_loss(LOGITS, torch.full_like(TARGETS, -100))) == 0.0  # nothing counted: no NaN


def test_no_gradient_flows_through_the_target():
    logits = LOGITS.clone().requires_grad_(True)
    assert not ceu_target(logits, TARGETS).requires_grad
    ceu_loss(logits, TARGETS).backward()
    expected = torch.zeros_like(LOGITS)
    for r, i, y in COUNTED:  # softmax(z) - t: +p(y) on the forget token, -p(v) p(y) / (1 - p(y)) elsewhere
        expected[r, i] = (torch.softmax(LOGITS[r, i], -1) - torch.tensor(_masked(r, i, y))) / 4
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    p = torch.softmax(LOGITS[0, 1], -1)
    assert float(logits.grad[0, 1, 3]) == pytest.approx(float(p[3]) / 4, rel=1e-5)


def test_first_answer_tokens_are_dropped_per_row():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100], [-100, -100, -100, -100, 4]])
    assert drop_first_answer_tokens(labels, 1).tolist() == [[-100, -100, -100, 6, 7], [-100, -100, 9, -100, -100],
                                                            [-100] * 5]
    assert drop_first_answer_tokens(labels, 2).tolist()[0] == [-100, -100, -100, -100, 7]
    assert torch.equal(drop_first_answer_tokens(labels, 0), labels)


def test_registered_with_the_reference_defaults():
    m = METHODS.get("ce-u")
    assert CEUConfig().ignore_first_n_answer_tokens == 1
    assert (m.forget_term, m.forget_direction, m.retain_term) == ("forget_nll", "up", None)
    assert m.train_defaults["max_steps"] == 30


TASK = generate_benchmark(BenchmarkConfig(num_people=4, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
SUBSET = r"layers\.1\.mlp\."


def test_forget_nll_rises_and_frozen_params_stay(tmp_path):
    llm = tiny_llm(0, num_layers=2)
    ft = FinetuneConfig(train=TrainConfig(lr=5e-3, max_steps=25, batch_size=8, warmup_ratio=0.0, save_every=100))
    finetune(llm.model, llm.tokenizer, training_qa(TASK), ft, tmp_path / "target")
    model = llm.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = UnlearnConfig(method="ce-u", max_retain=8,
                        train=TrainConfig(lr=3e-3, max_steps=6, batch_size=16, save_every=100, trainable=[SUBSET]))
    h = unlearn(model, tiny_tokenizer(), TASK, cfg, tmp_path / "out").train.history
    assert set(h[0]) == {"step", "loss", "ce_u", "forget_nll"}
    assert h[-1]["forget_nll"] > h[0]["forget_nll"] + 0.5, [x["forget_nll"] for x in h]
    assert h[-1]["ce_u"] < h[0]["ce_u"], [x["ce_u"] for x in h]
    changed = 0
    for n, p in model.named_parameters():
        if re.search(SUBSET, n):
            changed += int(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), n
    assert changed > 0
