"""Backends: transformers (tiny model), OpenAI-compatible HTTP (mock transport), vLLM availability."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from core.generation import generate
from core.models import tiny_llm
from guard.backends import BACKENDS, GenParams, backend_config, make_backend
from guard.backends.openai_http import OpenAIConfig, OpenAIHTTPBackend
from guard.backends.transformers import TransformersBackend
from guard.types import BackendError

MSGS = [{"role": "user", "content": "Where was the author born?"}]


@pytest.fixture(scope="module")
def tiny() -> TransformersBackend:
    return TransformersBackend(tiny_llm(seed=3), batch_size=4)


def test_registry_and_config_validation() -> None:
    from guard.backends import _load_builtin

    _load_builtin()
    assert {"transformers", "openai", "vllm"} <= set(BACKENDS.names())
    with pytest.raises(ValueError, match="base_url"):
        backend_config(kind="openai")


def test_transformers_batch_matches_core_generate(tiny: TransformersBackend) -> None:
    prompts = [MSGS, [{"role": "user", "content": "What is the capital of France?"}], "The quick brown fox"]
    outs = tiny.generate_batch([m if isinstance(m, list) else [{"role": "user", "content": m}] for m in prompts],
                               GenParams(max_new_tokens=10))
    ref = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=10, batch_size=4)
    assert [o.text for o in outs] == ref


def test_transformers_stream_equals_generate(tiny: TransformersBackend) -> None:
    p = GenParams(max_new_tokens=12, stop=["zzz-never"])
    whole = tiny.generate(MSGS, p).text
    assert "".join(tiny.stream(MSGS, p)).strip() == whole


def test_transformers_prefix_and_stop(tiny: TransformersBackend) -> None:
    free = tiny.generate(MSGS, GenParams(max_new_tokens=12, assistant_prefix='{"a": ')).text
    assert isinstance(free, str)
    words = tiny.complete_batch(["The quick brown"], GenParams(max_new_tokens=12))[0].text
    if words.strip():
        stop = words.strip().split()[0]
        cut = tiny.complete_batch(["The quick brown"], GenParams(max_new_tokens=12, stop=[stop]))[0]
        assert stop not in cut.text and cut.finish_reason == "stop"


def test_closing_a_stream_stops_generation(tiny: TransformersBackend) -> None:
    before = threading.active_count()
    it = tiny.stream_complete("The quick brown", GenParams(max_new_tokens=200))
    next(it)
    it.close()
    assert threading.active_count() <= before + 1


# ---- OpenAI-compatible HTTP -------------------------------------------------------------------------

def _chat_body(text: str) -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": text}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def _backend(handler, retries: int = 2) -> OpenAIHTTPBackend:
    cfg = OpenAIConfig(base_url="http://upstream.test/v1", model="m", api_key="sk-up",
                        max_retries=retries, retry_backoff_s=0.0)
    return OpenAIHTTPBackend(cfg, transport=httpx.MockTransport(handler),
                             async_transport=httpx.MockTransport(handler))


def test_http_generate_sends_openai_request() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json=_chat_body("hi"))

    be = _backend(handler)
    out = be.generate(MSGS, GenParams(max_new_tokens=7, stop=["\n"]))
    body = json.loads(seen[0].content)
    assert out.text == "hi" and out.prompt_tokens == 3
    assert seen[0].url.path == "/v1/chat/completions" and seen[0].headers["authorization"] == "Bearer sk-up"
    assert body["max_tokens"] == 7 and body["stop"] == ["\n"] and body["messages"] == MSGS


def _ask(be: OpenAIHTTPBackend, how: str, params: GenParams | None = None) -> str:
    """One chat answer through the sync or the native async client."""
    p = params or GenParams()
    if how == "sync":
        return be.generate(MSGS, p).text
    return asyncio.run(be.agenerate(MSGS, p)).text


@pytest.mark.parametrize("how", ["sync", "async"])
def test_http_retries_transient_errors_then_fails_clearly(how: str) -> None:
    calls = {"n": 0}

    def flaky(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(503, json={"error": {"message": "overloaded"}}) if calls["n"] < 3 else \
            httpx.Response(200, json=_chat_body("ok"))

    assert _ask(_backend(flaky), how) == "ok" and calls["n"] == 3

    def down(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        raise httpx.ConnectError("refused", request=req)

    calls["n"] = 0
    with pytest.raises(BackendError, match="refused") as e:
        _ask(_backend(down, retries=1), how)
    assert e.value.kind == "unreachable" and calls["n"] == 2

    def bad(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(401, json={"error": {"message": "bad key"}})

    calls["n"] = 0
    with pytest.raises(BackendError, match="HTTP 401") as e:
        _ask(_backend(bad), how)
    assert e.value.kind == "http_error" and calls["n"] == 1  # a client error is not retried
    assert "bad key" not in str(e.value) and getattr(e.value, "status", None) == 401  # upstream text: redacted


@pytest.mark.parametrize("how", ["sync", "async"])
def test_http_response_format_and_fallback_when_rejected(how: str) -> None:
    bodies: list[dict] = []

    def handler(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        bodies.append(body)
        if "response_format" in body:
            return httpx.Response(400, json={"error": {"message": "response_format unsupported"}})
        return httpx.Response(200, json=_chat_body("{}"))

    be = _backend(handler)
    assert _ask(be, how, GenParams(json_schema={"type": "object"})) == "{}"
    assert bodies[0]["response_format"]["type"] == "json_schema" and "response_format" not in bodies[1]
    assert be.supports_json_schema is False
    _ask(be, how, GenParams(json_schema={"type": "object"}))
    assert len(bodies) == 3 and "response_format" not in bodies[2]  # remembered: asked without it at once


def test_http_stream_parses_sse() -> None:
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
              {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
              {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    def handler(req: httpx.Request) -> httpx.Response:
        assert json.loads(req.content)["stream"] is True
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    be = _backend(handler)
    assert list(be.stream(MSGS, GenParams())) == ["Hel", "lo"]


async def test_http_async_paths() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if json.loads(req.content).get("stream"):
            return httpx.Response(200, content=b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\n')
        return httpx.Response(200, json=_chat_body("async ok"))

    be = _backend(handler)
    assert (await be.agenerate(MSGS, GenParams())).text == "async ok"
    assert [o.text for o in await be.agenerate_batch([MSGS, MSGS], GenParams())] == ["async ok", "async ok"]
    assert [d async for d in be.astream(MSGS, GenParams())] == ["a"]


async def test_http_async_calls_use_the_async_client_only() -> None:
    """agenerate/acomplete hold no worker thread: the sync client is never touched on the async path."""
    paths: list[str] = []

    def sync_handler(req: httpx.Request) -> httpx.Response:
        raise AssertionError("the async path used the sync client")

    def handler(req: httpx.Request) -> httpx.Response:
        paths.append(req.url.path)
        body = json.loads(req.content)
        if req.url.path.endswith("/completions") and "prompt" in body:
            return httpx.Response(200, json={"choices": [{"text": body["prompt"] + "!", "finish_reason": "length"}]})
        return httpx.Response(200, json=_chat_body("chat ok"))

    cfg = OpenAIConfig(base_url="http://upstream.test/v1", model="m", max_retries=0)
    be = OpenAIHTTPBackend(cfg, transport=httpx.MockTransport(sync_handler), async_transport=httpx.MockTransport(handler))
    out = await be.acomplete("go", GenParams())
    assert (out.text, out.finish_reason) == ("go!", "length")
    assert (await be.agenerate(MSGS, GenParams())).text == "chat ok"
    assert paths == ["/v1/completions", "/v1/chat/completions"]


def test_http_async_client_per_event_loop() -> None:
    """Connections pooled on one event loop are unusable on another: each loop gets its own client."""
    be = _backend(lambda req: httpx.Response(200, json=_chat_body("ok")))

    async def ask() -> tuple[str, httpx.AsyncClient]:
        return (await be.agenerate(MSGS, GenParams())).text, be._async_client()

    (t1, c1), (t2, c2) = asyncio.run(ask()), asyncio.run(ask())
    assert (t1, t2) == ("ok", "ok") and c1 is not c2

    async def same_loop() -> bool:
        return be._async_client() is be._async_client()

    assert asyncio.run(same_loop())
    be.close()


def test_make_backend_openai() -> None:
    be = make_backend(OpenAIConfig(base_url="http://127.0.0.1:9/v1", connect_timeout_s=0.2,
                                    max_retries=0))
    assert isinstance(be, OpenAIHTTPBackend) and be.ready() is False
    be.close()


def test_vllm_backend_explains_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from guard.backends.vllm import VLLMBackend

    real_import = builtins.__import__

    def no_vllm(name: str, *a: object, **k: object) -> object:
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(BackendError, match=r"unlearn-guard\[vllm\]"):
        VLLMBackend("smollm2-135m-instruct")
