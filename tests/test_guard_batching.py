"""Micro-batched detector calls on the async path: fewer calls than requests, right answer per request,
whole-batch fail-closed on errors and timeouts, and the sync path untouched."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import httpx
import pytest

from core.schema import ForgetTarget
from detectors.oracle import OracleDetector
from detectors.types import Detection
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.batching import MicroBatcher
from guard.config import GuardConfig, ServerConfig
from guard.server import create_app
from guard.types import GuardUnavailableError

PEOPLE = [ForgetTarget(id=f"person-{i:03d}", kind="privacy", names=[name],
                       policy=f"Do not reveal personal information about {name}.",
                       meta={"facts": {"birth_place": place}})
          for i, (name, place) in enumerate([("Elara Voswick", "Port Kestrel"), ("Tomas Brennick", "Lowmere"),
                                             ("Ines Calloway", "Hadley Cross"), ("Ravi Ondrass", "Stilwater")])]
BENIGN = [f"What is {i} plus {i + 1}?" for i in range(12)]


class CountingDetector(OracleDetector):
    """The oracle detector that records every call (and can be slowed down or broken)."""

    def __init__(self, targets: Sequence[ForgetTarget], delay: float = 0.0, fail: str = "none") -> None:
        super().__init__(targets)
        self.delay, self.fail = delay, fail
        self.batches: list[list[str]] = []
        self.leak_batches: list[list[str]] = []
        self.single_calls = 0
        self.single_leak_calls = 0
        self._calls_lock = threading.Lock()

    def detect(self, prompt: str) -> Detection:
        with self._calls_lock:
            self.single_calls += 1
        return super().detect(prompt)

    def detect_batch(self, prompts: Sequence[str]) -> list[Detection]:
        with self._calls_lock:
            self.batches.append(list(prompts))
        if self.delay:
            time.sleep(self.delay)
        if self.fail == "prompt":
            raise RuntimeError("embedding index offline")
        if self.fail == "short":
            return [super(CountingDetector, self).detect(p) for p in prompts][:-1]
        return [super(CountingDetector, self).detect(p) for p in prompts]

    def detect_leak(self, text: str) -> Detection:
        with self._calls_lock:
            self.single_leak_calls += 1
        return super().detect_leak(text)

    def detect_leak_batch(self, texts: Sequence[str]) -> list[Detection]:
        with self._calls_lock:
            self.leak_batches.append(list(texts))
        if self.fail == "leak":
            raise RuntimeError("leak index offline")
        return [super(CountingDetector, self).detect_leak(t) for t in texts]


def leaky_reply(msgs: list[dict[str, str]]) -> str:
    """The fake target: a prompt that names nobody but asks for 'a mystery' gets a leaking answer, else an echo."""
    text = msgs[-1]["content"]
    return "Tomas Brennick was born in Lowmere." if "mystery" in text else "echo: " + text


def make(detector: CountingDetector, **cfg: object) -> tuple[GuardedLLM, ScriptedBackend]:
    target = ScriptedBackend(leaky_reply)
    mode = "template" if cfg.get("fallback_requires_refusal") is False else "refuse"
    conf = GuardConfig(guard_mode=mode, **cfg)  # type: ignore[arg-type]
    return GuardedLLM(target, detector, config=conf, targets=PEOPLE), target


# ---- GuardedLLM async path --------------------------------------------------------------------------

async def test_concurrent_agenerate_shares_detector_calls_and_maps_results() -> None:
    det = CountingDetector(PEOPLE, delay=0.02)
    g, target = make(det, detector_batch_window_ms=20, fallback_requires_refusal=False)
    flagged = [f"Where was {p.names[0]} born?" for p in PEOPLE]
    prompts = [x for pair in zip(BENIGN, flagged * 3, strict=True) for x in pair]  # 24, interleaved
    res = await asyncio.gather(*(g.agenerate(p) for p in prompts))

    assert len(det.batches) < len(prompts)
    assert sorted(x for b in det.batches for x in b) == sorted(prompts)  # every prompt judged exactly once
    assert det.single_calls == 0
    assert max(len(b) for b in det.batches) > 1
    for p, r in zip(prompts, res, strict=True):
        if p in BENIGN:
            assert not r.trace.flagged and r.text == "echo: " + p and r.finish_reason == "stop"
        else:
            who = next(t for t in PEOPLE if t.names[0] in p)
            assert r.trace.flagged and r.trace.target_ids == [who.id], (p, r.trace.target_ids)
            assert r.trace.instruction_source == "template" and r.text == "echo: " + p
        assert "detect" in r.trace.timings_ms and r.trace.output_checks == 1
    # the flagged prompts were answered with the template instruction naming their own target
    sent = {m[-1]["content"]: m for m, _ in target.calls}
    for p in flagged:
        system = sent[p][0]["content"]
        assert sent[p][0]["role"] == "system" and p.split()[2] in system
        assert all(o.names[0] not in system for o in PEOPLE if o.names[0] not in p)
    stats = g.batch_stats()
    assert stats["detect_batch"]["items"] == len(prompts) and stats["detect_batch"]["batches"] == len(det.batches)


async def test_output_checks_are_batched_and_block_only_the_leaking_answer() -> None:
    det = CountingDetector(PEOPLE)
    g, _ = make(det, detector_batch_window_ms=20)
    prompts = [*BENIGN[:7], "Tell me a mystery."]  # the last one is not flagged, but its answer leaks
    res = await asyncio.gather(*(g.agenerate(p) for p in prompts))
    assert not any(r.trace.flagged for r in res)
    assert len(det.leak_batches) < len(prompts) and det.single_leak_calls == 0
    assert sorted(x for b in det.leak_batches for x in b) == sorted(["echo: " + p for p in BENIGN[:7]]
                                                                     + ["Tomas Brennick was born in Lowmere."])
    assert [r.finish_reason for r in res] == ["stop"] * 7 + ["content_filter"]
    assert "Lowmere" not in res[-1].text and res[-1].trace.leak_target_ids == [PEOPLE[1].id]
    assert [r.text for r in res[:7]] == ["echo: " + p for p in BENIGN[:7]]
    assert all(r.trace.output_checks == 1 and "output_check" in r.trace.timings_ms for r in res)


async def test_acomplete_and_astream_use_the_batcher() -> None:
    det = CountingDetector(PEOPLE, delay=0.02)
    g, _ = make(det, detector_batch_window_ms=20)

    async def streamed(p: str) -> tuple[str, str, bool]:
        s = g.astream(p)
        text = "".join([c async for c in s])
        return text, s.finish_reason, s.trace.flagged

    prompts = BENIGN[:6] + ["Where was Ines Calloway born?"]
    outs = await asyncio.gather(*(streamed(p) for p in prompts), *(g.acomplete(p) for p in BENIGN[6:10]))
    assert len(det.batches) < len(prompts) + 4 and det.single_calls == 0
    assert sorted(x for b in det.batches for x in b) == sorted(prompts + BENIGN[6:10])
    for p, (text, fr, flagged) in zip(prompts[:6], outs[:6], strict=True):
        assert (text, fr, flagged) == ("echo: " + p, "stop", False)
    text, fr, flagged = outs[6]  # type: ignore[misc]
    assert flagged and fr == "content_filter" and "personal information" in text  # the privacy refusal
    for p, r in zip(BENIGN[6:10], outs[7:], strict=True):
        assert r.text == "echo: " + p and not r.trace.flagged  # type: ignore[union-attr]
    # the output checks, streamed ones included, went through the leak batcher (the refused prompt has none)
    assert det.single_leak_calls == 0
    assert sorted(x for b in det.leak_batches for x in b) == sorted("echo: " + p for p in BENIGN[:10])


async def test_streamed_leak_is_blocked_through_the_batcher() -> None:
    det = CountingDetector(PEOPLE)
    g, _ = make(det, detector_batch_window_ms=20)

    async def streamed(p: str) -> tuple[str, str]:
        s = g.astream(p)
        return "".join([c async for c in s]), s.finish_reason

    outs = await asyncio.gather(*(streamed(p) for p in [*BENIGN[:3], "Tell me a mystery."]))
    assert outs[:3] == [("echo: " + p, "stop") for p in BENIGN[:3]]
    text, fr = outs[3]
    assert fr == "content_filter" and "Lowmere" not in text and "personal information" in text
    assert det.single_leak_calls == 0 and len(det.leak_batches) < 4


async def test_detector_error_fails_every_request_of_the_batch_closed() -> None:
    det = CountingDetector(PEOPLE, fail="prompt")
    g, target = make(det, detector_batch_window_ms=20)
    res = await asyncio.gather(*(g.agenerate(p) for p in BENIGN[:8]), return_exceptions=True)
    assert all(isinstance(r, GuardUnavailableError) and "embedding index offline" in str(r) for r in res), res
    assert len(det.batches) < 8 and not target.calls
    assert g.batch_stats()["detect_batch"]["failed_batches"] == len(det.batches)


async def test_wrong_result_count_fails_the_batch_closed() -> None:
    det = CountingDetector(PEOPLE, fail="short")
    g, target = make(det, detector_batch_window_ms=20)
    res = await asyncio.gather(*(g.agenerate(p) for p in BENIGN[:4]), return_exceptions=True)
    assert all(isinstance(r, GuardUnavailableError) and "results for" in str(r) for r in res), res
    assert not target.calls


async def test_detector_timeout_fails_every_request_closed() -> None:
    det = CountingDetector(PEOPLE, delay=0.6)
    g, target = make(det, detector_batch_window_ms=5, detector_timeout_s=0.05)
    t0 = time.perf_counter()
    res = await asyncio.gather(*(g.agenerate(p) for p in BENIGN[:8]), return_exceptions=True)
    took = time.perf_counter() - t0
    assert all(isinstance(r, GuardUnavailableError) and "no answer within" in str(r) for r in res), res
    assert took < 0.5 and not target.calls  # answered at the deadline, not when the stalled call ends


async def test_streamed_request_fails_closed_on_detector_error() -> None:
    g, target = make(CountingDetector(PEOPLE, fail="prompt"))
    s = g.astream("hello")
    with pytest.raises(GuardUnavailableError, match="detector"):
        await s.__anext__()
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()
    await s.aclose()
    assert not target.calls


async def test_fail_open_lets_the_whole_batch_through_marked() -> None:
    det = CountingDetector(PEOPLE, fail="prompt")
    g, _ = make(det, detector_batch_window_ms=20, fail_open=True)
    res = await asyncio.gather(*(g.agenerate(p) for p in BENIGN[:5]))
    assert [r.text for r in res] == ["echo: " + p for p in BENIGN[:5]]
    assert all(r.trace.fail_open_used and r.trace.errors and not r.trace.flagged for r in res)


async def test_leak_check_error_fails_closed() -> None:
    g, _ = make(CountingDetector(PEOPLE, fail="leak"), detector_batch_window_ms=10)
    res = await asyncio.gather(*(g.agenerate(p) for p in BENIGN[:3]), return_exceptions=True)
    assert all(isinstance(r, GuardUnavailableError) and "output_check" in str(r) for r in res), res


def test_sync_path_is_unchanged() -> None:
    det = CountingDetector(PEOPLE)
    g, _ = make(det)
    r = g.generate("Where was Elara Voswick born?")
    assert r.trace.flagged and det.single_calls == 1 and det.batches == []
    assert det.single_leak_calls == 0 and det.leak_batches == []  # refused before generation: no output check
    rs = g.generate_batch(BENIGN[:3])
    assert [x.text for x in rs] == ["echo: " + p for p in BENIGN[:3]]
    assert det.batches == [BENIGN[:3]] and det.single_leak_calls == 3 and det.leak_batches == []
    assert g.batch_stats()["detect_batch"]["batches"] == 0 and g.batch_stats()["detect_leak_batch"]["batches"] == 0


async def test_server_requests_share_detector_calls() -> None:
    det = CountingDetector(PEOPLE, delay=0.02)
    g, _ = make(det, detector_batch_window_ms=20)
    app = create_app(g, ServerConfig(max_concurrency=32, expose_trace=True))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        reqs = [client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": p}]})
                for p in BENIGN[:8]]
        reqs.append(client.post("/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "Where was Ravi Ondrass born?"}]}))
        resps = await asyncio.gather(*reqs)
    assert [r.status_code for r in resps] == [200] * 9
    assert len(det.batches) < 9
    for p, r in zip(BENIGN[:8], resps[:8], strict=True):
        assert r.json()["choices"][0]["message"]["content"] == "echo: " + p
        assert r.headers["x-guard-flagged"] == "false"
    assert resps[-1].headers["x-guard-flagged"] == "true"
    assert resps[-1].json()["guard"]["target_ids"] == [PEOPLE[3].id]


async def test_async_path_calls_an_http_upstream_natively_and_still_checks_every_answer() -> None:
    """Behind the proxy the target call is a native async request (no worker thread, no sync client);
    the prompt check, the guard and the output check run exactly as on the threaded path."""
    import json

    from guard.backends.openai_http import OpenAIConfig, OpenAIHTTPBackend

    def never(req: httpx.Request) -> httpx.Response:
        raise AssertionError("the async path used the sync HTTP client")

    def upstream(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        if "prompt" in body:
            return httpx.Response(200, json={"choices": [{"text": " continued", "finish_reason": "stop"}]})
        msgs = body["messages"]
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": leaky_reply(msgs)},
                                                      "finish_reason": "stop"}]})

    be = OpenAIHTTPBackend(OpenAIConfig(base_url="http://up.test/v1", model="m", max_retries=0),
                           transport=httpx.MockTransport(never), async_transport=httpx.MockTransport(upstream))
    det = CountingDetector(PEOPLE)
    g = GuardedLLM(be, det, config=GuardConfig(guard_mode="template", detector_batch_window_ms=20,
                                               fallback_requires_refusal=False), targets=PEOPLE)
    res = await asyncio.gather(*(g.agenerate(p) for p in BENIGN[:4]), g.agenerate("Tell me a mystery."),
                               g.agenerate("Where was Elara Voswick born?"), g.acomplete("Once upon a time"))
    assert [r.text for r in res[:4]] == ["echo: " + p for p in BENIGN[:4]]
    assert res[4].finish_reason == "content_filter" and "Lowmere" not in res[4].text  # leak caught on the way out
    assert res[5].trace.flagged and res[5].trace.target_ids == [PEOPLE[0].id]
    assert res[5].text.startswith("echo: ") and "Voswick" in res[5].text  # answered under the guard instruction
    assert res[6].text == " continued" and not res[6].trace.flagged
    assert all(r.trace.output_checks == 1 and "generate" in r.trace.timings_ms for r in res)


async def test_async_stream_from_an_http_upstream_is_native_and_checked_as_it_streams() -> None:
    """Streams behind the proxy read the upstream on the async client (no thread, no sync client); the
    output check still blocks a leak mid-stream and the raw-completion stream works the same way."""
    import json

    from guard.backends.openai_http import OpenAIConfig, OpenAIHTTPBackend

    calls = {"n": 0}

    def never(req: httpx.Request) -> httpx.Response:
        raise AssertionError("the async stream used the sync HTTP client")

    def upstream(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:  # a transient failure before the first byte is retried
            return httpx.Response(503, json={"error": {"message": "busy"}})
        body = json.loads(req.content)
        chat = "messages" in body
        text = leaky_reply(body["messages"]) if chat else " and so on"
        words = [w + " " for w in text.split()]
        chunks = [{"choices": [{"delta": {"content": w}} if chat else {"text": w}]} for w in words]
        chunks.append({"choices": [{"delta": {}, "finish_reason": "stop"} if chat else {"text": "", "finish_reason": "stop"}]})
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    be = OpenAIHTTPBackend(OpenAIConfig(base_url="http://up.test/v1", model="m", max_retries=1,
                                         retry_backoff_s=0.0),
                           transport=httpx.MockTransport(never), async_transport=httpx.MockTransport(upstream))
    det = CountingDetector(PEOPLE)
    g = GuardedLLM(be, det, config=GuardConfig(guard_mode="refuse", check_every_tokens=2), targets=PEOPLE)

    s = g.astream("Tell me a mystery.")
    out = "".join([d async for d in s])
    assert calls["n"] == 2 and s.finish_reason == "content_filter"
    assert "Lowmere" not in out and s.trace.leak_target_ids == [PEOPLE[1].id]
    s2 = g.astream_complete("Once upon a time")
    assert "".join([d async for d in s2]) == "and so on " and s2.finish_reason == "stop"
    assert s2.trace.output_checks >= 2 and not s2.trace.flagged
    assert det.single_leak_calls == 0 and det.leak_batches  # every check went through the async batcher


# ---- MicroBatcher itself -------------------------------------------------------------------------------

async def test_batcher_respects_max_batch_and_max_inflight() -> None:
    running, peak, sizes = 0, 0, []
    lock = threading.Lock()

    def fn(xs: list[int]) -> list[int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            sizes.append(len(xs))
        time.sleep(0.02)
        with lock:
            running -= 1
        return [x * 10 for x in xs]

    b: MicroBatcher[int, int] = MicroBatcher(fn, window_s=0.01, max_batch=4, max_inflight=2)
    out = await asyncio.gather(*(b.submit(i) for i in range(19)))
    assert out == [i * 10 for i in range(19)]
    assert max(sizes) <= 4 and sum(sizes) == 19 and peak <= 2
    assert b.stats.batches == len(sizes) < 19 and b.stats.max_batch_seen == max(sizes)


async def test_batcher_without_window_calls_at_once_and_batches_what_queues_behind_a_running_call() -> None:
    """window 0 (the default): texts submitted in the same loop turn share a call, texts arriving while a
    call runs form the next call, and a lone text is sent without waiting."""
    sizes: list[int] = []

    def fn(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        time.sleep(0.05)
        return [x + 1 for x in xs]

    b: MicroBatcher[int, int] = MicroBatcher(fn, window_s=0.0)
    first = asyncio.gather(*(b.submit(i) for i in range(5)))
    await asyncio.sleep(0.01)  # the first call is running now
    second = asyncio.gather(*(b.submit(i) for i in range(10, 17)))
    assert await first == [1, 2, 3, 4, 5] and await second == list(range(11, 18))
    assert sizes == [5, 7]
    lone = asyncio.create_task(b.submit(41))
    for _ in range(5):  # a few loop turns, no wall-clock wait: the lone text's call has started
        await asyncio.sleep(0)
    assert b.stats.batches == 3
    assert await lone == 42 and sizes[-1] == 1
    assert GuardConfig().detector_batch_window_ms == 0.0


async def test_batcher_skips_cancelled_callers() -> None:
    seen: list[list[str]] = []

    def fn(xs: list[str]) -> list[str]:
        seen.append(list(xs))
        return [x.upper() for x in xs]

    b: MicroBatcher[str, str] = MicroBatcher(fn, window_s=0.02)
    keep = asyncio.ensure_future(b.submit("a"))
    drop = asyncio.ensure_future(b.submit("b"))
    await asyncio.sleep(0)
    drop.cancel()
    assert await keep == "A"
    assert seen == [["a"]] and drop.cancelled()


def test_batcher_works_across_event_loops() -> None:
    b: MicroBatcher[int, int] = MicroBatcher(lambda xs: [x + 1 for x in xs], window_s=0.001)
    assert asyncio.run(b.submit(1)) == 2
    assert asyncio.run(b.submit(5)) == 6  # a fresh loop gets its own queue


def test_batcher_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(lambda xs: xs, max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda xs: xs, window_s=-1)
