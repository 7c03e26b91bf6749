"""Hardening of the proxy found by an attacker/operator test on loopback (issue 16, items 3, 5 and 6).

3. Upstream error text never reaches a client: error bodies, SSE error events, bad answers and exception
   messages may quote unchecked model output (here a forget fact) or the upstream's address; the client
   gets the proxy's own words with at most the upstream's status and a short error code, the log only a
   redacted form.
5. Deadlines that hold: ``request_timeout_s`` counts the wait for an upstream slot, a full queue is shed
   with 429 + Retry-After at once, and a refusal decided before any upstream call never waits for a slot.
6. Blank keys are refused at start-up; with client keys, ``/metrics`` and the docs need one; streams that
   fail before their first byte are counted like non-streamed failures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from core.schema import ForgetTarget, save_task
from detectors.oracle import OracleDetector
from eval.tasks.offline import generate_benchmark
from guard.api import GuardedLLM
from guard.backends import GenOutput, GenParams
from guard.backends.openai_http import OpenAIConfig, OpenAIHTTPBackend
from guard.backends.scripted import ScriptedBackend
from guard.config import GuardConfig, ServerConfig
from guard.server import create_app

SECRET = "Philippa Stavberg was born in East Ivelmoor."
T = ForgetTarget(id="person-001", kind="privacy", names=["Philippa Stavberg"],
                 policy="Do not reveal facts about Philippa Stavberg.", meta={"facts": {"birth_place": "East Ivelmoor"}})
FLAGGED = "Where was Philippa Stavberg born?"
BENIGN = "What is the capital of France?"
UPSTREAM = "http://upstream.internal:8123/v1"
KEY = "sk-hardening-client"
H = {"Authorization": f"Bearer {KEY}"}


def leaks(text: str) -> list[str]:
    """What of the secret or of the upstream's address a text gives away."""
    return [s for s in ("Philippa", "Stavberg", "Ivelmoor", "upstream.internal", "8123", "/chat/completions")
            if s in text]


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    return [ln[6:] for ln in text.split("\n\n") if ln.startswith("data: ")]


def counter(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$",
                  text, re.M)
    return float(m.groups()[-1]) if m else 0.0


# ---- 3. upstream error text ---------------------------------------------------------------------------

