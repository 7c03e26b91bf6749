"""Any OpenAI-compatible HTTP server as a backend (vLLM serve, llama.cpp server, our own proxy...).

httpx with separate connect/read timeouts; connect errors, timeouts, 429 and 5xx are retried with
backoff (never after a stream has started). ``response_format`` json_schema is sent for structured
output; an upstream that rejects it (HTTP 400) is remembered and asked without it afterwards.

Every failure is a :class:`~guard.types.BackendError` whose ``kind`` says what happened: the upstream
is unreachable, too slow ('timeout'), answered an HTTP error, sent something that is not an OpenAI
answer ('bad_response': not JSON, wrong schema), or cut a stream off before ``data: [DONE]``
('stream_cut'). Error messages describe the shape of a bad answer, never its text: an answer that
fails to parse, an upstream error body and an SSE error event may hold unchecked model output, so their
text appears only redacted (length and a short hash). An :class:`UpstreamError` also carries the upstream's
HTTP status and, when it is a short identifier-like token, its error code: all that the proxy tells a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator, Coroutine, Generator, Iterator, Sequence
from typing import Any, Literal

import httpx
from pydantic import Field, SecretStr

from core.aio import iter_sync, run_sync
from guard.backends.base import (
    BACKENDS,
    OPTIONAL_FEATURES,
    Backend,
    BackendConfig,
    GenOutput,
    GenParams,
    Messages,
    StreamReasoning,
    StreamToolCalls,
    StreamUsage,
)
from guard.types import BackendError, redact, safe_token

log = logging.getLogger(__name__)
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_MEDIA_TYPE = re.compile(r"[\w.+-]{1,40}/[\w.+-]{1,60}")
_GUARD_SCHEMA = "guard_output"


def _guard_schema(body: dict[str, Any]) -> bool:
    """Whether a request's response_format is the guard's own decision schema (an upstream that rejects it is
    asked without it), not a client's."""
    rf = body.get("response_format")
    return isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict) and rf["json_schema"].get("name") == _GUARD_SCHEMA


class UpstreamError(BackendError):
    """A BackendError of the upstream that also says what a client may be told: its HTTP status and its error
    code (a short identifier-like token), never its text."""

    def __init__(self, message: str, kind: str, status: int | None = None, code: str | None = None) -> None:
        """The log message (upstream text redacted), the kind, and the upstream's status and error code."""
        super().__init__(message, kind)
        self.status = status
        self.code = safe_token(code)


def _error_fields(err: Any) -> tuple[str | None, str | None]:
    """The error code (a short token: its ``code``, else its ``type``) and the message of an OpenAI error object."""
    if isinstance(err, str):
        return None, err
    if not isinstance(err, dict):
        return None, None
    code = next((c for c in (err.get("code"), err.get("type")) if safe_token(c)), None)
    msg = err.get("message")
    return code, msg if isinstance(msg, str) else None


def _error_info(resp: httpx.Response) -> tuple[str, str | None]:
    """A log-safe description of an upstream error response (its status, error code and redacted message,
    never the raw body), and the error code."""
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        return f"HTTP {resp.status_code} (a non-JSON body, {redact(resp.content)})", None
    code, msg = _error_fields(body.get("error") if isinstance(body, dict) else None)
    if msg is None and isinstance(body, dict) and isinstance(body.get("detail"), str):
        msg = body["detail"]
    parts = [f"code {code}"] if code else []
    parts.append(f"message {redact(msg)}" if msg else "a JSON body without an error message")
    return f"HTTP {resp.status_code} ({', '.join(parts)})", code


def _error_text(resp: httpx.Response) -> str:
    """A log-safe description of an upstream error response (see ``_error_info``)."""
    return _error_info(resp)[0]


def _shape(data: Any) -> str:
    """What a JSON value looks like (type and its identifier-like top-level keys), without its content."""
    if isinstance(data, dict):
        keys = sorted(str(k) for k in data)
        shown = [k for k in keys if safe_token(k)][:10]
        more = len(keys) - len(shown)
        return f"an object with keys {shown}" + (f" and {more} more" if more else "")
    return f"a JSON {type(data).__name__}"


