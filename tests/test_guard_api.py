"""GuardedLLM: unflagged pass-through, flagged guarding, output check, failure policy, sync/async/batch/stream."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from core.schema import ForgetTarget
from detectors.oracle import OracleDetector
from detectors.types import Detection
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.config import GuardConfig
from guard.types import DetectorProtocol, GuardUnavailableError

T = ForgetTarget(id="person-000", kind="privacy", names=["Elara Voswick", "E. Voswick"],
                 policy="Do not reveal personal information about Elara Voswick.",
                 meta={"facts": {"birth_place": "Port Kestrel", "profession": "glassblower"}})
FLAGGED = "Where was Elara Voswick born?"
GUARD_OK = json.dumps({"requires_refusal": False, "cot_instruction": "Answer without any personal details."})
GUARD_REFUSE = json.dumps({"requires_refusal": True, "cot_instruction": "This asks for personal details; decline."})


class BrokenDetector(OracleDetector):
    """Fails (or stalls) on demand."""

    def __init__(self, *a: object, fail: str = "detect", delay: float = 0.0, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.fail, self.delay = fail, delay

    def detect(self, prompt: str) -> Detection:
        if self.delay:
            time.sleep(self.delay)
        if self.fail == "detect":
            raise RuntimeError("embedding index offline")
        return super().detect(prompt)

    def detect_leak(self, text: str) -> Detection:
        if self.fail == "leak":
            raise RuntimeError("leak index offline")
        return super().detect_leak(text)


def target_reply(msgs: list[dict[str, str]]) -> str:
    """The fake target: leaks when asked about Elara without guard rules, else echoes."""
    if "Elara" in msgs[-1]["content"] and not any("GUARD RULES" in m["content"] for m in msgs):
        return "Elara Voswick was born in Port Kestrel."
    return "echo: " + msgs[-1]["content"]


def make(guard_reply: str = GUARD_OK, config: GuardConfig | None = None, detector: object = None,
         guard_error: Exception | None = None) -> tuple[GuardedLLM, ScriptedBackend, ScriptedBackend]:
    target = ScriptedBackend(target_reply)
    guard = ScriptedBackend(lambda m: guard_reply, json_schema=True, error=guard_error)
    g = GuardedLLM(target, detector or OracleDetector([T]), guard=guard, config=config or GuardConfig())
    return g, target, guard


def test_oracle_detector_satisfies_protocol() -> None:
    assert isinstance(OracleDetector([T]), DetectorProtocol)


def test_unflagged_prompt_passes_through_unchanged() -> None:
    g, target, guard = make()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    res = g.generate(msgs)
    assert res.text == "echo: What is the capital of France?" and res.finish_reason == "stop"
    assert target.calls[0][0] == msgs and not guard.calls
    assert res.trace.flagged is False and res.trace.instruction_source == "none"
    assert {"detect", "generate", "output_check", "total"} <= set(res.trace.timings_ms)


def test_flagged_prompt_gets_instruction_in_system_turn() -> None:
    g, target, guard = make(GUARD_OK)
    res = g.generate(FLAGGED)
    sent = target.calls[0][0]
    assert sent[0]["role"] == "system" and "Answer without any personal details." in sent[0]["content"]
    assert sent[-1] == {"role": "user", "content": FLAGGED}
    assert res.trace.flagged and res.trace.target_ids == ["person-000"] and res.trace.instruction_source == "llm"
    assert res.trace.requires_refusal is False and "guard" in res.trace.timings_ms
    assert res.text.startswith("echo:")


def test_guard_refusal_skips_the_target() -> None:
    g, target, _ = make(GUARD_REFUSE)
    res = g.generate(FLAGGED)
    assert not target.calls and res.finish_reason == "content_filter" and "Port Kestrel" not in res.text
    assert res.trace.requires_refusal


def test_invalid_guard_output_uses_template_and_refuses() -> None:
    g, target, _ = make("not json at all")
    res = g.generate(FLAGGED)
    assert res.trace.instruction_source == "template" and res.trace.fallback_reason
    assert res.finish_reason == "content_filter" and not target.calls


def test_output_check_replaces_a_leak() -> None:
    det = OracleDetector([T])
    # A prompt the detector misses (no name), whose answer leaks: the output check must catch it.
    target = ScriptedBackend(lambda m: "Elara Voswick was born in Port Kestrel.")
    g = GuardedLLM(target, det, guard=ScriptedBackend(), config=GuardConfig())
    res = g.generate("Who was born in that coastal town?")
    assert res.finish_reason == "content_filter" and "Port Kestrel" not in res.text
    assert res.trace.output_check_fired and res.trace.leak_target_ids == ["person-000"]
    log_mode = GuardedLLM(target, det, guard=ScriptedBackend(), config=GuardConfig(output_check="log"))
    assert "Port Kestrel" in log_mode.generate("Who was born in that coastal town?").text


def test_stream_stops_at_a_leak_and_releases_nothing_leaked() -> None:
    words = "Sure. The person you mean, Elara Voswick, was born in Port Kestrel and later moved away for good."
    target = ScriptedBackend(lambda m: words)
    g = GuardedLLM(target, OracleDetector([T]), guard=ScriptedBackend(), config=GuardConfig(check_every_tokens=2))
    s = g.stream("Tell me about the person born in that coastal town")
    out = "".join(s)
    assert "Port Kestrel" not in out and s.finish_reason == "content_filter" and "I'm sorry" in out
    assert s.trace.output_check_fired and s.trace.output_checks >= 1
    assert target.closed_streams == 1  # generation was stopped


def test_stream_matches_generate_for_clean_answers() -> None:
    g, _, _ = make()
    s = g.stream("What is the capital of France?")
    assert "".join(s) == g.generate("What is the capital of France?").text and s.finish_reason == "stop"


def test_batch_keeps_order_and_mixes_paths() -> None:
    g, target, guard = make(GUARD_REFUSE)
    res = g.generate_batch(["hello", FLAGGED, "What is 2+2?"])
    assert [r.text for r in (res[0], res[2])] == ["echo: hello", "echo: What is 2+2?"]
    assert res[1].finish_reason == "content_filter"
    assert len(guard.calls) == 1


async def test_async_apis() -> None:
    g, _, _ = make(GUARD_REFUSE)
    res = await g.agenerate("hello")
    assert res.text == "echo: hello"
    s = g.astream("What is the capital of France?")
    chunks = [c async for c in s]
    assert "".join(chunks) == "echo: What is the capital of France?" and s.finish_reason == "stop"
    s2 = g.astream(FLAGGED)
    assert "I'm sorry" in "".join([c async for c in s2]) and s2.finish_reason == "content_filter"
    batch = await g.agenerate_batch(["a", "b"])
    assert [r.text for r in batch] == ["echo: a", "echo: b"]


# ---- failure policy -------------------------------------------------------------------------------

def test_detector_failure_fails_closed() -> None:
    g, target, _ = make(detector=BrokenDetector([T]))
    with pytest.raises(GuardUnavailableError, match="detector"):
        g.generate("hello")
    with pytest.raises(GuardUnavailableError):
        list(g.stream("hello"))
    assert not target.calls


def test_detector_timeout_fails_closed() -> None:
    g, _, _ = make(detector=BrokenDetector([T], fail="none", delay=0.5), config=GuardConfig(detector_timeout_s=0.05))
    with pytest.raises(GuardUnavailableError, match="no answer within"):
        g.generate("hello")


def test_fail_open_is_explicit_and_logged_every_time(caplog: pytest.LogCaptureFixture) -> None:
    g, target, _ = make(detector=BrokenDetector([T]), config=GuardConfig(fail_open=True))
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        res = g.generate("hello")
        assert res.text == "echo: hello" and res.trace.fail_open_used
    assert sum("FAIL-OPEN" in r.getMessage() for r in caplog.records) == 2


def test_leak_check_failure_fails_closed() -> None:
    g, _, _ = make(detector=BrokenDetector([T], fail="leak"))
    with pytest.raises(GuardUnavailableError, match="output_check"):
        g.generate("hello")


def test_guard_model_failure_refuses_or_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    g, target, _ = make(guard_error=RuntimeError("guard OOM"))
    res = g.generate(FLAGGED)
    assert res.finish_reason == "content_filter" and not target.calls and "guard OOM" in res.trace.errors[0]
    caplog.set_level(logging.WARNING)
    g2, target2, _ = make(guard_error=RuntimeError("guard OOM"), config=GuardConfig(fail_open=True))
    res2 = g2.generate(FLAGGED)
    assert res2.trace.fail_open_used and target2.calls and "GUARD RULES" in target2.calls[0][0][0]["content"]
    assert any("FAIL-OPEN" in r.getMessage() for r in caplog.records)


def test_late_guard_model_refuses() -> None:
    target = ScriptedBackend(target_reply)
    guard = ScriptedBackend(lambda m: GUARD_OK, delay_s=0.5, json_schema=True)
    g = GuardedLLM(target, OracleDetector([T]), guard=guard, config=GuardConfig(guard_timeout_s=0.05))
    res = g.generate(FLAGGED)
    assert res.finish_reason == "content_filter" and "TimeoutError" in res.trace.errors[0]


def test_flagged_prompts_are_never_logged_in_full(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    g, _, _ = make("garbage")
    g.generate(FLAGGED + " Her secret diary says XYZZY.")
    assert not any("XYZZY" in r.getMessage() or "Elara" in r.getMessage() for r in caplog.records)


def test_run_time_targets() -> None:
    det = OracleDetector([])
    g = GuardedLLM(ScriptedBackend(target_reply), det, guard=ScriptedBackend(lambda m: GUARD_REFUSE, json_schema=True))
    assert g.generate(FLAGGED).finish_reason == "stop"
    g.add_target(T)
    assert g.target_ids() == ["person-000"] and g.generate(FLAGGED).finish_reason == "content_filter"
    assert g.remove_target("person-000") is True and g.remove_target("person-000") is False
    assert g.generate(FLAGGED).finish_reason == "stop"


def test_detector_missing_methods_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="lacks detect"):
        GuardedLLM(ScriptedBackend(), object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a detector"):
        GuardedLLM(ScriptedBackend(), None)


def test_concurrent_requests_are_independent() -> None:
    g, _, _ = make(GUARD_REFUSE)
    out: dict[int, str] = {}

    def work(i: int) -> None:
        out[i] = g.generate(FLAGGED if i % 2 else f"q{i}").text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[i].startswith("I'm sorry") if i % 2 else out[i] == f"echo: q{i}" for i in range(8))
