"""R²MU: unthinking acts on the model's CoT traces of forget questions, preservation on worked reasoning solutions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark
from training import traces
from training.loop import TrainConfig
from training.methods import METHODS
from training.methods.common import MethodContext, model_digest
from training.methods.r2mu import R2MUConfig
from training.reasoning_data import reasoning_problems
from training.traces import REASONING_TRIGGER
from training.unlearn import UnlearnConfig, build_streams, forget_items, qa_example, unlearn

TASK = generate_benchmark(BenchmarkConfig(num_people=6, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
SMALL = {"layer": 2, "max_forget_traces": 4, "max_retain_traces": 5, "trace_tokens": 24}


def _ctx(model, tok, tmp_path: Path) -> MethodContext:
    cfg = UnlearnConfig(max_retain=6)
    return MethodContext(model=model, tokenizer=tok, task=TASK, streams=build_streams(tok, TASK, cfg),
                         forget_items=forget_items(TASK, ["fact"]),
                         encode_qa=lambda q, a, group=-1: qa_example(tok, q, a, None, 128, group),
                         cache_root=tmp_path / "cache", model_digest=model_digest(model))


class FakeCoT:
    """Stands in for generation: the line each prompt's step gets ("weigh item <prompt index>."), or a free trace."""

    def __init__(self):
        self.calls = []
        self.prefixes = []

    def __call__(self, model, tokenizer, prompts, **kw):
        self.calls.append(list(prompts))
        self.prefixes.append(kw.get("prefixes"))
        if kw.get("prefixes") is None:
            return [f"Step {i}: weigh item {i}." for i, _ in enumerate(prompts)]
        assert kw.get("stop_at_newline") is True
        return [f"weigh item {i}." for i, _ in enumerate(prompts)]


def _scaffold(i: int) -> str:
    """The trace :class:`FakeCoT` yields for prompt ``i``: every step header followed by its line."""
    return "\n".join(f"{h} weigh item {i}." for h in traces.SCAFFOLD_STEPS)


def _answer_text(tok, ex) -> str:
    ids = torch.tensor(ex["input_ids"])
    return tok.decode(ids[torch.tensor(ex["labels"]) != -100], skip_special_tokens=True)


def test_streams_hold_cot_generations_and_reasoning_task_not_forget_answers(tmp_path, monkeypatch):
    llm = tiny_llm(0, num_layers=4)
    fake = FakeCoT()
    monkeypatch.setattr(traces, "generate", fake)
    ctx = _ctx(llm.model, llm.tokenizer, tmp_path)
    cfg = R2MUConfig(**SMALL)
    plan = METHODS.get("r2mu").prepare(ctx, cfg)
    tok = llm.tokenizer
    # One generation call per scaffold step, for the forget questions only, each asked with the chain-of-thought
    # trigger; each step continues its header after the steps written so far.
    steps = traces.SCAFFOLD_STEPS
    assert len(fake.calls) == len(steps) and all(c == fake.calls[0] for c in fake.calls) and len(fake.calls[0]) == 4
    for n, heads in enumerate(fake.prefixes):
        for i, head in enumerate(heads):
            done = "\n".join(f"{h} weigh item {i}." for h in steps[:n])
            assert head == (f"{done}\n{steps[n]}" if n else steps[0])
    general = reasoning_problems(5, seed=0)
    questions = {q.question: (q, ti) for q, ti in ctx.forget_items}
    for prompt in fake.calls[0]:
        assert prompt.endswith(f" {REASONING_TRIGGER}") and prompt.removesuffix(f" {REASONING_TRIGGER}") in questions
    # Unthinking stream: exactly the generated traces (cut to trace_tokens), on the trace tokens only.
    forget = plan.streams["forget_trace"]
    answers = [q.answer for q, _ in ctx.forget_items]
    assert len(forget) == 4
    written = {p.removesuffix(f" {REASONING_TRIGGER}"): _scaffold(i) for i, p in enumerate(fake.calls[0])}
    for ex in forget:
        text = _answer_text(tok, ex)
        asked = max((q for q in written if q in tok.decode(ex["input_ids"])), key=len)
        assert text.strip() == traces.cut_tokens(tok, written[asked], 24).strip()
        assert ex["group"] == questions[asked][1]
        assert not any(a in text for a in answers)
        assert ex["scope"] == [0 if lab == -100 else 1 for lab in ex["labels"]] and sum(ex["scope"]) > 0
    # Preservation stream: the reasoning task's worked solutions, cut to 24 tokens; no forget or retain answer.
    retain = plan.streams["retain_trace"]
    assert len(retain) == 5
    retain_answers = [q.answer for q in TASK.retain_qa] + answers
    for ex, p in zip(retain, general, strict=True):
        text = _answer_text(tok, ex)
        assert p.question in tok.decode(ex["input_ids"]) and ex["group"] == -1
        assert text.strip() == traces.cut_tokens(tok, p.solution, 24).strip()
        assert not any(a in text for a in retain_answers)
    assert plan.info["traces"] == {"forget": 4, "retain": 5} and plan.info["general_traces"] == "reasoning_task"
    # The cache holds both kinds; a second set-up generates nothing.
    files = list((tmp_path / "cache" / "traces").glob("*.jsonl"))
    assert len(files) == 1
    body = files[0].read_text()
    assert body.count('"source":"generated"') == 4 and body.count('"source":"worked"') == 5
    METHODS.get("r2mu").prepare(_ctx(llm.model, tok, tmp_path), cfg)
    assert len(fake.calls) == len(steps)


