"""BS-T and BS-S: the mixed target on a fixed batch, its stop-gradient, cached samples, a few steps on a tiny model."""

from __future__ import annotations

import math
import re

import pytest
import torch

from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark, training_qa
from training.finetune import FinetuneConfig, finetune
from training.loop import TrainConfig
from training.methods import METHODS
from training.methods.bootstrap import BSSConfig, BSTConfig, bst_loss, bst_target
from training.unlearn import UnlearnConfig, unlearn

# 2 sequences x 3 positions x vocab 4, aligned: LOGITS[r, i] predicts TARGETS[r, i]; -100 is not counted.
LOGITS = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0], [1.0, 1.5, 0.7, -0.2]],
                       [[-0.5, 1.5, 0.0, 0.5], [0.0, -2.0, 2.5, 1.0], [4.0, 0.0, 0.1, 0.2]]])
TARGETS = torch.tensor([[-100, 3, 1], [2, -100, 0]])
COUNTED = [(0, 1, 3), (0, 2, 1), (1, 0, 2), (1, 2, 0)]  # (row, position, target)


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _target(r: int, i: int, y: int, lam: float, k: int) -> list[float]:
    """Straight from the paper: lam * softmax over the k largest logits (0 elsewhere) + (1 - lam) * onehot(y)."""
    z = LOGITS[r, i].tolist()
    top = sorted(range(4), key=lambda v: -z[v])[:k]
    norm = sum(math.exp(z[v]) for v in top)
    q = [math.exp(z[v]) / norm if v in top else 0.0 for v in range(4)]
    return [lam * q[v] + (1 - lam) * (v == y) for v in range(4)]


@pytest.mark.parametrize(("lam", "k"), [(0.2, 2), (0.5, 4), (0.0, 2), (1.0, 1)])
def test_mixed_target_and_loss_match_a_hand_computation(lam, k):
    t = bst_target(LOGITS, TARGETS, lam, k)
    for r, i, y in COUNTED:
        assert t[r, i].tolist() == pytest.approx(_target(r, i, y, lam, k), abs=1e-6)
    assert float(t[0, 0].abs().sum()) == 0.0 and float(t[1, 1].abs().sum()) == 0.0  # uncounted positions
    per_row: dict[int, list[float]] = {0: [], 1: []}
    for r, i, y in COUNTED:
        logp = [math.log(p) for p in _softmax(LOGITS[r, i].tolist())]
        per_row[r].append(sum(a * b for a, b in zip(_target(r, i, y, lam, k), logp, strict=True)))
    expected = sum(sum(v) / len(v) for v in per_row.values()) / 2
    assert float(bst_loss(LOGITS, TARGETS, lam, k)) == pytest.approx(expected, rel=1e-5)
    if lam == 0.0:  # no belief: GA's ascent term, -NLL of the forget tokens
        ga = -sum(-math.log(_softmax(LOGITS[r, i].tolist())[y]) for r, i, y in COUNTED[:2]) / 2
        ga += -sum(-math.log(_softmax(LOGITS[r, i].tolist())[y]) for r, i, y in COUNTED[2:]) / 2
        assert float(bst_loss(LOGITS, TARGETS, lam, k)) == pytest.approx(ga / 2, rel=1e-5)


def test_no_gradient_flows_through_the_belief():
    logits = LOGITS.clone().requires_grad_(True)
    assert not bst_target(logits, TARGETS, 0.2, 2).requires_grad
    bst_loss(logits, TARGETS, 0.2, 2).backward()
    # With t constant, d/dz <t, log softmax(z)> = t - softmax(z); each row's 2 tokens are averaged, then the 2 rows.
    expected = torch.zeros_like(LOGITS)
    for r, i, y in COUNTED:
        expected[r, i] = (torch.tensor(_target(r, i, y, 0.2, 2)) - torch.softmax(LOGITS[r, i], -1)) / 4
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