def _transport_kind(e: httpx.HTTPError) -> str:
    """The BackendError kind of an httpx transport failure."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "unreachable"
    if isinstance(e, httpx.TimeoutException):
        return "timeout"
    return "bad_response"


def _tool_calls(holder: Any, where: str) -> list[dict[str, Any]]:
    """The validated tool calls of a message (id, type 'function', function name and arguments as strings)."""
    calls = holder.get("tool_calls") if isinstance(holder, dict) else None
    if calls in (None, []):
        return []
    if not isinstance(calls, list):
        raise BackendError(f"upstream answer's {where}.tool_calls is not a list", "bad_response")
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise BackendError(f"upstream answer's {where}.tool_calls[{i}] is not a function call with a string name "
                               "and string arguments", "bad_response")
        out.append({"id": str(c.get("id") or f"call_{i}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


REASONING_FIELDS = ("reasoning_content", "reasoning")
"""Where OpenAI-compatible servers put a reasoning model's thinking (vLLM's reasoning parsers, DeepSeek)."""


def _reasoning(holder: Any, where: str) -> str | None:
    """The reasoning text of a message or delta (None when it has none)."""
    if not isinstance(holder, dict):
        return None
    for key in REASONING_FIELDS:
        value = holder.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BackendError(f"upstream answer's {where}.{key} is not a string", "bad_response")
        return value
    return None


def _choice(choice: Any, i: int, chat: bool, what: str) -> GenOutput:
    """One choice of an OpenAI (chat) completion body as a GenOutput (no usage)."""
    field = f"choices[{i}].message.content" if chat else f"choices[{i}].text"
    if not isinstance(choice, dict):
        raise BackendError(f"upstream answer is not an OpenAI {what}: choices[{i}] is not an object", "bad_response")
    holder = choice.get("message") if chat else choice
    text = holder.get("content" if chat else "text") if isinstance(holder, dict) else None
    calls = _tool_calls(holder, f"choices[{i}].message") if chat else []
    if text is None and chat and isinstance(holder, dict) and holder.get("role") == "assistant":
        text = ""  # an assistant message without content (tool calls only, or only a refusal field): no text
    if not isinstance(text, str):
        raise BackendError(f"upstream answer is not an OpenAI {what}: {field} is missing or not a string "
                           f"(got {_shape(holder) if holder is not None else 'nothing'})", "bad_response")
    finish = choice.get("finish_reason")
    lp = choice.get("logprobs")
    return GenOutput(text=text, finish_reason=finish if isinstance(finish, str) and finish else "stop",
                     tool_calls=calls, logprobs=lp if isinstance(lp, dict) and chat else None,
                     reasoning=_reasoning(holder, f"choices[{i}].message") if chat else None)


def parse_answer(data: Any, chat: bool) -> GenOutput:
    """Validate an OpenAI (chat) completion body and turn it into a GenOutput (every choice, its tool calls and log
    probabilities); BackendError('bad_response') if it is not one."""
    what = "chat completion" if chat else "text completion"
    if not (isinstance(data, dict) and isinstance(data.get("choices"), list) and data["choices"]):
        raise BackendError(f"upstream answer is not an OpenAI {what}: no choices[0] object (got {_shape(data)})",
                           "bad_response")
    raw = sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict)
                 and isinstance(c.get("index"), int) else 0)
    choices = [_choice(c, i, chat, what) for i, c in enumerate(raw)]
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    try:
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError) as e:
        raise BackendError("upstream answer has non-integer usage token counts", "bad_response") from e
    return choices[0].model_copy(update={"prompt_tokens": max(0, prompt_tokens),
                                         "completion_tokens": max(0, completion_tokens), "others": choices[1:]})


def _json_of(resp: httpx.Response, where: str) -> Any:
    """The JSON body of a 200 response, or BackendError('bad_response') naming what came instead."""
    try:
        return resp.json()
    except (ValueError, UnicodeDecodeError) as e:
        media = resp.headers.get("content-type", "").split(";")[0].strip()
        ctype = media if _MEDIA_TYPE.fullmatch(media) else "no usable content-type"
        raise BackendError(f"upstream {where} answered HTTP 200 with a body that is not JSON "
                           f"({len(resp.content)} bytes, {ctype})", "bad_response") from e


class OpenAIConfig(BackendConfig):
    """An OpenAI-compatible server (vLLM, llama.cpp, a hosted API): where it is, its key, retries."""

    kind: Literal["openai"] = "openai"
    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    api_key: SecretStr | None = Field(None, description="Sent as a Bearer token upstream.")
    connect_timeout_s: float = Field(5.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10, description="Retries on connect errors, 429 and 5xx.")
    retry_backoff_s: float = Field(0.25, ge=0)


@BACKENDS.register("openai")
class OpenAIHTTPBackend(Backend):
    """Talks to ``{base_url}/chat/completions`` and ``{base_url}/completions``."""

    name = "openai"
    config_class = OpenAIConfig
    supports_prefix = False
    features = frozenset(OPTIONAL_FEATURES)  # forwarded: whether the upstream supports a field is the upstream's say

    def __init__(self, cfg: OpenAIConfig, transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Create sync and async clients; transports are injectable for tests."""
        if not cfg.base_url:
            raise ValueError("OpenAIHTTPBackend needs base_url")
        self.cfg = cfg
        self.model_id = cfg.model
        self.base_url = cfg.base_url.rstrip("/")
        headers = {"Content-Type": "application/json"}
        if cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        timeout = httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self._aclient_args: dict[str, Any] = {"base_url": self.base_url, "headers": headers, "timeout": timeout,
                                              "transport": async_transport}
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = \
            weakref.WeakKeyDictionary()
        self.supports_json_schema = True

    @classmethod
    def from_config(cls, cfg: OpenAIConfig) -> OpenAIHTTPBackend:
        """Build from its config."""
        return cls(cfg)

    # -- request bodies -------------------------------------------------------------------------------
    def _body(self, params: GenParams, stream: bool) -> dict[str, Any]:
        """The upstream request's fields (messages or prompt apart): sampling, the client's optional features as they
        came, vendor pass-through fields last (never over a field set here)."""
        body: dict[str, Any] = {"model": self.model_id, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "stream": stream}
        if params.top_p < 1.0:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        for name in ("tools", "tool_choice", "parallel_tool_calls", "frequency_penalty", "presence_penalty",
                     "logit_bias", "user"):
            value = getattr(params, name)
            if value is not None:
                body[name] = value
        if params.n > 1:
            body["n"] = params.n
        if params.logprobs:
            body["logprobs"] = True
            if params.top_logprobs:
                body["top_logprobs"] = params.top_logprobs
        if params.response_format is not None:
            body["response_format"] = params.response_format
        elif params.json_schema is not None and self.supports_json_schema:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": _GUARD_SCHEMA, "schema": params.json_schema, "strict": True}}
        for k, v in {**params.hints, **params.passthrough}.items():
            body.setdefault(k, v)
        return body

    def _attempts(self, path: str, body: dict[str, Any]) -> Generator[dict[str, Any] | float, Any, Any]:
        """The retry policy without I/O: yields a body to POST (and
        receives its response or httpx error) or a pause in seconds; returns the JSON answer."""
        last, kind, status, code = "", "error", None, None
        for attempt in range(self.cfg.max_retries + 1):
            reply = yield body
            if isinstance(reply, httpx.HTTPError):
                last, kind, status, code = f"{reply.__class__.__name__}: {reply}", _transport_kind(reply), None, None
            else:
                if reply.status_code == 200:
                    return _json_of(reply, f"{self.base_url}{path}")
                if reply.status_code == 400 and _guard_schema(body):  # the client's own format is never dropped
                    log.warning("upstream rejected response_format (%s); retrying without structured output",
                                _error_text(reply))
                    self.supports_json_schema = False
                    body = {k: v for k, v in body.items() if k != "response_format"}
                    continue
                (last, code), kind, status = _error_info(reply), "http_error", reply.status_code
                if reply.status_code not in _RETRY_STATUS:
                    break
            if attempt < self.cfg.max_retries:
                yield self.cfg.retry_backoff_s * (2 ** attempt)
        raise UpstreamError(f"upstream {self.base_url}{path} failed: {last}", kind, status, code)

    async def _apost(self, path: str, body: dict[str, Any]) -> Any:
        """POST with retries on transient failures (a 400 caused by response_format drops it once), on the
        async client: the event loop is never blocked and no thread is held."""
        policy = self._attempts(path, body)
        step = next(policy)
        while True:
            reply: Any = None
            if isinstance(step, dict):
                try:
                    reply = await self._async_client().post(path, json=step)
                except httpx.HTTPError as e:
                    reply = e
            else:
                await asyncio.sleep(step)
            try:
                step = policy.send(reply)
            except StopIteration as done:
                return done.value

    def _chat_body(self, messages: Messages, params: GenParams) -> dict[str, Any]:
        return {**self._body(params, stream=False), "messages": [dict(m) for m in messages]}

    def _complete_body(self, text: str, params: GenParams) -> dict[str, Any]:
        body = {**self._body(params, stream=False), "prompt": text}
        if _guard_schema(body):
            body.pop("response_format")
        return body

    # -- interface ------------------------------------------------------------------------------------
    # The sync methods wait for the async ones on the sync-runner loop (core.aio): one code path per call.
    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Send the prompts concurrently (the upstream batches them)."""
        return run_sync(self.agenerate_batch(batch, params))

    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Send raw completions concurrently."""
        return run_sync(self.acomplete_batch(texts, params))

    def _reopen_pause(self, where: str, attempt: int, failure: httpx.Response | httpx.HTTPError) -> float:
        """A stream that failed before its first byte (an error status, or no connection): the pause before the
        next attempt, or, when it is not worth retrying or the retries are spent, its BackendError raised."""
        last = attempt >= self.cfg.max_retries
        if isinstance(failure, httpx.Response):
            if last or failure.status_code not in _RETRY_STATUS:
                text, code = _error_info(failure)
                raise UpstreamError(f"upstream {where} failed: {text}", "http_error", failure.status_code, code)
        elif last:
            raise UpstreamError(f"upstream {where} unreachable: {failure}", "unreachable") from failure
        return self.cfg.retry_backoff_s * (2 ** attempt)

    def _stream_body(self, params: GenParams, **payload: Any) -> dict[str, Any]:
        """A streamed request's body (the guard's structured output is never asked of a stream; with ``stream_usage``
        the upstream is asked for usage, which ends the stream as a :class:`StreamUsage`)."""
        body = {**self._body(params, stream=True), **payload}
        if params.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if _guard_schema(body):
            body.pop("response_format")
        return body

    def stream(self, messages: Messages, params: GenParams) -> Iterator[str]:
        """Stream a chat answer from upstream."""
        return iter_sync(self.astream(messages, params))

    def stream_complete(self, text: str, params: GenParams) -> Iterator[str]:
        """Stream a raw completion from upstream."""
        return iter_sync(self.astream_complete(text, params))

    async def agenerate(self, messages: Messages, params: GenParams) -> GenOutput:
        """Native async chat request (no thread), with the same retries as ``generate``."""
        return parse_answer(await self._apost("/chat/completions", self._chat_body(messages, params)), chat=True)

    async def agenerate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Native async: the prompts are sent concurrently on the async client, ``batch_size`` at a time."""
        return await self._bounded([self.agenerate(m, params) for m in batch])

    async def acomplete(self, text: str, params: GenParams) -> GenOutput:
        """Native async raw completion (no thread), with the same retries as ``agenerate``."""
        return parse_answer(await self._apost("/completions", self._complete_body(text, params)), chat=False)

    async def acomplete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Raw completions sent concurrently, ``batch_size`` at a time."""
        return await self._bounded([self.acomplete(t, params) for t in texts])

    async def _bounded(self, calls: list[Coroutine[Any, Any, GenOutput]]) -> list[GenOutput]:
        """Await the calls concurrently, at most ``cfg.batch_size`` in flight, results in order."""
        gate = asyncio.Semaphore(max(1, self.cfg.batch_size))

        async def one(c: Coroutine[Any, Any, GenOutput]) -> GenOutput:
            async with gate:
                return await c
        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def _asse(self, path: str, body: dict[str, Any], chat: bool) -> AsyncIterator[str | StreamUsage]:
        """Stream an SSE response and yield content deltas; retried only before the first byte."""
        where = f"{self.base_url}{path}"
        params_usage = "stream_options" in body
        for attempt in range(self.cfg.max_retries + 1):
            try:
                async with self._async_client().stream("POST", path, json=body) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        await asyncio.sleep(self._reopen_pause(where, attempt, resp))
                        continue
                    reader = _SSEReader(chat, where)
                    async for line in resp.aiter_lines():
                        delta = reader.feed(line)
                        if delta is None:
                            break
                        if delta:
                            if reader.reasoning:  # the reasoning ended where the answer begins: whole, first
                                yield StreamReasoning(reader.take_reasoning())
                            yield delta
                    else:
                        reader.end()
                    if reader.reasoning:
                        yield StreamReasoning(reader.take_reasoning())
                    if reader.calls:
                        yield StreamToolCalls(reader.tool_calls())
                    if reader.usage is not None and params_usage:
                        yield reader.usage
                    return
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                await asyncio.sleep(self._reopen_pause(where, attempt, e))
            except httpx.HTTPError as e:
                raise _stream_error(e, where) from e

    def astream(self, messages: Messages, params: GenParams) -> AsyncIterator[str]:
        """Native async streaming of a chat answer (no thread)."""
        return self._asse("/chat/completions", self._stream_body(params, messages=[dict(m) for m in messages]), chat=True)

    def astream_complete(self, text: str, params: GenParams) -> AsyncIterator[str]:
        """Native async streaming of a raw completion (no thread)."""
        return self._asse("/completions", self._stream_body(params, prompt=text), chat=False)

    def _async_client(self) -> httpx.AsyncClient:
        """The async client of the running event loop: an AsyncClient's pooled connections belong to the loop
        that opened them, so a backend used from several loops (``asyncio.run`` twice) gets one per loop."""
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = self._aclients[loop] = httpx.AsyncClient(**self._aclient_args)
        return client

    def ready(self) -> bool:
        """Ping ``/models`` with a short timeout."""
        try:
            return self._client.get("/models", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        """Close the HTTP clients (async clients of loops that have ended are dropped)."""
        self._client.close()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        clients, self._aclients = list(self._aclients.items()), weakref.WeakKeyDictionary()
        for loop, client in clients:
            if loop is running:
                loop.create_task(client.aclose())
            elif loop.is_running():  # another thread's loop, e.g. the sync-runner's
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            elif not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(client.aclose())


def _stream_error(e: httpx.HTTPError, where: str) -> BackendError:
    """The BackendError of a transport failure while a stream was open."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return BackendError(f"upstream {where} unreachable: {e}", "unreachable")
    if isinstance(e, httpx.TimeoutException):
        return BackendError(f"upstream stream {where} stalled: {e.__class__.__name__}", "timeout")
    return BackendError(f"upstream stream {where} broke off: {e.__class__.__name__}: {e}", "stream_cut")


class _SSEReader:
    """Parses an upstream SSE answer line by line and knows whether it ended properly."""

    def __init__(self, chat: bool, where: str) -> None:
        """``chat``: deltas are in choices[0].delta.content, else choices[0].text."""
        self.chat = chat
        self.where = where
        self.finished = False
        self.usage: StreamUsage | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.reasoning: list[str] = []

    def take_reasoning(self) -> str:
        """The reasoning deltas so far, joined, and forgotten (a reasoning arrives whole, once)."""
        text, self.reasoning = "".join(self.reasoning), []
        return text

    def feed(self, line: str) -> str | None:
        """The content delta of one line: '' for non-content lines, None at ``[DONE]``."""
        if not line.startswith("data:"):
            return ""  # blank separators, comments (': ping'), event/id fields
        payload = line[5:].strip()
        if payload == "[DONE]":
            return None
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as e:
            raise BackendError(f"upstream stream {self.where} sent a data line that is not JSON "
                               f"({len(payload)} chars)", "bad_response") from e
        if isinstance(data, dict) and data.get("error"):
            code, msg = _error_fields(data["error"])
            parts = ([f"code {code}"] if code else []) + ([f"message {redact(msg)}"] if msg else [])
            raise UpstreamError(f"upstream stream {self.where} reported an error ({', '.join(parts) or 'no message'})",
                                "stream_error", code=code)
        if not isinstance(data, dict) or not isinstance(data.get("choices", []), list):
            raise BackendError(f"upstream stream {self.where} sent a chunk that is not an OpenAI chunk "
                               f"(got {_shape(data)})", "bad_response")
        usage = data.get("usage")
        if isinstance(usage, dict):
            with contextlib.suppress(TypeError, ValueError):
                self.usage = StreamUsage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        choices = data.get("choices") or []
        if not choices:
            return ""  # e.g. a final usage-only chunk
        c = choices[0]
        if not isinstance(c, dict):
            raise BackendError(f"upstream stream {self.where} sent choices[0] that is not an object", "bad_response")
        if c.get("finish_reason"):
            self.finished = True
        holder = c.get("delta") if self.chat else c
        if self.chat and isinstance(holder, dict) and holder.get("tool_calls"):
            self._add_calls(holder["tool_calls"])
        thought = _reasoning(holder, "stream delta") if self.chat else None
        if thought:
            self.reasoning.append(thought)
        delta = holder.get("content" if self.chat else "text") if isinstance(holder, dict) else None
        if delta is not None and not isinstance(delta, str):
            raise BackendError(f"upstream stream {self.where} sent a delta that is not a string", "bad_response")
        return delta or ""

    def _add_calls(self, deltas: Any) -> None:
        """Assemble tool-call deltas (OpenAI sends a call's id, type and name once and its arguments in pieces)."""
        if not isinstance(deltas, list):
            raise BackendError(f"upstream stream {self.where} sent tool_calls that are not a list", "bad_response")
        for d in deltas:
            idx = d.get("index") if isinstance(d, dict) else None
            if not isinstance(idx, int):
                raise BackendError(f"upstream stream {self.where} sent a tool-call delta without an index",
                                   "bad_response")
            call = self.calls.setdefault(idx, {"id": "", "name": "", "arguments": ""})
            fn = d.get("function") if isinstance(d.get("function"), dict) else {}
            for key, value in (("id", d.get("id")), ("name", fn.get("name")), ("arguments", fn.get("arguments"))):
                if value is not None and not isinstance(value, str):
                    raise BackendError(f"upstream stream {self.where} sent a tool-call {key} that is not a string",
                                       "bad_response")
                call[key] += value or ""

    def tool_calls(self) -> list[dict[str, Any]]:
        """The assembled tool calls, in index order, in OpenAI's shape."""
        return [{"id": c["id"] or f"call_{i}", "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}} for i, c in sorted(self.calls.items())]

    def end(self) -> None:
        """The body ended: fine after a finish_reason, else the stream was cut off (BackendError)."""
        if not self.finished:
            raise BackendError(f"upstream stream {self.where} ended before data: [DONE] and without a finish_reason "
                               "(cut off mid-answer)", "stream_cut")

