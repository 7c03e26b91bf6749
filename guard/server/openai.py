"""The OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

``stream: true`` answers as SSE ending with ``data: [DONE]``. Target-model calls are bounded by the app's
``UpstreamLimiter`` (``max_concurrency`` running, ``max_queue`` waiting, then 429), which the guarded model holds
around each call, so a refusal decided before any target call never waits for a slot; ``request_timeout_s``
covers the wait (504). A refused or blocked answer is a normal completion with ``finish_reason: "content_filter"``.

Chat requests pass through with every OpenAI field and vLLM's sampling fields (``guard.server.passthrough``).
Streamed text goes delta by delta, with tools or without; a streamed answer's tool calls are checked whole and sent
as one delta each before the finish reason. A stream of a request with several choices, log probabilities or JSON
output is sent choice by choice once each is complete and checked (``whole_chunks``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from core.generation import has_non_text, tools_text, turn_text
from guard.api import AsyncGuardStream, GuardResult
from guard.backends import GenParams
from guard.server.errors import ApiError, backend_failure, error_body, unavailable_message
from guard.server.passthrough import BOOKKEEPING, FieldRefused, sort_extras
from guard.server.schemas import ChatCompletionRequest, CompletionRequest, _GenRequest, _lone_surrogate
from guard.server.state import ServerState, State
from guard.types import BackendError, GuardTrace, GuardUnavailableError

log = logging.getLogger(__name__)

router = APIRouter()


def check_text(st: ServerState, texts: list[str], param: str, require_text: bool = True) -> None:
    """Refuse prompts with too much text or (``require_text``) none at all (400 naming ``param``)."""
    cfg = st.config
    total = sum(len(t) for t in texts)
    if total > cfg.max_prompt_chars:
        raise ApiError(400, f"{param}: {total} characters of text is over this server's limit of "
                       f"{cfg.max_prompt_chars}", "invalid_request_error", param, "prompt_too_long")
    if require_text and not any(t.strip() for t in texts):
        raise ApiError(400, f"{param}: no text to answer (every message or prompt is empty)",
                       "invalid_request_error", param, "empty_prompt")


def check_unicode(req: BaseModel) -> None:
    """400 naming the field when a string holds a lone UTF-16 surrogate (JSON '\\ud800')."""
    where = _lone_surrogate(req.model_dump(exclude_none=True))
    if where is not None:
        raise ApiError(400, f"{where}: text holds a lone UTF-16 surrogate escape, which is not valid Unicode; "
                       "send UTF-8 text", "invalid_request_error", where, "invalid_unicode")


def params_of(st: ServerState, req: _GenRequest, max_tokens: int | None, field: str = "max_tokens") -> GenParams:
    """The generation parameters of a request, with ``max_tokens`` defaulted and held to the server's cap."""
    cap = st.config.max_tokens_cap
    mt = max_tokens or st.guarded.config.max_new_tokens
    if mt > cap:
        raise ApiError(400, f"{field} {mt} is over this server's cap of {cap}", "invalid_request_error", field)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return GenParams(max_new_tokens=mt, temperature=req.temperature or 0.0, top_p=req.top_p or 1.0,
                     stop=stop, seed=req.seed)


async def run_guarded(st: ServerState, make: Callable[[], Awaitable[GuardResult]], endpoint: str) -> GuardResult:
    """Run the guarded model's async path (detector calls micro-batched across requests) within the request
    deadline, which counts the wait for an upstream slot; a failure is counted as the endpoint's error."""
    timeout = st.config.request_timeout_s
    try:
        return await asyncio.wait_for(make(), timeout=timeout)
    except asyncio.TimeoutError as e:
        st.metrics.errors.labels("timeout").inc()
        st.metrics.requests.labels(endpoint, "error").inc()
        raise ApiError(504, f"request took longer than {timeout:g}s (waiting for the upstream included)",
                       "timeout") from e
    except Exception:
        st.metrics.requests.labels(endpoint, "error").inc()
        raise


def public_trace(trace: GuardTrace) -> dict[str, Any]:
    """The trace as a client may see it (``expose_trace``): faults keep their stage and exception class, never
    their message, which may quote a detector's input or an upstream's address or text."""
    faults = [f.model_copy(update={"message": ""}) for f in trace.faults]
    reason = trace.fallback_reason
    if reason is not None and reason.startswith("guard failed:"):
        reason = "guard failed: " + ", ".join(f.error for f in faults if f.stage.value == "guard")
    return trace.model_copy(update={"faults": faults, "fallback_reason": reason}).model_dump(mode="json")