def test_old_self_trace_behaviour_stays_reachable(tmp_path, monkeypatch):
    llm = tiny_llm(0, num_layers=4)
    fake = FakeCoT()
    monkeypatch.setattr(traces, "generate", fake)
    cfg = R2MUConfig(**SMALL, general_traces="self", trace_style="free")
    plan = METHODS.get("r2mu").prepare(_ctx(llm.model, llm.tokenizer, tmp_path), cfg)
    prompts = fake.calls[0]
    assert len(prompts) == 4 + 5
    asked = {p.removesuffix(f" {REASONING_TRIGGER}") for p in prompts[4:]}
    assert asked <= set(TASK.benign_questions) | {q.question for q in TASK.retain_qa}
    assert all(_answer_text(llm.tokenizer, ex).startswith("Step ") for ex in plan.streams["retain_trace"])


def test_trace_terms_train_the_right_way_and_only_down_projections(tmp_path):
    llm = tiny_llm(0, num_layers=4)
    before = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    cfg = UnlearnConfig(method="r2mu", params={**SMALL, "alpha": 10.0, "trace_alpha": 10.0, "trace_tokens": 8},
                        train=TrainConfig(lr=5e-3, max_steps=6, batch_size=4, save_every=100), max_retain=8,
                        cache_dir=str(tmp_path / "cache"))
    res = unlearn(llm.model, llm.tokenizer, TASK, cfg, tmp_path / "out")
    h = res.train.history
    assert h[-1]["trace_forget_mse"] < h[0]["trace_forget_mse"] and h[-1]["forget_mse"] < h[0]["forget_mse"]
    assert h[-1]["trace_retain_mse"] < 0.1 * h[0]["trace_forget_mse"]
    pats = [re.compile(p) for p in res.config["train"]["trainable"]]
    for n, p in llm.model.named_parameters():
        if not any(c.search(n) for c in pats):
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in llm.model.named_parameters())


@pytest.mark.integration
def test_scaffolded_traces_of_the_embedded_model_are_written_step_by_step_about_the_subject():
    """On the real embedded model, the forced steps get the model's own lines: the headers in order, the first two
    lines about the question's subject, and the first three written on nearly every question."""
    from core.models import DEFAULT_LLM, load_llm

    llm = load_llm(DEFAULT_LLM)
    items = forget_items(TASK, ["fact"])[:6]
    prompts = [traces.trace_prompt(q.question) for q, _ in items]
    out = traces.scaffold_traces(llm.model, llm.tokenizer, prompts)
    full = 0
    for (_q, ti), trace in zip(items, out, strict=True):
        lines = trace.split("\n")
        assert [ln[:len(h)] for ln, h in zip(lines, traces.SCAFFOLD_STEPS, strict=True)] == list(traces.SCAFFOLD_STEPS)
        written = [ln[len(h):].strip() for ln, h in zip(lines, traces.SCAFFOLD_STEPS, strict=True)]
        assert written[0], trace  # step 1 restates the question in the model's words
        subject = TASK.targets[ti].names[0].split()[-1]
        assert subject.lower() in " ".join(written[:2]).lower(), trace
        full += all(written[:3])
    assert full >= 5, out
