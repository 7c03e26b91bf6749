"""OpenAI-compatible HTTP proxy in front of a GuardedLLM (FastAPI, a thin layer).

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (``stream: true`` as SSE ending with
``data: [DONE]``), ``/v1/models``, ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), and
``/admin/targets`` (GET, POST) / ``/admin/targets/{id}`` (DELETE) behind a separate admin key.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``. A failed or late
detector answers 503 ``guard_unavailable`` (fail closed); a refused or blocked answer is a normal
completion with ``finish_reason: "content_filter"``. Blocking work runs in worker threads, bounded by
``max_concurrency``; keys are compared with ``hmac.compare_digest`` and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.schema import ForgetTarget
from guard.api import AsyncGuardStream, GuardedLLM, GuardResult
from guard.backends import GenParams
from guard.config import ServerConfig
from guard.types import AdminError, BackendError, GuardTrace, GuardUnavailableError

log = logging.getLogger(__name__)


# ---- schemas -----------------------------------------------------------------------------------------

class ChatMessageIn(BaseModel):
    """One OpenAI chat message; text parts of multi-part content are joined."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text content."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise ApiError(400, f"content part type {p.get('type')!r} is not supported (text only)",
                               "invalid_request_error", "messages")
            parts.append(str(p.get("text", "")))
        return "".join(parts)


