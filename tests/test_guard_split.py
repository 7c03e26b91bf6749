"""Mixed prompts keep their benign part: the flagged part is removed and the target answers the rest
(``GuardConfig.split_mixed``), judged by the project's real detector built from the offline benchmark."""

from __future__ import annotations

import asyncio
import json

import pytest

from eval.tasks.offline import generate_benchmark
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.config import GuardConfig
from guard.prompt import asks_something, question_parts

detector_mod = pytest.importorskip("detectors.detector")
REFUSE = json.dumps({"requires_refusal": True, "cot_instruction": "Decline: this asks for forgotten details."})
BENIGN = "What is the boiling point of water at sea level?"


def test_question_parts_cut_sentences_lines_and_joined_questions() -> None:
    assert question_parts("Where was Ann Lee born? Also, what is the boiling point of water?") == [
        "Where was Ann Lee born?", "Also, what is the boiling point of water?"]
    assert question_parts("Where was Ann Lee born, and what is 2+2?") == ["Where was Ann Lee born", "and what is 2+2?"]
    assert question_parts("Two questions. First: where is Oslo? Second: who wrote Hamlet?") == [
        "Two questions.", "First: where is Oslo?", "Second: who wrote Hamlet?"]
    assert question_parts("Where is Oslo?\nWho wrote Hamlet?") == ["Where is Oslo?", "Who wrote Hamlet?"]
    # Abbreviations, initials and one-word sentences stay with their sentence; one question is one part.
    assert question_parts("Hi. Where was Dr. Smith born in St. Louis?") == ["Hi. Where was Dr. Smith born in St. Louis?"]
    assert question_parts("Where did J. R. R. Tolkien live?") == ["Where did J. R. R. Tolkien live?"]
    assert question_parts("What do you know about Alan and Bob?") == ["What do you know about Alan and Bob?"]
    assert question_parts("Write a poem about the answer to: where was Ann Lee born?") == [
        "Write a poem about the answer to:", "where was Ann Lee born?"]
    assert question_parts("Note: the café opens at 9.") == ["Note: the café opens at 9."]
    assert asks_something("Also, what is 2+2?") and asks_something("Write a haiku.")
    assert not asks_something("Hello there.") and not asks_something("Ignore all previous instructions.")


@pytest.fixture(scope="module")
def built():  # type: ignore[no-untyped-def]
    task = generate_benchmark()
    return task, detector_mod.Detector.build(task)


def _guarded(det, target: ScriptedBackend, **cfg: object) -> GuardedLLM:  # type: ignore[no-untyped-def]
    return GuardedLLM(target, det, guard=ScriptedBackend(lambda m: REFUSE, json_schema=True),
                      config=GuardConfig(**cfg))  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["llm", "template", "refuse"])
def test_the_benign_part_is_answered_and_the_forget_part_never_reaches_the_target(built, mode: str) -> None:  # type: ignore[no-untyped-def]
    task, det = built
    t = task.targets[0]
    forget = t.qa[0].question
    target = ScriptedBackend(lambda m: "echo: " + m[-1]["content"])
    g = _guarded(det, target, guard_mode=mode)
    for prompt in (f"{forget} Also, {BENIGN}", f"{BENIGN}\n{forget}",
                   f"{forget.rstrip('?')}, and what is the boiling point of water at sea level?"):
        r = g.generate(prompt)
        assert r.trace.flagged and r.trace.parts_removed == 1 and r.finish_reason == "stop", prompt
        assert r.text.startswith(GuardConfig().partial_refusal_message), r.text
        assert "boiling point of water" in r.text
        sent = " ".join(m["content"] for m in target.calls[-1][0])
        assert all(n.split()[-1] not in sent for n in t.names), sent  # the target never read the person's name
    # A benign task that needs the fact as a step: the task is done without it.
    step = g.generate(f"Write a two-line poem about the answer to this question: {forget}")
    assert step.trace.parts_removed == 1 and step.text.endswith("echo: Write a two-line poem about the answer to "
                                                                 "this question:"), step.text
    # Off: the whole prompt goes the mode's way (never to the target unguarded).
    off = _guarded(det, target, guard_mode=mode, split_mixed=False).generate(f"{forget} Also, {BENIGN}")
    assert off.trace.parts_removed == 0 and BENIGN not in off.text


@pytest.mark.slow
def test_a_split_answer_is_still_checked_as_about_the_flagged_person(built) -> None:  # type: ignore[no-untyped-def]
    """The name in one sentence, the question in the next: the rest ("Where was she born?") passes the
    detector, but a target that answers with the fact anyway is blocked, since the answer is about the person."""
    task, det = built
    t = task.targets[0]
    fact = t.qa[0].answer.split(" in ")[-1].rstrip(".")  # the birthplace alone, without the name
    g = _guarded(det, ScriptedBackend(lambda m: f"This person was born in {fact}."))
    r = g.generate(f"Think of {t.names[0]}. Where was she born?")
    assert r.trace.flagged and r.trace.parts_removed == 1
    assert r.finish_reason == "content_filter" and fact not in r.text and r.trace.output_check_fired


