"""The load benchmark's own pieces: the fake upstream, the request mix and the dropped-check accounting."""

from __future__ import annotations

import httpx

from eval.bench.load import (
    FIXED_ANSWER,
    LoadConfig,
    Outcome,
    _sse_text,
    _trace_dropped,
    dropped_checks,
    fake_upstream,
    request_mix,
    verdict,
)


async def test_fake_upstream_answers_chat_and_completions_streamed_or_not() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake_upstream), base_url="http://up") as c:
        chat = (await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})).json()
        assert chat["choices"][0]["message"]["content"] == FIXED_ANSWER
        comp = (await c.post("/v1/completions", json={"prompt": "hi"})).json()
        assert comp["choices"][0]["text"] == FIXED_ANSWER
        for path, body, is_chat in (("/v1/chat/completions", {"messages": [], "stream": True}, True),
                                    ("/v1/completions", {"prompt": "x", "stream": True}, False)):
            r = await c.post(path, json=body)
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.text.rstrip().endswith("data: [DONE]") and r.text.count("data:") >= 4
            assert _sse_text(r.text, is_chat) == (FIXED_ANSWER, None)
        assert (await c.get("/v1/models")).status_code == 200
        assert (await c.post("/v1/nothing", json={})).status_code == 404


def test_sse_error_event_is_reported() -> None:
    raw = 'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n'
    assert _sse_text(raw, chat=True) == ("a", "boom")


def test_request_mix_is_deterministic_and_follows_the_fractions() -> None:
    cfg = LoadConfig(flagged_fraction=0.3, stream_fraction=0.2, completions_fraction=0.1)
    a, b = request_mix(cfg, 2000, salt=8), request_mix(cfg, 2000, salt=8)
    assert a == b and a != request_mix(cfg, 2000, salt=9)
    assert 0.25 < sum(s.flagged for s in a) / 2000 < 0.35
    assert 0.15 < sum(s.stream for s in a) / 2000 < 0.25
    assert 0.06 < sum(s.endpoint == "completions" for s in a) / 2000 < 0.14
    assert len({s.prompt for s in a if s.flagged} & {s.prompt for s in a if not s.flagged}) == 0


def test_dropped_checks_from_traces_and_metrics() -> None:
    good = {"timings_ms": {"detect": 3.0, "output_check": 2.0}, "output_checks": 1, "errors": []}
    assert not _trace_dropped(good, "block")
    assert _trace_dropped({**good, "timings_ms": {"output_check": 2.0}}, "block")  # detector never ran
    assert _trace_dropped({**good, "output_checks": 0}, "block")  # output check skipped
    assert not _trace_dropped({**good, "output_checks": 0}, "off")
    assert _trace_dropped({**good, "fail_open_used": True}, "block")
    assert _trace_dropped(None, "block")

    cfg = LoadConfig()
    outs = [Outcome(0.01, 200, True) for _ in range(10)] + [Outcome(0.01, 503, False, "guard_unavailable")]
    before = {"stage:detect": 5.0, "stage:output_check": 5.0, "fail_open": 0.0}
    full = {"stage:detect": 15.0, "stage:output_check": 15.0, "fail_open": 0.0}
    assert dropped_checks(outs, before, full, cfg)["total"] == 0
    short = {"stage:detect": 13.0, "stage:output_check": 14.0, "fail_open": 1.0}
    d = dropped_checks(outs, before, short, cfg)
    assert (d["metrics_detect_gap"], d["metrics_output_check_gap"], d["fail_open"], d["total"]) == (2, 1, 1, 4)


def test_verdict_applies_the_latency_targets_only_at_the_target_level() -> None:
    cfg = LoadConfig()
    row = {"concurrency": 32, "proxy": {"status_5xx": 0}, "dropped_checks": {"total": 0},
           "added_p50_ms": 12.0, "added_p99_ms": 39.0}
    assert verdict(row, cfg) == ("PASS", [])
    slow = {**row, "added_p99_ms": 41.0}
    assert verdict(slow, cfg)[0] == "FAIL" and "p99" in verdict(slow, cfg)[1][0]
    assert verdict({**slow, "concurrency": 64}, cfg) == ("PASS", [])
    assert verdict({**row, "proxy": {"status_5xx": 2}}, cfg) == ("FAIL", ["2 5xx"])
