"""IdkDPO: the DPO margin and loss by hand, the seeded IDK pairing, and a short run on a tiny model."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import torch

from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark
from training.loop import TrainConfig
from training.methods import METHODS
from training.methods.common import MethodContext, collate_streams, model_digest
from training.methods.dpo import IdkDPOConfig, PreferencePairs, dpo_loss, dpo_margin, idk_pairs
from training.methods.idk import IDK_ANSWERS
from training.unlearn import UnlearnConfig, build_streams, forget_items, qa_example, unlearn

TASK = generate_benchmark(BenchmarkConfig(num_people=4, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))


def make_ctx(model, tok, tmp_path: Path, seed: int = 0) -> MethodContext:
    """A MethodContext built as :func:`training.unlearn.unlearn` builds it."""
    cfg = UnlearnConfig(max_retain=8)
    return MethodContext(model=model, tokenizer=tok, task=TASK, streams=build_streams(tok, TASK, cfg),
                         forget_items=forget_items(TASK, cfg.forget_kinds),
                         encode_qa=lambda q, a, group=-1: qa_example(tok, q, a, None, 128, group),
                         cache_root=tmp_path / "cache", model_digest=model_digest(model), seed=seed)


def test_margin_and_loss_match_hand_computation():
    # Summed NLLs (= -log p) of two pairs under the model and the reference.
    win, win_ref = torch.tensor([2.0, 5.0]), torch.tensor([3.0, 4.0])
    lose, lose_ref = torch.tensor([1.0, 2.5]), torch.tensor([1.5, 2.0])
    m = dpo_margin(win, win_ref, lose, lose_ref)
    # pair 0: preferred gained 1.0 nat over the reference, dispreferred gained 0.5 -> +0.5;
    # pair 1: preferred lost 1.0, dispreferred lost 0.5 -> -0.5.
    assert m.tolist() == [0.5, -0.5]
    beta = 0.5

    def logsig(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = -(2 / beta) * (logsig(0.25) + logsig(-0.25)) / 2
    assert float(dpo_loss(m, beta)) == pytest.approx(expected, rel=1e-6)
    # At a zero margin the loss is (2/beta) log 2 whatever beta is; a larger margin lowers it.
    assert float(dpo_loss(torch.zeros(3), 0.1)) == pytest.approx(20 * math.log(2), rel=1e-6)
    assert float(dpo_loss(torch.tensor([4.0]), 0.1)) < float(dpo_loss(torch.tensor([0.0]), 0.1))


def test_idk_answers_are_a_seeded_choice_per_question_and_pair_by_index(tmp_path):
    llm = tiny_llm(0, num_layers=2)
    ctx = make_ctx(llm.model, llm.tokenizer, tmp_path, seed=3)
    lose, win = idk_pairs(ctx, list(IDK_ANSWERS))
    rng = random.Random(3)
    expected = [rng.choice(IDK_ANSWERS) for _ in ctx.forget_items]
    tok = llm.tokenizer
    got = [tok.decode([t for t in e["labels"] if t != -100], skip_special_tokens=True) for e in win]
    assert got == expected
    assert len(set(expected)) > 1  # a real draw, not one answer for all
    # Pairs share the question: the prompt tokens (label -100) of lose[i] and win[i] are equal.
    for a, b in zip(lose, win, strict=True):
        assert [t for t, lab in zip(a["input_ids"], a["labels"], strict=True) if lab == -100] == \
               [t for t, lab in zip(b["input_ids"], b["labels"], strict=True) if lab == -100]
    # The preferred batch follows the forget batch's idx, row for row, and the reference NLL is cached.
    pairs = PreferencePairs(ctx, win)
    idx = [4, 0, 2]
    batch = collate_streams([{"forget": {**lose[i], "idx": i}} for i in idx], tok.pad_token_id)["forget"]
    wb = pairs.win_batch(batch)
    assert wb["idx"].tolist() == idx
    for r, i in enumerate(idx):
        assert wb["input_ids"][r, : len(win[i]["input_ids"])].tolist() == win[i]["input_ids"]
    t = pairs(llm.model, batch)
    assert torch.allclose(t.margin, torch.zeros(3), atol=1e-4)  # the model is still the reference
    pairs(llm.model, batch)
    assert pairs.ref_win.computed_rows == 3 and pairs.ref_lose.computed_rows == 3


def test_short_run_raises_forget_nll_and_leaves_frozen_params(tmp_path):
    llm = tiny_llm(0, num_layers=4)
    model, tok = llm.model, llm.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    subset = [r"layers\.[23]\.mlp\."]
    cfg = UnlearnConfig(method="idkdpo", params={"beta": 1.0}, max_retain=8, cache_dir=str(tmp_path / "c"),
                        train=TrainConfig(lr=3e-3, max_steps=6, batch_size=4, save_every=100, trainable=subset))
    res = unlearn(model, tok, TASK, cfg, tmp_path / "out")
    h = res.train.history
    method = METHODS.get("idkdpo")
    assert method.forget_term == "forget_nll" and method.forget_direction == "up"
    assert h[-1]["forget_nll"] > h[0]["forget_nll"], [x["forget_nll"] for x in h]
    assert h[-1]["margin"] > h[0]["margin"] and h[0]["margin"] == pytest.approx(0.0, abs=1e-3)
    assert h[-1]["dpo"] < h[0]["dpo"]
    pats = [re.compile(p) for p in subset]
    changed = 0
    for n, p in model.named_parameters():
        if any(c.search(n) for c in pats):
            changed += int(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), n
    assert changed > 0
    assert res.config["params"]["beta"] == 1.0 and res.config["params"]["answers"] == list(IDK_ANSWERS)


def test_config_defaults_are_open_unlearnings_and_bad_values_fail():
    cfg = IdkDPOConfig()
    assert (cfg.beta, cfg.gamma, cfg.alpha, cfg.retain_loss) == (0.1, 1.0, 1.0, "nll")
    with pytest.raises(ValueError):
        IdkDPOConfig(beta=0)
    with pytest.raises(ValueError):
        IdkDPOConfig(answers=[])
    assert "dpo" not in METHODS.names() and "idkdpo" in METHODS.names()