def usage(res: GuardResult) -> dict[str, int]:
    """OpenAI's ``usage`` object of a finished answer."""
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def headers_of(trace: GuardTrace) -> dict[str, str]:
    """The ``x-guard-flagged`` / ``x-guard-blocked`` response headers of a trace."""
    return {"x-guard-flagged": "true" if trace.flagged else "false",
            "x-guard-blocked": "true" if (trace.requires_refusal or (trace.output_check_fired
                                                                     and trace.output_check_mode == "block")) else "false"}


async def sse(st: ServerState, stream: AsyncGuardStream, first: str | None,
              make_chunk: Callable[[str | None, str | None], dict[str, Any]],
              endpoint: str, t0: float, tail: Callable[[], dict[str, Any] | None] | None = None,
              before_finish: Callable[[], list[dict[str, Any]]] | None = None) -> AsyncIterator[bytes]:
    """Emit the stream as SSE (``before_finish``: chunks after the last delta, e.g. tool calls; ``tail``: a last chunk
    after the finish reason, e.g. usage); the stream (and the upstream slot it holds) is closed when it ends or
    fails."""
    metrics = st.metrics
    try:
        if first is not None:
            yield f"data: {json.dumps(make_chunk(first, None))}\n\n".encode()
        while True:
            try:
                delta = await asyncio.wait_for(stream.__anext__(), timeout=st.config.request_timeout_s)
            except StopAsyncIteration:
                break
            yield f"data: {json.dumps(make_chunk(delta, None))}\n\n".encode()
        for extra in before_finish() if before_finish is not None else []:
            yield f"data: {json.dumps(extra)}\n\n".encode()
        yield f"data: {json.dumps(make_chunk(None, stream.finish_reason))}\n\n".encode()
        last = tail() if tail is not None else None
        if last is not None:
            yield f"data: {json.dumps(last)}\n\n".encode()
        metrics.requests.labels(endpoint, "200").inc()
    except Exception as e:  # noqa: BLE001 - any failure mid-stream ends in an error event, never silence
        # The message is the proxy's own: an upstream error event or an exception may quote unchecked output.
        if isinstance(e, GuardUnavailableError):
            kind, code, message = "guard_unavailable", "guard_unavailable", unavailable_message(e)  # counted below
        elif isinstance(e, BackendError):
            kind, (_, message, code) = "upstream_error", backend_failure(e)
            metrics.fault(f"backend_{e.kind}" if e.kind != "error" else "backend_error")
            log.error("stream backend error (%s): %s", e.kind, e)  # the backend's message: upstream text redacted
        elif isinstance(e, asyncio.TimeoutError):
            kind, code = "timeout", "timeout"
            message = f"no delta within {st.config.request_timeout_s:g}s; the stream was stopped"
            metrics.fault("request_timeout")
        else:
            kind, code = "internal_error", "internal_error"
            message = f"internal error ({e.__class__.__name__}); the stream was stopped"
            metrics.fault("internal_error")
        log.error("stream aborted: %s (%s)", code, e.__class__.__name__)
        metrics.requests.labels(endpoint, "stream_error").inc()
        yield f"data: {json.dumps(error_body(message, kind, code=code))}\n\n".encode()
    finally:
        await stream.aclose()
        metrics.observe(stream.trace)
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
    yield b"data: [DONE]\n\n"


async def close_quietly(stream: AsyncGuardStream) -> None:
    """Close a stream after its response (a no-op when ``sse`` closed it): a client that left before the body
    started would otherwise leave the stream, and the upstream slot it holds, open."""
    try:
        await stream.aclose()
    except Exception as e:  # noqa: BLE001 - closing is best effort here; sse's own close reports failures
        log.debug("closing a stream after its response failed (%s)", e.__class__.__name__)


async def start_stream(st: ServerState, stream: AsyncGuardStream, endpoint: str) -> str | None:
    """Pull the first delta within the request deadline (the wait for an upstream slot included), so guard and
    upstream failures, a full queue and a late start still answer with a status code, counted as the endpoint's
    error like a non-streamed one."""
    timeout = st.config.request_timeout_s
    try:
        return await asyncio.wait_for(stream.__anext__(), timeout=timeout)
    except StopAsyncIteration:
        return None
    except BaseException as e:
        await stream.aclose()
        if isinstance(e, Exception):
            st.metrics.requests.labels(endpoint, "error").inc()
        if isinstance(e, asyncio.TimeoutError):
            raise ApiError(504, f"no first token within {timeout:g}s (waiting for the upstream included)",
                           "timeout") from e
        raise


def stream_response(st: ServerState, stream: AsyncGuardStream, first: str | None,
                    make_chunk: Callable[[str | None, str | None], dict[str, Any]], endpoint: str, t0: float,
                    headers: dict[str, str], tail: Callable[[], dict[str, Any] | None] | None = None,
                    before_finish: Callable[[], list[dict[str, Any]]] | None = None) -> StreamingResponse:
    """The SSE response of a started stream, which closes the stream after the response in any case."""
    return StreamingResponse(sse(st, stream, first, make_chunk, endpoint, t0, tail, before_finish),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers},
                             background=BackgroundTask(close_quietly, stream))