def test_registered_with_the_reference_defaults():
    t, s = METHODS.get("bs-t"), METHODS.get("bs-s")
    assert (BSTConfig().lambda_bst, BSTConfig().top_k, BSTConfig().alpha) == (0.2, 20, 1.0)
    c = BSSConfig()
    assert (c.lambda_bss, c.n_samples, c.temperature, c.forget_loss) == (0.5, 3, 1.0, "ga")
    for m in (t, s):
        assert (m.forget_term, m.forget_direction, m.retain_term) == ("forget_nll", "up", "retain_nll")
        assert m.train_defaults["max_steps"] == 30
    with pytest.raises(ValueError):
        BSTConfig(lambda_bst=1.5)


TASK = generate_benchmark(BenchmarkConfig(num_people=4, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
SUBSET = r"layers\.1\.mlp\."


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A 2-layer tiny model fine-tuned on the task's QA, saved (each test loads a fresh copy)."""
    out = tmp_path_factory.mktemp("bs") / "target"
    llm = tiny_llm(0, num_layers=2)
    cfg = FinetuneConfig(train=TrainConfig(lr=5e-3, max_steps=25, batch_size=8, warmup_ratio=0.0, save_every=100))
    finetune(llm.model, llm.tokenizer, training_qa(TASK), cfg, out)
    return out


def _load(target_dir):
    from transformers import AutoModelForCausalLM

    from core.models import tiny_tokenizer

    return AutoModelForCausalLM.from_pretrained(target_dir).eval(), tiny_tokenizer()


def _run(method, target_dir, tmp_path, params=None, steps=6, name="out"):
    model, tok = _load(target_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = UnlearnConfig(method=method, params=params or {}, max_retain=8, cache_dir=str(tmp_path / "cache"),
                        train=TrainConfig(lr=3e-3, max_steps=steps, batch_size=4, save_every=100, trainable=[SUBSET]))
    res = unlearn(model, tok, TASK, cfg, tmp_path / name)
    changed = 0
    for n, p in model.named_parameters():
        if re.search(SUBSET, n):
            changed += int(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), n
    assert changed > 0
    return res


def test_bs_t_forget_nll_rises_and_frozen_params_stay(target_dir, tmp_path):
    h = _run("bs-t", target_dir, tmp_path).train.history
    assert {"bs_t", "forget_nll", "retain_nll"} <= set(h[0])
    assert h[-1]["forget_nll"] > h[0]["forget_nll"] + 0.5, [x["forget_nll"] for x in h]
    assert h[-1]["bs_t"] < h[0]["bs_t"]


def test_bs_s_samples_once_caches_and_suppresses_them(target_dir, tmp_path, monkeypatch):
    import training.methods.bootstrap as bs

    calls = []
    real = bs.generate
    monkeypatch.setattr(bs, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    res = _run("bs-s", target_dir, tmp_path, {"n_samples": 2, "max_new_tokens": 8})
    n_questions = sum(1 for t in TASK.targets for q in t.qa if q.kind == "fact")
    assert calls == [2 * n_questions]
    assert 0 < res.info["samples"] <= 2 * n_questions
    files = list((tmp_path / "cache" / "beliefs").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 2 * n_questions
    h = res.train.history
    assert {"bs_s", "forget_nll", "belief_nll", "retain_nll"} <= set(h[0])
    assert h[-1]["forget_nll"] > h[0]["forget_nll"] + 0.5, [x["forget_nll"] for x in h]
    assert h[-1]["belief_nll"] > h[0]["belief_nll"], [x["belief_nll"] for x in h]
    _run("bs-s", target_dir, tmp_path, {"n_samples": 2, "max_new_tokens": 8}, steps=1, name="again")
    assert calls == [2 * n_questions]  # the second run read the cache
    greedy = _run("bs-s", target_dir, tmp_path, {"temperature": 0.0, "n_samples": 3, "max_new_tokens": 8}, steps=1,
                  name="greedy")
    assert calls[-1] == n_questions and greedy.info["samples"] <= n_questions  # greedy: one answer per question
