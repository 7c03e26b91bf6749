"""Temperature scaling (ga-ts, kl-ts): the tempered NLL on a fixed batch, its gradient, a few steps on a tiny model."""

from __future__ import annotations

import math
import re

import pytest
import torch
from pydantic import ValidationError

from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark, training_qa
from training.finetune import FinetuneConfig, finetune
from training.loop import TrainConfig
from training.losses import mean_nll, token_nll
from training.methods import METHODS
from training.methods.tempscale import GATSConfig, KLTSConfig, tempered_token_nll
from training.unlearn import UnlearnConfig, build_streams, collate_streams, unlearn

# 2 sequences x 3 positions x vocab 4; position t predicts labels[:, t + 1]. -100 marks prompt/padding.
LOGITS = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0], [1.0, 1.0, 1.0, 1.0]],
                       [[-0.5, 1.5, 0.0, 0.5], [0.0, -2.0, 2.5, 1.0], [4.0, 0.0, 0.0, 0.0]]])
LABELS = torch.tensor([[-100, 0, 3], [-100, 1, -100]])
COUNTED = [(0, 0, 0), (0, 1, 3), (1, 0, 1)]  # (row, position, target) of the answer tokens


def _q(row: int, pos: int, tau: float) -> list[float]:
    """softmax(z / tau) of one position, by hand."""
    e = [math.exp(v / tau) for v in LOGITS[row, pos].tolist()]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize(("tau", "mean"), [(1.0, 0.352147), (2.0, 0.724411), (3.0, 0.911124)])
def test_tempered_nll_matches_a_hand_computation(tau, mean):
    nll, mask = tempered_token_nll(LOGITS, LABELS, tau)
    assert mask.tolist() == [[True, True], [True, False]]
    for r, t, y in COUNTED:
        assert float(nll[r, t]) == pytest.approx(-math.log(_q(r, t, tau)[y]), rel=1e-5)
    expected = sum(-math.log(_q(r, t, tau)[y]) for r, t, y in COUNTED) / len(COUNTED)
    assert expected == pytest.approx(mean, rel=1e-5)
    assert float(nll.sum() / mask.sum()) == pytest.approx(expected, rel=1e-5)
    if tau == 1.0:  # no scaling is the plain NLL
        torch.testing.assert_close(nll, token_nll(LOGITS, LABELS)[0])
    else:  # tau > 1 flattens: the target of every (confidently right) answer token loses probability
        assert all(_q(r, t, tau)[y] < _q(r, t, 1.0)[y] for r, t, y in COUNTED)


def test_gradient_is_that_of_the_tempered_softmax():
    logits = LOGITS.clone().requires_grad_(True)
    nll, mask = tempered_token_nll(logits, LABELS, 2.0)
    (nll.sum() / mask.sum()).backward()
    # d/dz -log softmax(z / tau)[y] = (softmax(z / tau) - onehot(y)) / tau at each answer token, 0 elsewhere.
    expected = torch.zeros_like(LOGITS)
    for r, t, y in COUNTED:
        onehot = torch.nn.functional.one_hot(torch.tensor(y), 4)
        expected[r, t] = (torch.tensor(_q(r, t, 2.0)) - onehot) / 2.0 / len(COUNTED)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


def test_registered_with_the_authors_defaults():
    ga, kl = METHODS.get("ga-ts"), METHODS.get("kl-ts")
    assert (GATSConfig().tau, GATSConfig().gamma) == (2.0, 1.0)
    assert (KLTSConfig().tau, KLTSConfig().gamma, KLTSConfig().alpha) == (2.0, 1.0, 1.0)
    assert (ga.forget_term, ga.forget_direction, ga.retain_term) == ("forget_nll", "up", None)
    assert (kl.forget_term, kl.forget_direction, kl.retain_term) == ("forget_nll", "up", "retain_kl")
    assert ga.train_defaults["max_steps"] == kl.train_defaults["max_steps"] == 30
    with pytest.raises(ValidationError):
        GATSConfig(tau=1.0)  # the method is defined for tau > 1


TASK = generate_benchmark(BenchmarkConfig(num_people=4, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A 2-layer tiny model fitted to the task's QA (saved, so each test loads a fresh copy)."""
    out = tmp_path_factory.mktemp("ts") / "target"
    llm = tiny_llm(0, num_layers=2)
    cfg = FinetuneConfig(train=TrainConfig(lr=5e-3, max_steps=80, batch_size=8, warmup_ratio=0.0, save_every=100))
    finetune(llm.model, llm.tokenizer, training_qa(TASK), cfg, out)
    return out, llm.tokenizer


def _nll(model, tok, stream: str) -> float:
    """Mean answer NLL of a stream's examples (at most 8), in one fixed batch."""
    items = build_streams(tok, TASK, UnlearnConfig(max_retain=8))[stream]
    batch = collate_streams([{stream: {**e, "idx": i}} for i, e in enumerate(items)], tok.pad_token_id)
    with torch.no_grad():
        return float(mean_nll(model, batch[stream]))


@pytest.mark.parametrize("name", ["ga-ts", "kl-ts"])
def test_forget_nll_rises_and_frozen_params_stay(name, target_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(target_dir[0]).eval(), target_dir[1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    f0, r0 = _nll(model, tok, "forget"), _nll(model, tok, "retain")
    cfg = UnlearnConfig(method=name, max_retain=8, cache_dir=str(tmp_path / "cache"),
                        train=TrainConfig(lr=2e-3, max_steps=6, batch_size=4, save_every=100,
                                          trainable=[r"layers\.1\.mlp\."]))
    h = unlearn(model, tok, TASK, cfg, tmp_path / "out").train.history
    assert len(h) == 6 and {"forget_nll", "forget_nll_ts"} <= set(h[0])
    assert all(x["forget_nll_ts"] > x["forget_nll"] for x in h)  # flattening lowers every confident target's p
    f1, r1 = _nll(model, tok, "forget"), _nll(model, tok, "retain")
    assert f1 > f0 + 0.5, (f0, f1)
    if name == "kl-ts":  # the KL term keeps the retain answers closer than the forget answers
        assert "retain_kl" in h[0] and f1 - f0 > r1 - r0, (f0, f1, r0, r1)
    changed = 0
    for n, p in model.named_parameters():
        if re.search(r"layers\.1\.mlp\.", n):
            changed += int(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), n
    assert changed > 0