# Route handlers carry no docstring: FastAPI would publish it as the operation's description in OpenAPI.

def chat_params(st: ServerState, req: ChatCompletionRequest, forwarded: dict[str, Any]) -> GenParams:
    """A chat request's generation parameters: sampling, its optional features and the vendor fields to forward."""
    mt, field = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens
                 else (req.max_tokens, "max_tokens"))
    base = params_of(st, req, mt, field)
    rf = req.response_format
    hints = {k: v for k, v in forwarded.items() if k in BOOKKEEPING}
    if req.metadata is not None:
        hints["metadata"] = req.metadata
    if req.store is not None:
        hints["store"] = req.store
    if req.service_tier is not None:
        hints["service_tier"] = req.service_tier
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return base.model_copy(update={
        "n": req.n, "logprobs": bool(req.logprobs), "top_logprobs": req.top_logprobs or 0,
        "tools": [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
        "tool_choice": req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else req.tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": rf.model_dump(exclude_none=True, by_alias=True) if rf and rf.type != "text" else None,
        "frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty,
        "logit_bias": req.logit_bias, "user": req.user, "stream_usage": include_usage, "hints": hints,
        "passthrough": {k: v for k, v in forwarded.items() if k not in BOOKKEEPING}})


def check_chat_request(st: ServerState, req: ChatCompletionRequest, msgs: list[dict[str, Any]]) -> dict[str, Any]:
    """Refuse what the guard cannot take (400 naming the field): too many messages or choices, refused or unknown
    vendor fields, non-text content where it is configured off, too much text (``msgs``: the request's messages as
    the guard gets them); return the vendor fields to forward."""
    cfg = st.config
    if len(req.messages) > cfg.max_messages:
        raise ApiError(400, f"at most {cfg.max_messages} messages per request", "invalid_request_error", "messages")
    if req.n > cfg.max_n:
        raise ApiError(400, f"n {req.n} is over this server's cap of {cfg.max_n} choices", "invalid_request_error", "n")
    try:
        forwarded = sort_extras(req.model_extra, cfg.unknown_fields)
    except FieldRefused as e:
        raise ApiError(400, str(e), "invalid_request_error", e.field, e.code) from e
    if cfg.non_text_content == "reject":
        for i, m in enumerate(msgs):
            if has_non_text(m):
                raise ApiError(400, f"messages[{i}].content: this server accepts text only (server.non_text_content="
                               "'reject'); send text parts", "invalid_request_error", f"messages.{i}.content",
                               "non_text_content")
    texts = [turn_text(m) for m in msgs]
    if req.tools:  # the detector reads the tool definitions too: they count towards max_prompt_chars
        total = sum(len(t) for t in texts) + len(tools_text([t.model_dump(exclude_none=True) for t in req.tools]))
        if total > cfg.max_prompt_chars:
            raise ApiError(400, f"tools: {total} characters of text in messages and tool definitions is over this "
                           f"server's limit of {cfg.max_prompt_chars}", "invalid_request_error", "tools",
                           "prompt_too_long")
    # an image-only question has no text, and needs none
    check_text(st, texts, "messages", require_text=not any(has_non_text(m) for m in msgs))
    check_unicode(req)
    return forwarded


def chat_choice(r: GuardResult, index: int, json_mode: bool) -> dict[str, Any]:
    """One choice of a chat completion: the answer with its reasoning, tool calls and log probabilities, or the
    guard's refusal (also in ``refusal``; with no JSON ``content`` in JSON mode, as OpenAI answers a refusal of structured output)."""
    msg: dict[str, Any] = {"role": "assistant", "content": r.text}
    if r.blocked:
        msg["refusal"] = r.text
        if json_mode:
            msg["content"] = None
    else:
        if r.reasoning:
            msg["reasoning"] = r.reasoning  # vLLM's field; checked like the answer
        if r.tool_calls:
            msg["tool_calls"] = r.tool_calls
            msg["content"] = r.text or None
    return {"index": index, "message": msg, "logprobs": r.logprobs, "finish_reason": r.finish_reason}


def whole_chunks(res: GuardResult, head: dict[str, Any], json_mode: bool, include_usage: bool) -> list[dict[str, Any]]:
    """The SSE chunks of an answer checked whole (several choices, log probabilities, JSON output): per choice
    its role, its content (with its log probabilities), each tool call as one delta, then its finish reason."""
    chunks = []

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    for i, r in enumerate(res.choices()):
        c = chat_choice(r, i, json_mode)["message"]
        chunks.append(chunk(i, {"role": "assistant", "content": ""}))
        if c.get("reasoning"):
            chunks.append(chunk(i, {"reasoning": c["reasoning"]}))
        if c.get("content"):
            chunks.append(chunk(i, {"content": c["content"]}, lp=r.logprobs))
        if c.get("refusal"):
            chunks.append(chunk(i, {"refusal": c["refusal"]}))
        for j, tc in enumerate(c.get("tool_calls") or []):
            chunks.append(chunk(i, {"tool_calls": [{"index": j, **tc}]}))
        chunks.append(chunk(i, {}, r.finish_reason))
    if include_usage:
        chunks.append({**head, "choices": [], "usage": usage(res)})
    return chunks


async def whole_sse(st: ServerState, chunks: list[dict[str, Any]], endpoint: str, t0: float) -> AsyncIterator[bytes]:
    """Emit the chunks of an answer that was checked whole, then ``[DONE]``."""
    for c in chunks:
        yield f"data: {json.dumps(c)}\n\n".encode()
    st.metrics.requests.labels(endpoint, "200").inc()
    st.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
    yield b"data: [DONE]\n\n"


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, st: State) -> Any:
    cfg, guarded, metrics = st.config, st.guarded, st.metrics
    t0 = time.perf_counter()
    msgs = [m.to_message() for m in req.messages]
    forwarded = check_chat_request(st, req, msgs)
    params = chat_params(st, req, forwarded)
    guarded.check_supported(params, msgs)  # UnsupportedFeatureError: 400 naming the field (guard.server.errors)
    json_mode = params.response_format is not None
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or cfg.model_name
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    if req.stream and not params.needs_whole_answer:
        stream = guarded.astream(msgs, params)
        first = await start_stream(st, stream, "chat")
        sent = {"role": False, "reasoning": False}

        def opening(d: dict[str, Any]) -> dict[str, Any]:
            # The role goes with the first delta, the checked reasoning with the first delta after it is known.
            if not sent["role"]:
                d["role"] = "assistant"
                sent["role"] = True
            if not sent["reasoning"] and stream.reasoning:
                d["reasoning"] = stream.reasoning
                sent["reasoning"] = True
            return d

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            d = opening({})
            if delta is not None:
                d["content"] = delta
            return {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]}

        def tool_call_chunks() -> list[dict[str, Any]]:
            out = []
            for j, tc in enumerate(stream.tool_calls):
                d = opening({"tool_calls": [{"index": j, **tc}]})
                out.append({**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]})
            return out

        def tail() -> dict[str, Any] | None:
            if not params.stream_usage:
                return None
            pt, ct = stream.prompt_tokens, stream.completion_tokens
            return {**head, "choices": [], "usage": {"prompt_tokens": pt, "completion_tokens": ct,
                                                     "total_tokens": pt + ct}}

        return stream_response(st, stream, first, chunk, "chat", t0, headers_of(stream.trace), tail, tool_call_chunks)
    res = await run_guarded(st, lambda: guarded.agenerate(msgs, params), "chat")
    metrics.observe(res.trace)
    if req.stream:
        return StreamingResponse(whole_sse(st, whole_chunks(res, head, json_mode, params.stream_usage), "chat", t0),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers_of(res.trace)})
    metrics.requests.labels("chat", "200").inc()
    metrics.latency.labels("chat").observe(time.perf_counter() - t0)
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [chat_choice(r, i, json_mode) for i, r in enumerate(res.choices())],
        "usage": usage(res)}
    if cfg.expose_trace:
        body["guard"] = public_trace(res.trace)
    return JSONResponse(body, headers=headers_of(res.trace))