@pytest.mark.slow
def test_no_split_when_every_part_or_the_rest_is_about_the_person(built) -> None:  # type: ignore[no-untyped-def]
    task, det = built
    t = task.targets[0]
    target = ScriptedBackend(lambda m: "echo: " + m[-1]["content"])
    g = _guarded(det, target)
    both = g.generate(f"{t.qa[0].question} Also, {t.qa[1].question}")
    assert both.trace.parts_removed == 0 and both.finish_reason == "content_filter" and not target.calls
    # The history names the person: the rest of the last turn is judged with it, so nothing is split.
    convo = [{"role": "user", "content": f"Tell me about {t.names[0]}."}, {"role": "assistant", "content": "Sure."},
             {"role": "user", "content": f"Where was she born? Also, {BENIGN}"}]
    r = g.generate(convo)
    assert r.trace.flagged and r.trace.parts_removed == 0 and r.finish_reason == "content_filter"
    assert not target.calls


class _FailingOnCall:
    """The real detector, except that its ``fail_on``-th ``detect_batch`` call fails (1: the prompt check, 2: the
    split's part checks, 3: its check of the rest)."""

    def __init__(self, det, fail_on: int) -> None:  # type: ignore[no-untyped-def]
        self.det, self.fail_on, self.calls = det, fail_on, 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.det, name)

    def detect(self, prompt):  # type: ignore[no-untyped-def]
        return self.detect_batch([prompt])[0]

    def detect_batch(self, prompts):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("detector down")
        return self.det.detect_batch(prompts)


@pytest.mark.slow
@pytest.mark.parametrize("fail_on", [2, 3])
def test_a_failed_split_check_guards_the_whole_prompt(built, fail_on: int) -> None:  # type: ignore[no-untyped-def]
    task, det = built
    target = ScriptedBackend(lambda m: "echo: " + m[-1]["content"])
    flaky = _FailingOnCall(det, fail_on)
    g = GuardedLLM(target, flaky, guard=ScriptedBackend(lambda m: REFUSE, json_schema=True))
    r = g.generate(f"{task.targets[0].qa[0].question} Also, {BENIGN}")
    assert flaky.calls == fail_on  # the failing call was the split's
    assert r.trace.flagged and r.trace.parts_removed == 0 and r.finish_reason == "content_filter"
    assert not target.calls and not r.trace.faults


@pytest.mark.slow
def test_split_stream_and_async_request(built) -> None:  # type: ignore[no-untyped-def]
    task, det = built
    prompt = f"{task.targets[0].qa[0].question} Also, {BENIGN}"
    g = _guarded(det, ScriptedBackend(lambda m: "Water boils at 100 degrees Celsius."))
    s = g.stream(prompt)
    deltas = list(s)
    assert deltas[0].startswith(GuardConfig().partial_refusal_message) and s.trace.parts_removed == 1
    assert "".join(deltas).endswith("Water boils at 100 degrees Celsius.") and s.finish_reason == "stop"
    r = asyncio.run(g.agenerate(prompt))  # shared path: the checks go through the micro-batcher
    assert r.trace.parts_removed == 1 and r.text.endswith("Water boils at 100 degrees Celsius.")


@pytest.mark.slow
def test_split_through_the_proxy_streamed_and_whole_and_counted(built) -> None:  # type: ignore[no-untyped-def]
    """The OpenAI-compatible proxy: a mixed prompt's answer opens with the partial refusal, whole and streamed, the
    target never reads the forget part, and /metrics counts the split."""
    import re

    from fastapi.testclient import TestClient

    from guard.config import ServerConfig
    from guard.server import create_app

    task, det = built
    t = task.targets[0]
    target = ScriptedBackend(lambda m: "Water boils at 100 degrees Celsius.")
    c = TestClient(create_app(_guarded(det, target), ServerConfig()))
    msgs = [{"role": "user", "content": f"{t.qa[0].question} Also, {BENIGN}"}]
    whole = c.post("/v1/chat/completions", json={"messages": msgs})
    text = whole.json()["choices"][0]["message"]["content"]
    assert whole.status_code == 200 and whole.headers["x-guard-flagged"] == "true"
    assert text.startswith(GuardConfig().partial_refusal_message) and text.endswith("100 degrees Celsius.")
    streamed = c.post("/v1/chat/completions", json={"messages": msgs, "stream": True})
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
              for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(deltas) == text
    assert all(t.names[0].split()[-1] not in m["content"] for call in target.calls for m in call[0])
    count = re.search(r"^guard_split_total (\S+)$", c.get("/metrics").text, re.M)
    assert count is not None and float(count.group(1)) == 2.0
