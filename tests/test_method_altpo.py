"""AltPO: alternates generated once and cached, replies cleaned, the loss by hand, and a short run on a tiny model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import training.methods.altpo as altpo
from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark
from training.loop import TrainConfig
from training.methods import METHODS
from training.methods.altpo import AltPOConfig, alternates_cache_path, clean_alternate, prepare_altpo
from training.methods.common import MethodContext, collate_streams, model_digest
from training.unlearn import UnlearnConfig, build_streams, forget_items, qa_example, unlearn

TASK = generate_benchmark(BenchmarkConfig(num_people=4, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))


def make_ctx(model, tok, root: Path, seed: int = 0) -> MethodContext:
    """A MethodContext built as :func:`training.unlearn.unlearn` builds it."""
    cfg = UnlearnConfig(max_retain=8)
    return MethodContext(model=model, tokenizer=tok, task=TASK, streams=build_streams(tok, TASK, cfg),
                         forget_items=forget_items(TASK, cfg.forget_kinds),
                         encode_qa=lambda q, a, group=-1: qa_example(tok, q, a, None, 128, group),
                         cache_root=root, model_digest=model_digest(model), seed=seed)


class FakeGenerate:
    """Stands in for core.generation.generate: canned replies, counts calls, records the settings."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, model, tokenizer, prompts, **kw):
        self.calls.append({"n": len(prompts), **kw})
        out = []
        for i, p in enumerate(prompts):
            answer = p.split("\nAnswer: ")[1].split("\n")[0]
            k = i % 3
            out.append(["Alternate Answer : It was Zed Quorn.\nQuestion: more", "", answer][k] if i < 3 else
                       f"Another made-up fact number {i}.")
        return out


def test_clean_alternate_strips_prefix_cuts_at_question_and_drops_copies():
    assert clean_alternate("Alternate Answer : Born in Oslo.\nQuestion: next?", "Born in Rome.") == "Born in Oslo."
    assert clean_alternate("answer: In 1990. Q: and", "In 1985.") == "In 1990."
    assert clean_alternate("  ", "x") is None
    assert clean_alternate("born in rome", "Born in Rome.") is None  # the true answer again: no preference
    assert clean_alternate("Question: only a question", "x") is None


def test_alternates_are_generated_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    llm = tiny_llm(0, num_layers=2)
    fake = FakeGenerate()
    monkeypatch.setattr(altpo, "generate", fake)
    ctx = make_ctx(llm.model, llm.tokenizer, tmp_path)
    cfg = AltPOConfig(num_alternates=3, temperature=0.7, max_new_tokens=12)
    plan = prepare_altpo(ctx, cfg)
    n = len(ctx.forget_items)
    assert len(fake.calls) == 1 and fake.calls[0]["n"] == 3 * n
    assert fake.calls[0]["temperature"] == 0.7 and fake.calls[0]["max_new_tokens"] == 12
    path = alternates_cache_path(ctx, cfg, [(q.question, q.answer) for q, _ in ctx.forget_items])
    assert path.exists() and path.parent == tmp_path / "altpo" and path.name.startswith(ctx.model_digest)
    data = json.loads(path.read_text())
    assert data["model_digest"] == ctx.model_digest and len(data["items"]) == n
    assert all(len(r["alternates"]) == 3 for r in data["items"])
    # Question 0's replies: one with a prefix and a follow-up question (kept, cleaned), one empty and
    # one equal to the true answer (both dropped); every other reply is kept.
    assert plan.info["dropped_alternates"] == 2 and plan.info["pairs"] == 3 * n - 2
    assert plan.info["example"]["alternate"] == "It was Zed Quorn."
    forget, (q0, _) = plan.streams["forget"], ctx.forget_items[0]
    assert forget[0] == ctx.encode_qa(q0.question, q0.answer, forget[0]["group"])
    # A second prepare (a new context on the same model) reads the cache and generates nothing.
    monkeypatch.setattr(altpo, "generate", lambda *a, **k: pytest.fail("generated again"))
    again = prepare_altpo(make_ctx(llm.model, llm.tokenizer, tmp_path), cfg)
    assert again.info == plan.info and again.streams["forget"] == plan.streams["forget"]
    # Other settings (or another model) are another cache entry.
    assert alternates_cache_path(ctx, AltPOConfig(num_alternates=2), [("q", "a")]) != path