@router.post("/v1/completions")
async def completions(req: CompletionRequest, st: State) -> Any:
    cfg, guarded, metrics = st.config, st.guarded, st.metrics
    t0 = time.perf_counter()
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "exactly one prompt per request", "invalid_request_error", "prompt")
        prompt = prompt[0]
    check_text(st, [prompt], "prompt")
    check_unicode(req)
    params = params_of(st, req, req.max_tokens)
    cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or cfg.model_name
    if req.stream:
        stream = guarded.astream_complete(prompt, params)
        first = await start_stream(st, stream, "completions")

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]}

        return stream_response(st, stream, first, chunk, "completions", t0, headers_of(stream.trace))
    res = await run_guarded(st, lambda: guarded.acomplete(prompt, params), "completions")
    metrics.observe(res.trace)
    metrics.requests.labels("completions", "200").inc()
    metrics.latency.labels("completions").observe(time.perf_counter() - t0)
    body: dict[str, Any] = {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}],
        "usage": usage(res)}
    if cfg.expose_trace:
        body["guard"] = public_trace(res.trace)
    return JSONResponse(body, headers=headers_of(res.trace))


@router.get("/v1/models")
async def models(st: State) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": st.config.model_name, "object": "model", "created": 0,
                                        "owned_by": "unlearn-guard"}]}
