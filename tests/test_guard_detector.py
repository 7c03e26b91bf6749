"""The guard with the project's real detector (``detectors.detector.Detector``) built from the offline benchmark."""

from __future__ import annotations

import json

import pytest

from eval.tasks.offline import generate_benchmark
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.config import GuardConfig
from guard.types import DetectorProtocol

detector_mod = pytest.importorskip("detectors.detector")
REFUSE = json.dumps({"requires_refusal": True, "cot_instruction": "Decline: this asks for forgotten details."})


@pytest.fixture(scope="module")
def built():  # type: ignore[no-untyped-def]
    task = generate_benchmark()
    return task, detector_mod.Detector.build(task)


@pytest.mark.slow
def test_guard_with_real_detector(built) -> None:  # type: ignore[no-untyped-def]
    task, det = built
    assert isinstance(det, DetectorProtocol)
    target = ScriptedBackend(lambda m: "echo: " + m[-1]["content"])
    g = GuardedLLM(target, det, guard=ScriptedBackend(lambda m: REFUSE, json_schema=True), config=GuardConfig())
    t = task.targets[0]
    forget = [q.question for q in t.qa[:4]]
    retain = [q.question for q in task.retain_qa[:4]] + task.benign_questions[:4]
    res = g.generate_batch(forget + retain)
    assert sum(r.trace.flagged for r in res[:len(forget)]) >= len(forget) - 1
    assert all(r.finish_reason == "content_filter" for r in res[:len(forget)] if r.trace.flagged)
    unflagged = [r for r, q in zip(res[len(forget):], retain, strict=True) if not r.trace.flagged]
    assert len(unflagged) >= len(retain) - 1
    assert all(r.text.startswith("echo: ") for r in unflagged)
    # Policies and names come from the detector's store when no task is passed to the guard.
    flagged = next(r for r in res if r.trace.flagged)
    book_target = g.book.get(flagged.trace.target_ids[0])
    assert book_target is not None and book_target.names
    # A leaking answer is caught by the real detector's output check.
    fact = t.qa[0].answer
    leaky = GuardedLLM(ScriptedBackend(lambda m: fact), det, guard=ScriptedBackend(), config=GuardConfig())
    out = leaky.generate("Tell me a story.")
    assert out.trace.output_check_fired and out.finish_reason == "content_filter" and fact not in out.text


@pytest.mark.slow
def test_run_time_targets_with_real_detector(built) -> None:  # type: ignore[no-untyped-def]
    task, det = built
    t = task.targets[0]
    g = GuardedLLM(ScriptedBackend(), det, guard=ScriptedBackend(lambda m: REFUSE, json_schema=True), targets=task)
    assert t.id in g.target_ids()
    assert g.remove_target(t.id) is True
    try:
        assert t.id not in g.target_ids()
        assert t.id not in g.generate(t.qa[0].question).trace.target_ids
    finally:
        g.add_target(t)
    assert t.id in g.target_ids()
