"""UNDIAL: the adjusted teacher distribution on a fixed batch, its stop-gradient, the reference cache, a tiny run."""

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
from training.methods.undial import UNDIALConfig, undial_loss, undial_target
from training.unlearn import UnlearnConfig, unlearn

# 2 sequences x 3 positions x vocab 4, aligned: position i predicts TARGETS[r, i]; -100 is not counted.
STUDENT = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0], [1.0, 1.5, 0.7, -0.2]],
                        [[-0.5, 1.5, 0.0, 0.5], [0.0, -2.0, 2.5, 1.0], [4.0, 0.0, 0.1, 0.2]]])
TEACHER = torch.tensor([[[1.0, 0.0, 0.5, 2.0], [0.3, 0.1, -0.4, 2.5], [0.0, 3.0, 0.2, 0.1]],
                        [[0.2, 0.4, 2.2, -1.0], [1.0, 1.0, 1.0, 1.0], [3.5, 0.5, -0.5, 0.0]]])
TARGETS = torch.tensor([[-100, 3, 1], [2, -100, 0]])
COUNTED = [(0, 1, 3), (0, 2, 1), (1, 0, 2), (1, 2, 0)]  # (row, position, target)


def _adjusted(r: int, i: int, y: int, beta: float) -> list[float]:
    """softmax of the teacher's logits with beta taken off the forget token's, written out."""
    z = [v - (beta if j == y else 0.0) for j, v in enumerate(TEACHER[r, i].tolist())]
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("beta", [0.0, 1.0, 10.0])
def test_adjusted_distribution_and_loss_match_a_hand_computation(beta):
    t = undial_target(TEACHER, TARGETS, beta)
    total = 0.0
    for r, i, y in COUNTED:
        assert t[r, i].tolist() == pytest.approx(_adjusted(r, i, y, beta), abs=1e-6)
        zs = STUDENT[r, i].tolist()
        lse = math.log(sum(math.exp(v) for v in zs))
        t_hand = _adjusted(r, i, y, beta)  # KL(t || softmax(z)) = sum t log t - sum t log softmax(z)
        total += sum(p * math.log(p) - p * (z - lse) for p, z in zip(t_hand, zs, strict=True) if p > 0)
    assert float(t[0, 0].abs().sum()) == 0.0 and float(t[1, 1].abs().sum()) == 0.0
    assert float(undial_loss(STUDENT, TEACHER, TARGETS, beta)) == pytest.approx(total / len(COUNTED), rel=1e-5)
    if beta == 10.0:  # the forget token keeps almost none of the teacher's mass
        assert all(float(t[r, i, y]) < 1e-3 for r, i, y in COUNTED)
    if beta == 0.0:  # no adjustment and student = teacher: plain self-distillation has nothing to do
        assert float(undial_loss(TEACHER, TEACHER, TARGETS, beta)) == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_flows_through_the_teacher():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    assert not undial_target(teacher, TARGETS, 10.0).requires_grad
    undial_loss(student, teacher, TARGETS, 10.0).backward()
    assert teacher.grad is None
    expected = torch.zeros_like(STUDENT)
    for r, i, y in COUNTED:  # d CE(t, softmax(z)) / dz = softmax(z) - t, averaged over the 4 tokens
        expected[r, i] = (torch.softmax(STUDENT[r, i], -1) - torch.tensor(_adjusted(r, i, y, 10.0))) / 4
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_registered_with_the_reference_defaults():
    m = METHODS.get("undial")
    c = UNDIALConfig()
    assert (c.beta, c.gamma, c.alpha, c.retain_loss) == (10.0, 1.0, 0.0, "nll")
    assert (m.forget_term, m.forget_direction, m.retain_term) == ("forget_nll", "up", None)
    assert m.train_defaults["lr"] == 1e-4 and m.train_defaults["max_steps"] == 30


TASK = generate_benchmark(BenchmarkConfig(num_people=4, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
SUBSET = r"layers\.1\.mlp\."


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A 2-layer tiny model fine-tuned on the task's QA until it knows the answers (UNDIAL's push is p(y))."""
    out = tmp_path_factory.mktemp("undial") / "target"
    llm = tiny_llm(0, num_layers=2)
    cfg = FinetuneConfig(train=TrainConfig(lr=5e-3, max_steps=80, batch_size=8, warmup_ratio=0.0, save_every=100))
    finetune(llm.model, llm.tokenizer, training_qa(TASK), cfg, out)
    return out


def _run(target_dir, out, params):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = UnlearnConfig(method="undial", params=params, max_retain=8,
                        train=TrainConfig(lr=3e-3, max_steps=6, batch_size=16, save_every=100, trainable=[SUBSET]))
    res = unlearn(model, tiny_tokenizer(), TASK, cfg, out)
    changed = 0
    for n, p in model.named_parameters():
        if re.search(SUBSET, n):
            changed += int(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), n
    assert changed > 0
    return res.train.history


def test_forget_nll_rises_frozen_params_stay_and_the_cache_changes_nothing(target_dir, tmp_path):
    h = _run(target_dir, tmp_path / "cached", {})
    assert set(h[0]) == {"step", "loss", "undial", "forget_nll"}  # alpha=0: forget data only
    # batch 16 holds the whole forget set, so the steps' values are comparable
    assert h[-1]["forget_nll"] > h[0]["forget_nll"] + 0.2, [x["forget_nll"] for x in h]
    assert all(b["undial"] < a["undial"] for a, b in zip(h, h[1:], strict=False)), [x["undial"] for x in h]
    fresh = _run(target_dir, tmp_path / "fresh", {"cache_reference": False})
    assert [x["loss"] for x in fresh] == pytest.approx([x["loss"] for x in h], rel=1e-4)
    with_retain = _run(target_dir, tmp_path / "retain", {"alpha": 1.0})
    assert "retain_nll" in with_retain[0]