def test_real_generation_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    llm = tiny_llm(0, num_layers=2)
    cfg = AltPOConfig(num_alternates=2, max_new_tokens=6)
    state = torch.get_rng_state()
    plans = [prepare_altpo(make_ctx(llm.model, llm.tokenizer, tmp_path / d), cfg) for d in ("a", "b")]
    assert torch.equal(torch.get_rng_state(), state)
    files = [json.loads(next((tmp_path / d / "altpo").glob("*.json")).read_text()) for d in ("a", "b")]
    assert files[0]["items"] == files[1]["items"]  # same seed, same samples
    alts = files[0]["items"][0]["alternates"]
    assert len(alts) == 2 and alts[0] != alts[1]  # sampled, not greedy
    assert plans[0].info["pairs"] > 0


def test_loss_is_dpo_on_alternates_plus_retain_by_hand(tmp_path, monkeypatch):
    llm = tiny_llm(0, num_layers=2)
    monkeypatch.setattr(altpo, "generate", FakeGenerate())
    ctx = make_ctx(llm.model, llm.tokenizer, tmp_path)
    cfg = AltPOConfig(num_alternates=3, beta=0.5, alpha=2.0, alt_nll=0.25)
    plan = prepare_altpo(ctx, cfg)
    tok = llm.tokenizer
    rows = [0, 1, 2]
    batch = collate_streams([{"forget": {**plan.streams["forget"][i], "idx": i},
                              "retain": {**ctx.streams["retain"][i], "idx": i}} for i in rows], tok.pad_token_id)
    with torch.no_grad():
        out = plan.loss_fn(llm.model, batch)
    # The model is still the reference: every margin is 0, so the DPO term is (2/beta) log 2.
    assert float(out["margin"]) == pytest.approx(0.0, abs=1e-4)
    assert float(out["altpo"]) == pytest.approx(4 * math.log(2), rel=1e-5)
    expected = float(out["altpo"]) + 2.0 * float(out["retain_nll"]) + 0.25 * float(out["alt_nll"])
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-6)


def test_short_run_raises_forget_nll_and_leaves_frozen_params(tmp_path):
    llm = tiny_llm(0, num_layers=4)
    model, tok = llm.model, llm.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    subset = [r"layers\.[23]\.mlp\."]
    cfg = UnlearnConfig(method="altpo", params={"num_alternates": 2, "max_new_tokens": 8}, max_retain=8,
                        cache_dir=str(tmp_path / "c"),
                        train=TrainConfig(lr=3e-3, max_steps=6, batch_size=4, save_every=100, trainable=subset))
    res = unlearn(model, tok, TASK, cfg, tmp_path / "out")
    h = res.train.history
    method = METHODS.get("altpo")
    assert method.forget_term == "forget_nll" and method.forget_direction == "up"
    assert h[-1]["forget_nll"] > h[0]["forget_nll"], [x["forget_nll"] for x in h]
    assert h[-1]["margin"] > h[0]["margin"]
    pats = [re.compile(p) for p in subset]
    for n, p in model.named_parameters():
        if not any(c.search(n) for c in pats):
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert list((tmp_path / "c" / "altpo").glob("*.json"))


def test_defaults_are_the_authors():
    cfg = AltPOConfig()
    assert (cfg.beta, cfg.alpha, cfg.num_alternates, cfg.temperature, cfg.alt_nll) == (0.1, 1.0, 5, 1.0, 0.0)
    assert METHODS.get("altpo").train_defaults["lr"] == 5e-5