class _GenRequest(BaseModel):
    """Fields shared by chat and text completions (unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class ChatCompletionRequest(_GenRequest):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_GenRequest):
    """POST /v1/completions body."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        """Status, message and OpenAI error type (e.g. invalid_request_error)."""
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code or type_
        self.headers = headers


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code or type_}}


# ---- metrics -----------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        """Create the counters and histograms."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("guard_requests_total", "Requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.flagged = Counter("guard_flagged_total", "Prompts flagged by the detector", registry=r)
        self.refused = Counter("guard_refusals_total", "Answers replaced by a refusal", ["reason"], registry=r)
        self.fail_open = Counter("guard_fail_open_total", "Requests let through by fail_open", registry=r)
        self.errors = Counter("guard_errors_total", "Guard stage failures", ["stage"], registry=r)
        self.stage = Histogram("guard_stage_seconds", "Time per guard stage", ["stage"], registry=r,
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("guard_request_seconds", "Whole request time", ["endpoint"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def observe(self, trace: GuardTrace) -> None:
        """Record one finished request's trace."""
        if trace.flagged:
            self.flagged.inc()
        if trace.requires_refusal:
            self.refused.labels("guard").inc()
        if trace.output_check_fired and trace.output_check_mode == "block":
            self.refused.labels("output_check").inc()
        if trace.fail_open_used:
            self.fail_open.inc()
        for e in trace.errors:
            self.errors.labels(e.split(":", 1)[0]).inc()
        for stage, ms in trace.timings_ms.items():
            self.stage.labels(stage).observe(ms / 1000.0)


# ---- middleware ----------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (Content-Length checked first, then counted)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        """Wrap an ASGI app."""
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                await self._reject(send)
                return
        seen = 0
        too_big = False

        async def limited() -> dict[str, Any]:
            nonlocal seen, too_big
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    too_big = True
                    raise ApiError(413, f"request body over {self.max_bytes} bytes", "invalid_request_error")
            return msg

        try:
            await self.app(scope, limited, send)
        except ApiError:
            if too_big:
                await self._reject(send)
            else:
                raise

    async def _reject(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        body = json.dumps(_error_body(f"request body over {self.max_bytes} bytes", "invalid_request_error",
                                      code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---- app -------------------------------------------------------------------------------------------------

def _key_of(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _matches(given: str | None, keys: list[str]) -> bool:
    """Constant-time key check against every configured key (no early exit on a match)."""
    if given is None:
        return False
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


def create_app(guarded: GuardedLLM, config: ServerConfig | None = None) -> FastAPI:
    """Build the proxy app around a GuardedLLM (the guarded model may itself be an upstream server)."""
    cfg = config or ServerConfig()
    metrics = Metrics()
    sem = asyncio.Semaphore(cfg.max_concurrency)
    client_keys = [k.get_secret_value() for k in cfg.api_keys]
    admin_key = cfg.admin_key.get_secret_value() if cfg.admin_key else None
    app = FastAPI(title="unlearn-guard proxy", version="0.1.0")
    app.state.guarded = guarded
    app.state.config = cfg
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)  # type: ignore[arg-type]

    async def client_auth(request: Request) -> None:
        if client_keys and not _matches(_key_of(request), client_keys):
            raise ApiError(401, "invalid or missing API key", "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def admin_auth(request: Request) -> None:
        if admin_key is None:
            raise ApiError(403, "admin endpoints are disabled: the server has no admin key", "permission_error")
        if not _matches(_key_of(request), [admin_key]):
            raise ApiError(401, "invalid or missing admin key", "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(GuardUnavailableError)
    async def _unavailable(request: Request, exc: GuardUnavailableError) -> JSONResponse:
        return JSONResponse(_error_body(str(exc), "guard_unavailable", code="guard_unavailable"), status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(BackendError)
    async def _backend(request: Request, exc: BackendError) -> JSONResponse:
        log.error("backend error: %s", exc)
        return JSONResponse(_error_body(str(exc), "upstream_error", code="upstream_error"), status_code=502)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return JSONResponse(_error_body(f"invalid request: {first.get('msg', 'malformed body')}",
                                        "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    def params_of(req: _GenRequest, max_tokens: int | None) -> GenParams:
        mt = max_tokens or guarded.config.max_new_tokens
        if mt > cfg.max_tokens_cap:
            raise ApiError(400, f"max_tokens {mt} is over this server's cap of {cfg.max_tokens_cap}",
                           "invalid_request_error", "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenParams(max_new_tokens=mt, temperature=req.temperature or 0.0, top_p=req.top_p or 1.0,
                         stop=stop, seed=req.seed)

    async def run_blocking(fn: Callable[[], GuardResult]) -> GuardResult:
        async with sem:
            try:
                return await asyncio.wait_for(asyncio.to_thread(fn), timeout=cfg.request_timeout_s)
            except asyncio.TimeoutError as e:
                metrics.errors.labels("timeout").inc()
                raise ApiError(504, f"request took longer than {cfg.request_timeout_s:.0f}s", "timeout") from e

    def usage(res: GuardResult) -> dict[str, int]:
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "total_tokens": res.prompt_tokens + res.completion_tokens}

    def headers_of(trace: GuardTrace) -> dict[str, str]:
        return {"x-guard-flagged": "true" if trace.flagged else "false",
                "x-guard-blocked": "true" if (trace.requires_refusal or (trace.output_check_fired
                                                                         and trace.output_check_mode == "block")) else "false"}

    async def sse(stream: AsyncGuardStream, first: str | None, make_chunk: Callable[[str | None, str | None], dict[str, Any]],
                  endpoint: str, t0: float) -> AsyncIterator[bytes]:
        """Emit the stream as SSE; the semaphore is held until the stream ends."""
        try:
            if first is not None:
                yield f"data: {json.dumps(make_chunk(first, None))}\n\n".encode()
            while True:
                try:
                    delta = await asyncio.wait_for(stream.__anext__(), timeout=cfg.request_timeout_s)
                except StopAsyncIteration:
                    break
                yield f"data: {json.dumps(make_chunk(delta, None))}\n\n".encode()
            yield f"data: {json.dumps(make_chunk(None, stream.finish_reason))}\n\n".encode()
            metrics.requests.labels(endpoint, "200").inc()
        except (GuardUnavailableError, BackendError, asyncio.TimeoutError) as e:
            kind = "guard_unavailable" if isinstance(e, GuardUnavailableError) else (
                "upstream_error" if isinstance(e, BackendError) else "timeout")
            log.error("stream aborted: %s", kind)
            metrics.requests.labels(endpoint, "stream_error").inc()
            yield f"data: {json.dumps(_error_body(str(e) or kind, kind))}\n\n".encode()
        finally:
            await stream.aclose()
            metrics.observe(stream.trace)
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            sem.release()
        yield b"data: [DONE]\n\n"

    async def start_stream(stream: AsyncGuardStream) -> str | None:
        """Acquire a slot and pull the first delta, so guard failures still answer with a status code."""
        await sem.acquire()
        try:
            return await asyncio.wait_for(stream.__anext__(), timeout=cfg.request_timeout_s)
        except StopAsyncIteration:
            return None
        except BaseException as e:
            await stream.aclose()
            sem.release()
            if isinstance(e, asyncio.TimeoutError):
                raise ApiError(504, f"no first token within {cfg.request_timeout_s:.0f}s", "timeout") from e
            raise

    # -- OpenAI endpoints ---------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[Depends(client_auth)])
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        t0 = time.perf_counter()
        if len(req.messages) > cfg.max_messages:
            raise ApiError(400, f"at most {cfg.max_messages} messages per request", "invalid_request_error", "messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if any(m["role"] == "tool" for m in msgs):
            raise ApiError(400, "tool messages are not supported by the guard", "invalid_request_error", "messages")
        params = params_of(req, req.max_completion_tokens or req.max_tokens)
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or cfg.model_name
        if req.stream:
            stream = guarded.astream(msgs, params)
            first = await start_stream(stream)
            sent_role = {"done": False}

            def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
                d: dict[str, Any] = {}
                if not sent_role["done"]:
                    d["role"] = "assistant"
                    sent_role["done"] = True
                if delta is not None:
                    d["content"] = delta
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

            return StreamingResponse(sse(stream, first, chunk, "chat", t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers_of(stream.trace)})
        try:
            res = await run_blocking(lambda: guarded.generate(msgs, params))
        except Exception:
            metrics.requests.labels("chat", "error").inc()
            raise
        metrics.observe(res.trace)
        metrics.requests.labels("chat", "200").inc()
        metrics.latency.labels("chat").observe(time.perf_counter() - t0)
        body: dict[str, Any] = {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                         "finish_reason": res.finish_reason}],
            "usage": usage(res)}
        if cfg.expose_trace:
            body["guard"] = res.trace.model_dump(mode="json")
        return JSONResponse(body, headers=headers_of(res.trace))

    @app.post("/v1/completions", dependencies=[Depends(client_auth)])
    async def completions(req: CompletionRequest) -> Any:
        t0 = time.perf_counter()
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "exactly one prompt per request", "invalid_request_error", "prompt")
            prompt = prompt[0]
        params = params_of(req, req.max_tokens)
        cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or cfg.model_name
        if req.stream:
            stream = guarded.astream_complete(prompt, params)
            first = await start_stream(stream)

            def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
                return {"id": cid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]}

            return StreamingResponse(sse(stream, first, chunk, "completions", t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        res = await run_blocking(lambda: guarded.complete(prompt, params))
        metrics.observe(res.trace)
        metrics.requests.labels("completions", "200").inc()
        metrics.latency.labels("completions").observe(time.perf_counter() - t0)
        body: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}],
            "usage": usage(res)}
        if cfg.expose_trace:
            body["guard"] = res.trace.model_dump(mode="json")
        return JSONResponse(body, headers=headers_of(res.trace))

    @app.get("/v1/models", dependencies=[Depends(client_auth)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "unlearn-guard"}]}

    # -- operations ---------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            ok = await asyncio.wait_for(asyncio.to_thread(guarded.ready), timeout=5.0)
        except Exception:  # noqa: BLE001 - any failure means not ready
            ok = False
        return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/targets", dependencies=[Depends(admin_auth)])
    async def list_targets() -> dict[str, Any]:
        return {"targets": guarded.target_ids()}

    @app.post("/admin/targets", dependencies=[Depends(admin_auth)], status_code=201)
    async def add_targets(request: Request) -> JSONResponse:
        try:
            raw = await request.json()
        except ValueError as e:
            raise ApiError(400, "body is not JSON", "invalid_request_error") from e
        items = raw if isinstance(raw, list) else [raw]
        try:
            targets = [ForgetTarget.model_validate(x) for x in items]
        except ValidationError as e:
            err = e.errors()[0]
            raise ApiError(400, f"invalid target: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}",
                           "invalid_request_error", "targets") from e
        try:
            for t in targets:
                await asyncio.to_thread(guarded.add_target, t)
        except AdminError as e:
            raise ApiError(501, str(e), "not_implemented") from e
        log.info("admin added targets %s", [t.id for t in targets])
        return JSONResponse({"added": [t.id for t in targets]}, status_code=201)

    @app.delete("/admin/targets/{target_id}", dependencies=[Depends(admin_auth)])
    async def remove_target(target_id: str) -> dict[str, Any]:
        try:
            removed = await asyncio.to_thread(guarded.remove_target, target_id)
        except AdminError as e:
            raise ApiError(501, str(e), "not_implemented") from e
        if not removed:
            raise ApiError(404, f"no forget target {target_id!r}", "not_found_error")
        log.info("admin removed target %s", target_id)
        return {"removed": target_id}

    return app