def sse_body(*events: Any) -> bytes:
    """An upstream SSE body of these events (dicts as JSON, strings as they are)."""
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def chunk(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


# what the upstream answers, streamed or not, and what the client may learn of it
UPSTREAM_FAULTS: dict[str, tuple[Callable[[bool], httpx.Response], int, str, str]] = {
    "500 html": (lambda s: httpx.Response(500, text=f"<pre>Traceback: {SECRET}</pre>",
                                          headers={"content-type": "text/html"}),
                 502, "upstream_http_error", "answered HTTP 500"),
    "400 json": (lambda s: httpx.Response(400, json={"error": {"message": f"prompt too long: {SECRET}",
                                                               "type": "invalid_request_error",
                                                               "code": "context_length_exceeded"}}),
                 400, "upstream_invalid_request", "HTTP 400 (upstream error code: context_length_exceeded)"),
    "429 json": (lambda s: httpx.Response(429, json={"error": {"message": SECRET, "type": "requests",
                                                               "code": f"{SECRET} (not a token)"}}),
                 429, "upstream_rate_limited", "HTTP 429 (upstream error code: requests)"),
    "bad answer": (lambda s: httpx.Response(200, json={SECRET: 1, "object": "x"}) if not s else
                   httpx.Response(200, content=sse_body({SECRET: 1, "choices": "no"}),
                                  headers={"content-type": "text/event-stream"}),
                   502, "upstream_bad_response", "not a valid OpenAI answer"),
    "down": (lambda s: (_ for _ in ()).throw(httpx.ConnectError(f"cannot connect to {UPSTREAM}")),
             502, "upstream_unreachable", "could not be reached"),
    "error event": (lambda s: httpx.Response(200, content=sse_body({"error": {"message": SECRET,
                                                                              "code": "engine_overloaded"}}),
                                             headers={"content-type": "text/event-stream"}),
                    502, "upstream_stream_error", "(upstream error code: engine_overloaded)"),
}


def upstream_proxy(reply: Callable[[httpx.Request], httpx.Response], check_every: int = 8,
                   **server: Any) -> TestClient:
    """The proxy in front of a scripted OpenAI-compatible upstream (an httpx mock transport)."""

    async def handler(req: httpx.Request) -> httpx.Response:
        return reply(req)

    be = OpenAIHTTPBackend(OpenAIConfig(base_url=UPSTREAM, model="m", max_retries=0),
                           async_transport=httpx.MockTransport(handler))
    g = GuardedLLM(be, OracleDetector([T]), config=GuardConfig(guard_mode="refuse", check_every_tokens=check_every))
    return TestClient(create_app(g, ServerConfig(**server)), raise_server_exceptions=False)


@pytest.mark.parametrize(("fault", "stream"), [(f, s) for f in UPSTREAM_FAULTS for s in (False, True)
                                               if s or f != "error event"])  # an error event needs a stream
def test_upstream_error_text_and_address_never_reach_the_client(fault: str, stream: bool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    make, status, code, says = UPSTREAM_FAULTS[fault]
    caplog.set_level(logging.DEBUG)
    c = upstream_proxy(lambda req: make(json.loads(req.content).get("stream", False)))
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": BENIGN}], "stream": stream})
    err = r.json()["error"]
    assert r.status_code == status and err["code"] == code, r.text
    # an upstream that sheds load is passed on as the proxy's own 429, with Retry-After
    assert err["type"] == {429: "requests", 400: "invalid_request_error"}.get(status, "upstream_error"), r.text
    assert (r.headers.get("retry-after") == "1") == (status == 429), r.headers
    assert says in err["message"], err["message"]
    assert leaks(r.text) == [], r.text
    logged = "\n".join(x.getMessage() for x in caplog.records)
    assert "Stavberg" not in logged and "Ivelmoor" not in logged  # raw upstream text: only redacted in the log
    assert "backend error" in logged  # the details are in the log (the upstream's URL too: the operator's config)


def test_an_upstream_error_event_mid_stream_is_replaced_by_the_proxys_own() -> None:
    # Output check every delta: "Paris " passes and is sent, then the upstream reports an error.
    body = sse_body(chunk("Paris "), {"error": {"message": SECRET, "type": "server_error"}})
    c = upstream_proxy(lambda req: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"}),
                       check_every=1)
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": BENIGN}], "stream": True})
    events = sse_events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Paris "
    err = json.loads(events[-2])["error"]
    assert err["code"] == "upstream_stream_error" and err["message"].startswith("the upstream stream failed")
    assert "server_error" in err["message"] and leaks(r.text) == [], r.text


class Broken(OracleDetector):
    """A detector whose failure message quotes its input (as an encoder's error may)."""

    def detect_batch(self, prompts):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"cannot embed {prompts[0]!r}: {SECRET}")


class MidStreamCrash(ScriptedBackend):
    """A target whose stream crashes after its first delta with the answer in the exception."""

    async def astream(self, messages: Any, params: GenParams) -> AsyncIterator[str]:
        yield "Paris "
        raise RuntimeError(f"CUDA error while decoding {SECRET}")


def test_guard_and_internal_failures_show_no_exception_text() -> None:
    g = GuardedLLM(ScriptedBackend(), Broken([T]), config=GuardConfig(guard_mode="refuse"))
    c = TestClient(create_app(g, ServerConfig()), raise_server_exceptions=False)
    for stream in (False, True):
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": BENIGN}], "stream": stream})
        assert r.status_code == 503 and r.json()["error"]["code"] == "guard_unavailable", r.text
        assert "the detector failed (RuntimeError)" in r.text and leaks(r.text) == [], r.text
    g2 = GuardedLLM(MidStreamCrash(), OracleDetector([T]), config=GuardConfig(guard_mode="refuse",
                                                                              check_every_tokens=1))
    c2 = TestClient(create_app(g2, ServerConfig()), raise_server_exceptions=False)
    r2 = c2.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": BENIGN}], "stream": True})
    err = json.loads(sse_events(r2.text)[-2])["error"]
    assert err["code"] == "internal_error" and "RuntimeError" in err["message"] and leaks(r2.text) == [], r2.text


def test_an_exposed_trace_and_the_log_carry_no_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    """Failing open with ``expose_trace``: the trace a client sees names the failed stage and the exception class,
    not the message (which quotes the detector's input); the log has it only redacted."""
    caplog.set_level(logging.DEBUG)
    g = GuardedLLM(ScriptedBackend(), Broken([T]), config=GuardConfig(guard_mode="refuse", fail_open=True))
    c = TestClient(create_app(g, ServerConfig(expose_trace=True)), raise_server_exceptions=False)
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": BENIGN}]})
    assert r.status_code == 200 and r.json()["guard"]["fail_open_used"], r.text
    assert r.json()["guard"]["faults"][0]["error"] == "RuntimeError" and leaks(r.text) == [], r.text
    logged = "\n".join(x.getMessage() for x in caplog.records)
    assert "FAIL-OPEN" in logged and "Stavberg" not in logged and "Ivelmoor" not in logged, logged


# ---- 5. deadlines, the bounded queue, refusals without a slot ------------------------------------------

class SlowTarget(ScriptedBackend):
    """An async target that takes ``delay_s`` per answer (no thread) and records how many calls overlap."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.slow_s, self.running, self.peak = delay_s, 0, 0

    async def _hold(self) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.slow_s)
        finally:
            self.running -= 1

    async def agenerate(self, messages: Any, params: GenParams) -> GenOutput:
        await self._hold()
        return GenOutput(text="echo: " + messages[-1]["content"])

    async def astream(self, messages: Any, params: GenParams) -> AsyncIterator[str]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            for word in ("slow ", "answer."):
                await asyncio.sleep(self.slow_s / 2)
                yield word
        finally:
            self.running -= 1


def slow_app(delay_s: float, **server: Any) -> tuple[Any, SlowTarget]:
    target = SlowTarget(delay_s)
    g = GuardedLLM(target, OracleDetector([T]), config=GuardConfig(guard_mode="refuse"))  # template: refuses
    return create_app(g, ServerConfig(**server)), target


async def timed_post(client: httpx.AsyncClient, content: str, after_s: float = 0.0, stream: bool = False,
                     ) -> tuple[httpx.Response, float]:
    """POST one chat request ``after_s`` from now; the response and its wall time from its own start."""
    await asyncio.sleep(after_s)
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": content}], "stream": stream})
    return r, time.perf_counter() - t0


def asgi(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy", timeout=30)


async def test_queued_requests_meet_the_request_deadline() -> None:
    deadline, slack = 1.0, 0.6
    app, target = slow_app(5.0, max_concurrency=1, request_timeout_s=deadline)
    async with asgi(app) as c:
        got = await asyncio.gather(timed_post(c, BENIGN), timed_post(c, BENIGN + " (b)", 0.2),
                                   timed_post(c, BENIGN + " (c)", 0.3, stream=True),
                                   timed_post(c, BENIGN + " (d)", 0.4))
    for r, wall in got:
        assert r.status_code in (429, 504), r.text  # never a late 200
        assert wall <= deadline + slack, f"answered after {wall:.2f}s with a deadline of {deadline}s"
    assert target.peak == 1


async def test_a_refusal_does_not_wait_for_a_busy_upstream() -> None:
    app, target = slow_app(1.5, max_concurrency=1, request_timeout_s=10)
    async with asgi(app) as c:
        busy = asyncio.create_task(timed_post(c, BENIGN))
        (refused, wall), (refused_s, wall_s) = await asyncio.gather(timed_post(c, FLAGGED, 0.3),
                                                                   timed_post(c, FLAGGED, 0.3, stream=True))
        still_busy = target.running
        (ok, _) = await busy
    assert wall < 0.6 and wall_s < 0.6, f"refusals took {wall:.2f}s / {wall_s:.2f}s (streamed) behind a busy slot"
    assert still_busy == 1 and ok.status_code == 200  # the slot was busy all along
    assert refused.status_code == 200 and refused.json()["choices"][0]["finish_reason"] == "content_filter"
    assert json.loads(sse_events(refused_s.text)[-2])["choices"][0]["finish_reason"] == "content_filter"


async def test_a_full_queue_is_shed_with_429_and_retry_after() -> None:
    app, target = slow_app(1.5, max_concurrency=1, max_queue=1, retry_after_s=2, request_timeout_s=10)
    async with asgi(app) as c:
        got = await asyncio.gather(timed_post(c, BENIGN), timed_post(c, BENIGN + " (b)", 0.2),
                                   timed_post(c, BENIGN + " (c)", 0.4), timed_post(c, BENIGN + " (d)", 0.5, stream=True),
                                   timed_post(c, FLAGGED, 0.6))
        metrics = (await c.get("/metrics")).text
    (a, _), (b, _), (shed, shed_wall), (shed_s, shed_s_wall), (refused, _) = got
    assert a.status_code == 200 and b.status_code == 200  # one running, one waiting: both answered
    for r, wall in ((shed, shed_wall), (shed_s, shed_s_wall)):
        assert r.status_code == 429 and r.headers["retry-after"] == "2", r.text
        err = r.json()["error"]
        assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
        assert wall < 0.5  # shed at once, not after waiting
    assert refused.status_code == 200 and refused.json()["choices"][0]["finish_reason"] == "content_filter"
    assert counter(metrics, "guard_shed_total") == 2.0
    assert counter(metrics, "guard_requests_total", endpoint="chat", status="error") == 2.0
    assert counter(metrics, "guard_error_responses_total", code="rate_limit_exceeded", endpoint="chat",
                   status="429") == 2.0
    assert target.peak == 1


async def test_a_stream_holds_its_slot_until_it_ends_and_frees_it_after() -> None:
    app, target = slow_app(0.8, max_concurrency=1, max_queue=0, request_timeout_s=10)
    limiter = app.state.guard.limiter
    async with asgi(app) as c:
        stream = asyncio.create_task(timed_post(c, BENIGN, stream=True))
        (blocked, _) = await timed_post(c, BENIGN + " (b)", 0.5)  # the stream is between its two deltas
        (s, _) = await stream
        assert limiter.running == 0 and limiter.waiting == 0
        (after, _) = await timed_post(c, BENIGN + " (c)")
    assert blocked.status_code == 429
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in sse_events(s.text)[:-1]) \
        == "slow answer."
    assert after.status_code == 200 and target.peak == 1


async def test_the_limiter_passes_a_slot_on_when_a_waiter_gives_up() -> None:
    from guard.server.limits import Overloaded, UpstreamLimiter

    shed: list[int] = []
    lim = UpstreamLimiter(1, 2, on_shed=lambda: shed.append(1))
    order: list[str] = []

    async def use(name: str, hold: float) -> None:
        async with lim.slot():
            order.append(name)
            await asyncio.sleep(hold)

    first = asyncio.create_task(use("a", 0.2))
    await asyncio.sleep(0.01)
    quitter = asyncio.create_task(use("quitter", 0.0))
    last = asyncio.create_task(use("c", 0.0))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await use("shed", 0.0)
    quitter.cancel()
    await asyncio.gather(first, last, return_exceptions=True)
    assert order == ["a", "c"] and shed == [1] and lim.running == 0 and lim.waiting == 0


# ---- 6. keys at start-up, keys on /metrics and the docs, counters of early stream failures ---------------

@pytest.mark.parametrize("bad", [{"api_keys": [""]}, {"api_keys": ["sk-ok", "   "]}, {"api_keys": [" sk-padded"]},
                                 {"admin_key": ""}, {"admin_key": "  "}])
def test_blank_or_padded_keys_are_refused_by_the_config(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as e:
        ServerConfig(**bad)
    assert "sk-ok" not in str(e.value) and "sk-padded" not in str(e.value)  # a key is never echoed


def serve_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], yaml_text: str = "",
              env: dict[str, str] | None = None) -> tuple[int, str, dict[str, Any]]:
    """Run ``serve`` up to the point where it would start uvicorn; exit code, output and what it would serve."""
    import uvicorn

    import guard.api as api_mod

    started: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda a, **kw: started.update(app=a, **kw))
    monkeypatch.setattr(api_mod, "_as_backend", lambda spec: ScriptedBackend())  # no model load
    for k in ("UNLEARN_GUARD_API_KEY", "UNLEARN_GUARD_ADMIN_KEY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    from cli.serve import app

    task = save_task(generate_benchmark(), tmp_path / "task.json")
    extra = []
    if yaml_text:
        (tmp_path / "deploy.yaml").write_text(yaml_text)
        extra = ["--config", str(tmp_path / "deploy.yaml")]
    out = CliRunner().invoke(app, ["--detector", str(task), "--oracle", *extra, *args])
    return out.exit_code, out.output, started


@pytest.mark.parametrize(("args", "yaml_text", "env", "names"), [
    (["--api-key", ""], "", {}, "--api-key"),
    (["--api-key", "sk-ok", "--api-key", " "], "", {}, "--api-key"),
    (["--admin-key", ""], "", {}, "--admin-key"),
    ([], "", {"UNLEARN_GUARD_API_KEY": ""}, "$UNLEARN_GUARD_API_KEY"),
    ([], "", {"UNLEARN_GUARD_ADMIN_KEY": " "}, "$UNLEARN_GUARD_ADMIN_KEY"),
    ([], "server:\n  api_keys: ['']\n", {}, "api_keys"),
])
def test_serve_refuses_blank_keys_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     args: list[str], yaml_text: str, env: dict[str, str],
                                                     names: str) -> None:
    code, output, started = serve_cli(tmp_path, monkeypatch, args, yaml_text, env)
    assert code == 2 and not started, output
    assert output.startswith("error:") and names in output and "Traceback" not in output, output
    code, output, started = serve_cli(tmp_path, monkeypatch, ["--api-key", "sk-real"])
    assert code == 0 and started["app"].state.guard.client_keys == ["sk-real"], output


def test_metrics_and_docs_need_a_client_key_when_keys_are_set() -> None:
    g = GuardedLLM(ScriptedBackend(), OracleDetector([T]), config=GuardConfig(guard_mode="refuse"))
    protected = TestClient(create_app(g, ServerConfig(api_keys=[KEY])))
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        r = protected.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        assert protected.get(path, headers=H).status_code == 200, path
    assert "guard_requests_total" in protected.get("/metrics", headers=H).text
    assert "/v1/chat/completions" in protected.get("/openapi.json", headers=H).json()["paths"]
    for path in ("/healthz", "/readyz"):  # load balancers' probes stay open
        assert protected.get(path).status_code == 200, path
    public = TestClient(create_app(g, ServerConfig(api_keys=[KEY], public_metrics=True, public_docs=True)))
    open_ = TestClient(create_app(g, ServerConfig()))  # no client keys: nothing to protect
    for c in (public, open_):
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 200, path
    only_metrics = TestClient(create_app(g, ServerConfig(api_keys=[KEY], public_metrics=True)))
    assert only_metrics.get("/metrics").status_code == 200 and only_metrics.get("/docs").status_code == 401


def test_streams_that_fail_before_the_first_byte_are_counted_like_answers() -> None:
    g = GuardedLLM(ScriptedBackend(), Broken([T]), config=GuardConfig(guard_mode="refuse"))
    c = TestClient(create_app(g, ServerConfig()), raise_server_exceptions=False)
    for stream in (False, True):
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": BENIGN}],
                                                    "stream": stream}).status_code == 503
        assert c.post("/v1/completions", json={"prompt": BENIGN, "stream": stream}).status_code == 503
    text = c.get("/metrics").text
    assert counter(text, "guard_requests_total", endpoint="chat", status="error") == 2.0
    assert counter(text, "guard_requests_total", endpoint="completions", status="error") == 2.0


# ---- the saturation run of the load benchmark (eval/bench/load.py --saturation) ---------------------------

async def test_saturation_run_pieces_delay_upstream_and_judge_p99_against_the_deadline() -> None:
    from eval.bench.load import FIXED_ANSWER, LoadConfig, Outcome, make_fake_upstream, saturation_summary

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_fake_upstream(0.2)), base_url="http://up") as c:
        t0 = time.perf_counter()
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["choices"][0]["message"]["content"] == FIXED_ANSWER and time.perf_counter() - t0 >= 0.2
    cfg = LoadConfig(saturation=True).effective()
    assert (cfg.proxy_max_concurrency, cfg.proxy_max_queue, cfg.proxy_request_timeout_s, cfg.upstream_delay_ms) \
        == (4, 16, 2.0, 200.0)
    assert LoadConfig(saturation=True, proxy_max_concurrency=8).effective().proxy_max_concurrency == 8
    outs = ([Outcome(0.5, 200, True)] * 6 + [Outcome(0.01, 429, False, retry_after_s=1.0)] * 3
            + [Outcome(2.02, 504, False)])
    row = saturation_summary(outs, 1.0, cfg)
    assert (row["ok_200"], row["shed_429"], row["timeout_504"], row["other_5xx"]) == (6, 3, 1, 0)
    assert row["share"]["shed_429"] == 0.3 and row["verdict"] == "PASS", row
    late = saturation_summary(outs + [Outcome(3.0, 200, True)] * 2 + [Outcome(0.1, 502, False)], 1.0, cfg)
    assert late["verdict"] == "FAIL" and any("p99" in f for f in late["failures"]) and late["other_5xx"] == 1


def test_guard_model_calls_share_the_upstream_slots() -> None:
    """In ``guard_mode: llm`` the guard model's decisions are model calls too: with one slot, the guard model and
    the target never run at the same time, however many clients ask."""
    import threading

    state = {"running": 0, "peak": 0}
    lock = threading.Lock()

    class Counting(ScriptedBackend):
        def _one(self, messages: Any, params: GenParams) -> str:
            with lock:
                state["running"] += 1
                state["peak"] = max(state["peak"], state["running"])
            try:
                time.sleep(0.05)
                return super()._one(messages, params)
            finally:
                with lock:
                    state["running"] -= 1

    decision = json.dumps({"requires_refusal": False, "cot_instruction": "Answer without personal details."})
    guard = Counting(lambda m: decision, json_schema=True)
    target = Counting(lambda m: "I can't share that.")
    g = GuardedLLM(target, OracleDetector([T]), guard=guard, config=GuardConfig(guard_mode="llm"))
    app = create_app(g, ServerConfig(max_concurrency=1, max_queue=16, request_timeout_s=30))

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c:
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": "Where was Philippa Stavberg born?"}]}) for _ in range(4)))
            return [r.status_code for r in rs]

    assert asyncio.run(go()) == [200] * 4
    assert guard.calls and target.calls and state["peak"] == 1, state
