"""PDU: the flattening loss and the dual ascent by hand, the measured eps, state for checkpoints, a short run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark
from training.loop import TrainConfig
from training.methods import METHODS
from training.methods.common import MethodContext, collate_streams, model_digest
from training.methods.pdu import PDUConfig, PrimalDualLoss, dual_update, flattening_loss, prepare_pdu
from training.unlearn import UnlearnConfig, build_streams, forget_items, qa_example, unlearn

TASK = generate_benchmark(BenchmarkConfig(num_people=4, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))


def make_ctx(model, tok, root: Path) -> MethodContext:
    """A MethodContext built as :func:`training.unlearn.unlearn` builds it."""
    cfg = UnlearnConfig(max_retain=8)
    return MethodContext(model=model, tokenizer=tok, task=TASK, streams=build_streams(tok, TASK, cfg),
                         forget_items=forget_items(TASK, cfg.forget_kinds),
                         encode_qa=lambda q, a, group=-1: qa_example(tok, q, a, None, 128, group),
                         cache_root=root, model_digest=model_digest(model))


def test_flattening_loss_by_hand():
    # One sequence of 3 tokens, vocab 4; labels: prompt, answer, answer -> positions 0 and 1 predict answers.
    logits = torch.tensor([[[1.0, 2.0, 3.0, 6.0],     # predicts token 1: max 6, mean 3 -> gap 3
                            [0.0, 0.0, 0.0, 4.0],     # predicts token 2: max 4, mean 1 -> gap 3
                            [9.0, 0.0, 0.0, 0.0]]])   # predicts past the end: not counted
    labels = torch.tensor([[-100, 5, 7]])
    assert float(flattening_loss(logits, labels)) == pytest.approx((3.0 ** 2 + 3.0 ** 2) / 2)
    logits[0, 1] = 2.0  # a uniform prediction has gap 0
    assert float(flattening_loss(logits, labels)) == pytest.approx(9.0 / 2)
    labels = torch.tensor([[-100, -100, 7]])  # only position 1 predicts an answer token now
    assert float(flattening_loss(logits, labels)) == 0.0
    # Padding rows and prompt positions never count; a uniform distribution scores 0.
    assert float(flattening_loss(torch.zeros(2, 4, 10), torch.tensor([[-100, 1, 2, -100]] * 2))) == 0.0


def test_dual_ascent_by_hand_with_warmup_and_projection():
    assert dual_update(2.0, retain=1.4, eps=1.0, step_size=0.5) == pytest.approx(2.2)
    assert dual_update(2.0, retain=0.4, eps=1.0, step_size=0.5) == pytest.approx(1.7)
    assert dual_update(0.1, retain=0.0, eps=1.0, step_size=0.5) == 0.0  # projected onto lambda >= 0
    llm = tiny_llm(0, num_layers=2)
    ctx = make_ctx(llm.model, llm.tokenizer, Path("/nonexistent"))
    loss = PrimalDualLoss(ctx, PDUConfig(alpha=2.0, retain_eps=1.0, dual_step_size=0.5, dual_warmup_steps=1))
    trace = []
    for r in (1.5, 0.4, 3.0, -10.0, 2.0):
        trace.append(loss.dual)
        loss.step(r)
    # call 0 is warm-up (no move); then 2 + 0.5*(0.4-1) = 1.7; 1.7 + 0.5*2 = 2.7; max(0, 2.7 - 5.5) = 0; 0 + 0.5
    assert trace == pytest.approx([2.0, 2.0, 1.7, 2.7, 0.0])
    assert loss.dual == pytest.approx(0.5) and loss.calls == 5
    fixed = PrimalDualLoss(ctx, PDUConfig(alpha=2.0, retain_eps=1.0, primal_dual=False, dual_warmup_steps=0))
    fixed.step(5.0)
    assert fixed.dual == 2.0


def test_loss_uses_lambda_before_its_update_and_state_round_trips(tmp_path):
    llm = tiny_llm(0, num_layers=2)
    ctx = make_ctx(llm.model, llm.tokenizer, tmp_path)
    cfg = PDUConfig(alpha=3.0, retain_eps=0.5, dual_step_size=2.0, dual_warmup_steps=0, gamma=0.5)
    loss = PrimalDualLoss(ctx, cfg)
    tok = llm.tokenizer
    batch = collate_streams([{"forget": {**ctx.streams["forget"][i], "idx": i},
                              "retain": {**ctx.streams["retain"][i], "idx": i}} for i in range(3)], tok.pad_token_id)
    with torch.no_grad():
        out = loss(llm.model, batch)
    f, r = float(out["forget_flat"]), float(out["retain_nll"])
    assert out["dual"] == 3.0
    assert float(out["loss"]) == pytest.approx(0.5 * f + 3.0 * (r - 0.5), rel=1e-5)
    assert loss.dual == pytest.approx(3.0 + 2.0 * (r - 0.5), rel=1e-6)
    # A fresh loss loaded from the state continues exactly where this one is.
    resumed = PrimalDualLoss(ctx, cfg)
    resumed.load_state_dict(loss.state_dict())
    with torch.no_grad():
        a, b = loss(llm.model, batch), resumed(llm.model, batch)
    assert a["dual"] == b["dual"] and loss.state_dict() == resumed.state_dict()
    # The state survives torch.save / torch.load(weights_only=True), as a checkpoint's state.pt would hold it.
    torch.save({"loss_fn": loss.state_dict()}, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["loss_fn"] == loss.state_dict()


def test_eps_is_measured_on_the_original_model_and_recorded(tmp_path):
    llm = tiny_llm(0, num_layers=2)
    ctx = make_ctx(llm.model, llm.tokenizer, tmp_path)
    plan = prepare_pdu(ctx, PDUConfig(eps_margin=0.25))
    start = plan.info["starting_retain_loss"]
    assert 5.0 < start < 8.0  # a random model over a ~1000-token vocabulary: about log(1000)
    assert plan.config.retain_eps == pytest.approx(start + 0.25, abs=1e-5)
    assert prepare_pdu(ctx, PDUConfig(retain_eps=0.3)).config.retain_eps == 0.3
    assert prepare_pdu(ctx, PDUConfig(retain_loss="kl")).config.retain_eps == pytest.approx(0.1)


def test_short_run_flattens_forget_logits_moves_lambda_and_leaves_frozen_params(tmp_path):
    llm = tiny_llm(0, num_layers=4)
    model, tok = llm.model, llm.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    subset = [r"layers\.[23]\.mlp\."]
    cfg = UnlearnConfig(method="pdu", params={"dual_warmup_steps": 2, "alpha": 10.0, "dual_step_size": 50.0},
                        max_retain=8, cache_dir=str(tmp_path / "c"), train=TrainConfig(lr=3e-3, max_steps=6, batch_size=4, save_every=100,
                                                        trainable=subset))
    res = unlearn(model, tok, TASK, cfg, tmp_path / "out")
    h = res.train.history
    method = METHODS.get("pdu")
    assert method.forget_term == "forget_flat" and method.forget_direction == "down"
    assert h[-1]["forget_flat"] < h[0]["forget_flat"], [x["forget_flat"] for x in h]
    duals = [x["dual"] for x in h]
    assert duals[:3] == [10.0, 10.0, 10.0]  # warm-up: the first two steps do not move lambda
    for prev, cur in zip(h[2:-1], h[3:], strict=False):  # each later lambda is the dual step from the previous step
        assert cur["dual"] == pytest.approx(max(0.0, prev["dual"] + 50.0 * prev["constraint"]), rel=1e-5, abs=1e-6)
    assert len(set(duals)) > 1
    pats = [re.compile(p) for p in subset]
    for n, p in model.named_parameters():
        if not any(c.search(n) for c in pats):
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert res.config["params"]["retain_eps"] == res.info["retain_eps"]


def test_resumed_run_continues_the_dual_trajectory(tmp_path):
    def run(out: Path, stop_after: int | None = None):
        llm = tiny_llm(0, num_layers=2)
        cfg = UnlearnConfig(method="pdu", params={"dual_warmup_steps": 1, "alpha": 10.0, "dual_step_size": 5.0},
                            max_retain=8, cache_dir=str(tmp_path / "c"),
                            train=TrainConfig(lr=3e-3, max_steps=5, batch_size=4, save_every=2))
        return unlearn(llm.model, llm.tokenizer, TASK, cfg, out, stop_after=stop_after)

    whole = run(tmp_path / "whole")
    run(tmp_path / "resumed", stop_after=3)  # checkpoint at step 2, stopped after step 3
    resumed = run(tmp_path / "resumed")
    assert resumed.train.resumed_from == 2
    duals = [x["dual"] for x in whole.train.history]
    assert len(set(duals[1:])) == len(duals) - 1  # lambda moves at every step after the warm-up
    assert [x["dual"] for x in resumed.train.history] == pytest.approx(duals)
