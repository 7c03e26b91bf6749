"""OpenAI-compatible HTTP proxy in front of a GuardedLLM (FastAPI, a thin layer).

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (``stream: true`` as SSE ending with
``data: [DONE]``), ``/v1/models``, ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), and
``/admin/targets`` (GET, POST) / ``/admin/targets/{id}`` (DELETE) behind a separate admin key.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``. A failed or late
detector answers 503 ``guard_unavailable`` (fail closed); a refused or blocked answer is a normal
completion with ``finish_reason: "content_filter"``. Blocking work runs in worker threads, bounded by
``max_concurrency``; keys are compared with ``hmac.compare_digest`` and never logged.

Bad input never reaches the guard: request bodies are validated strictly (no type coercion, unknown
fields refused, text-only content parts, no lone UTF-16 surrogates, size limits) and every rejection is
a 4xx whose ``param`` names the field. Faults (upstream down, slow, garbage or cut off; detector or
guard model failing or late; a store that cannot be saved) end in an error or a refusal and are counted
in ``unlearn_guard_faults_total{kind}``. Admin changes are serialised by a lock and, with
``store_path``, saved atomically before the response, so concurrent changes are never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.schema import ForgetTarget
from guard.api import AsyncGuardStream, GuardedLLM, GuardResult
from guard.backends import GenParams
from guard.config import ServerConfig
from guard.types import AdminError, BackendError, GuardTrace, GuardUnavailableError

log = logging.getLogger(__name__)


# ---- schemas -----------------------------------------------------------------------------------------

_TEXT_PART = {"type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
              "required": ["type", "text"], "additionalProperties": False}
_CONTENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]}


def _integral(v: Any) -> Any:
    """JSON Schema counts 1.0 as an integer: accept integral floats for int fields (strings and bools stay errors)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_integral)]
_NULL = {"type": "null"}


def _only(*values: Any) -> WithJsonSchema:
    """Advertise only these values (the validator explains why others are refused)."""
    return WithJsonSchema({"anyOf": [{"const": v} if v is not None else _NULL for v in values]})


_EMPTY_LIST = WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0}, _NULL]})


def _invalid(code: str, message: str, **ctx: Any) -> PydanticCustomError:
    """A validation error whose message pydantic reports as is (no 'Value error,' prefix)."""
    return PydanticCustomError(code, message, ctx or None)


class ChatMessageIn(BaseModel):
    """One OpenAI chat message; content is a string or a list of text parts (joined)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        json_schema_extra={"enum": ["system", "developer", "user", "assistant"]})  # 'tool' gets its own 400
    content: Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)] = None
    name: str | None = Field(None, max_length=256)
    # Fields the OpenAI SDK puts on the assistant messages it returns, so clients echo them back:
    # accepted when empty; tool calls themselves are not supported by the guard.
    refusal: str | None = None
    tool_calls: Annotated[list[Any] | None, _EMPTY_LIST] = None
    tool_call_id: str | None = None
    function_call: Annotated[dict[str, Any] | None, _only(None)] = None
    audio: Annotated[dict[str, Any] | None, _only(None)] = None
    annotations: Annotated[list[Any] | None, _EMPTY_LIST] = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise _invalid("content_type", "must be a string, a list of text parts or null; got {got}",
                           got=type(v).__name__)
        for i, p in enumerate(v):
            if not isinstance(p, dict):
                raise _invalid("content_part", "part {i} must be an object with type 'text' and a string 'text'; "
                               "got {got}", i=i, got=type(p).__name__)
            if p.get("type") != "text":
                raise _invalid("content_part", "part {i} has type {t}; only 'text' parts are supported",
                               i=i, t=repr(p.get("type"))[:40])
            if not isinstance(p.get("text"), str):
                raise _invalid("content_part", "part {i}: 'text' must be a string; got {got}",
                               i=i, got=type(p.get("text")).__name__)
            extra = sorted(str(k) for k in p if k not in ("type", "text"))
            if extra:
                raise _invalid("content_part", "part {i} has unknown keys {keys}; accepted: type, text",
                               i=i, keys=str(extra[:5]))
        return v

    @field_validator("tool_calls", "annotations")
    @classmethod
    def _no_tool_calls(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise _invalid("unsupported", "tool calls are not supported by the guard (send null or [])")
        return v

    @field_validator("function_call", "audio")
    @classmethod
    def _must_be_null(cls, v: dict[str, Any] | None) -> None:
        if v is not None:
            raise _invalid("unsupported", "is not supported by the guard (send null)")
        return None

    def text(self) -> str:
        """The message's text content."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p["text"] for p in self.content)


class _GenRequest(BaseModel):
    """Fields shared by chat and text completions; known OpenAI hints are accepted, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=256)
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: Int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings.")
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    # Accepted and ignored: bookkeeping and sampling hints that do not change what the guard does.
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    stream_options: dict[str, bool] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=32)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise _invalid("too_many", "at most 16 stop strings; got {n}", n=len(v))
        return v


class ChatCompletionRequest(_GenRequest):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Annotated[bool | None, _only(False, None)] = None
    top_logprobs: Annotated[Int | None, _only(0, None)] = None
    response_format: Annotated[dict[str, Any] | None, _only({"type": "text"}, None)] = None
    tools: Annotated[list[Any] | None, _EMPTY_LIST] = None
    tool_choice: Annotated[str | dict[str, Any] | None, _only("none", None)] = None
    parallel_tool_calls: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise _invalid("unsupported", "logprobs are not supported by the guard")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise _invalid("unsupported", "logprobs are not supported by the guard")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v != {"type": "text"}:
            raise _invalid("unsupported", "only type 'text' is supported (no JSON mode or schema)")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise _invalid("unsupported", "tools are not supported by the guard")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v is not None and v != "none":
            raise _invalid("unsupported", "tools are not supported by the guard (send null or 'none')")
        return v


class CompletionRequest(_GenRequest):
    """POST /v1/completions body."""

    prompt: str | list[str]
    max_tokens: Int | None = Field(16, ge=1)
    echo: Annotated[bool | None, _only(False, None)] = None
    logprobs: Annotated[Int | None, _only(0, None)] = None
    best_of: Int | None = Field(None, ge=1, le=1)
    suffix: Annotated[str | None, _only("", None)] = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        if v:
            raise _invalid("unsupported", "echo is not supported by the guard")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise _invalid("unsupported", "logprobs are not supported by the guard")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise _invalid("unsupported", "suffix (insertion) is not supported by the guard")
        return v


_MODELS: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionRequest,
                                       "/v1/completions": CompletionRequest, "/admin/targets": ForgetTarget}


# pydantic puts the union member it tried into an error's location ('str', 'list[str]', 'function-after[...]').
_UNION_TAG = re.compile(r"^(?:str|int|float|bool|bytes|none|[a-z-]+\[.*\])$")


def _accepted_fields(path: str, loc: list[str]) -> list[str]:
    """The field names accepted where an unknown field was found (request path and location)."""
    model = _MODELS.get(path)
    if model is ChatCompletionRequest and len(loc) >= 3 and loc[0] == "messages":
        model = ChatMessageIn
    return sorted(model.model_fields) if model is not None else []


def _lone_surrogate(obj: Any, path: str = "") -> str | None:
    """Path of the first string holding a lone UTF-16 surrogate (JSON '\\ud800'), which is not Unicode text."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        if isinstance(k, str) and _lone_surrogate(k) is not None:
            return f"{path}.{k!r}" if path else repr(k)
        found = _lone_surrogate(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


def _diagnose_body(body: bytes) -> str:
    """Why a request body could not be parsed: not UTF-8, not JSON, or nested too deeply."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}); "
                "send JSON encoded as UTF-8")
    try:
        json.loads(text)
    except RecursionError:
        return "request body nests JSON arrays/objects too deeply; send a flat OpenAI request object"
    except ValueError as e:
        return f"request body is not valid JSON ({e})"
    return "request body could not be parsed; send a JSON object"


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its $defs inlined (for hand-written OpenAPI request bodies)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.split("/")[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


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

FAULT_KINDS: tuple[str, ...] = (
    "backend_unreachable", "backend_timeout", "backend_http_error", "backend_bad_response", "backend_stream_cut",
    "backend_stream_error", "backend_error", "detector_error", "detector_timeout", "output_check_error",
    "output_check_timeout", "guard_model_error", "guard_model_timeout", "request_timeout", "store_save_error",
    "store_reload_error", "internal_error")
_STAGE_FAULT = {"guard": "guard_model"}


def _endpoint_of(path: str) -> str:
    """The metrics label of a request path."""
    if path.startswith("/v1/chat/"):
        return "chat"
    if path.startswith("/v1/completions"):
        return "completions"
    if path.startswith("/admin/"):
        return "admin"
    return "other"


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
        self.faults = Counter("unlearn_guard_faults", "Faults by kind; each ended in an error response or a refusal",
                              ["kind"], registry=r)
        for kind in FAULT_KINDS:
            self.faults.labels(kind)
        self.store_reloads = Counter("guard_store_reloads_total", "Forget-store reloads after its directory changed",
                                     registry=r)
        self.error_responses = Counter("guard_error_responses_total", "Error responses by endpoint, status and code",
                                       ["endpoint", "status", "code"], registry=r)
        self.stage = Histogram("guard_stage_seconds", "Time per guard stage", ["stage"], registry=r,
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("guard_request_seconds", "Whole request time", ["endpoint"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def fault(self, kind: str) -> None:
        """Count one fault of this kind."""
        self.faults.labels(kind).inc()

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
            stage = e.split(":", 1)[0]
            self.errors.labels(stage).inc()
            self.fault(_STAGE_FAULT.get(stage, stage) + ("_timeout" if "TimeoutError" in e else "_error"))
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
        body = json.dumps(_error_body(f"request body over this server's limit of {self.max_bytes} bytes",
                                      "invalid_request_error", "body", code="request_too_large")).encode()
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


def _manifest_digest(path: Path) -> str | None:
    """sha256 of a store directory's manifest (it lists every file's checksum), or None while there is none."""
    try:
        return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


class StoreWatcher:
    """Reloads the guard's forget store when the watched directory's manifest changes.

    Stores are written atomically (the whole directory swapped in one step), so a changed manifest
    means a complete new version. A version that does not load (damaged, half-copied by hand) is
    logged and counted as ``store_reload_error``; the guard keeps serving with the store it has,
    and the same version is not retried until the manifest changes again.
    """

    def __init__(self, guarded: GuardedLLM, path: Path, interval_s: float, metrics: Metrics,
                 lock: threading.Lock) -> None:
        """Watch ``path``; ``lock`` is the admin lock, so a reload never interleaves with an admin change."""
        self.guarded, self.path, self.interval_s, self.metrics, self.lock = guarded, Path(path), interval_s, metrics, lock
        self.seen = _manifest_digest(self.path)

    def check(self) -> bool:
        """Reload if the manifest changed since the last check; True when a new store was swapped in."""
        from detectors.persistence import load_detector

        with self.lock:  # an admin save and its note_saved() are never split by a check
            digest = _manifest_digest(self.path)
            if digest is None or digest == self.seen:
                return False
            self.seen = digest
            try:
                det = load_detector(self.path, encoder=getattr(self.guarded.detector, "encoder", None))
                self.guarded.replace_detector(det)
            except Exception as e:
                self.metrics.fault("store_reload_error")
                log.error("reloading the forget store from %s failed (%s: %s); still serving the previous store",
                          self.path, e.__class__.__name__, e)
                return False
        self.metrics.store_reloads.inc()
        log.info("reloaded the forget store from %s", self.path)
        return True

    async def run(self) -> None:
        """Check every ``interval_s`` seconds until cancelled (the load runs in a worker thread)."""
        while True:
            await asyncio.sleep(self.interval_s)
            await asyncio.to_thread(self.check)

    def note_saved(self) -> None:
        """Remember a version this process wrote itself, so it is not reloaded."""
        self.seen = _manifest_digest(self.path)


_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def set_malloc_mmap_threshold(kb: int | None) -> bool:
    """Keep a long-running proxy's heap from growing: blocks of at least ``kb`` KiB get their own mapping,
    returned to the OS when freed (glibc ``mallopt(M_MMAP_THRESHOLD)``). Process-wide, so only the process
    owner (``unlearn-guard serve``) calls it. True when set; False for None or a C library without mallopt."""
    if kb is None:
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("malloc_mmap_threshold_kb=%d ignored: this C library has no mallopt (not glibc)", kb)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, kb * 1024) == 1
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d KiB) was refused; the heap keeps glibc's default threshold", kb)
    return ok


def create_app(guarded: GuardedLLM, config: ServerConfig | None = None) -> FastAPI:
    """Build the proxy app around a GuardedLLM (the guarded model may itself be an upstream server)."""
    cfg = config or ServerConfig()
    metrics = Metrics()
    sem = asyncio.Semaphore(cfg.max_concurrency)
    client_keys = [k.get_secret_value() for k in cfg.api_keys]
    admin_key = cfg.admin_key.get_secret_value() if cfg.admin_key else None
    admin_lock = threading.Lock()  # admin changes and store saves run one at a time (in worker threads)
    if cfg.store_path is not None and not callable(getattr(guarded.detector, "save", None)):
        raise ValueError(f"store_path is set but detector {type(guarded.detector).__name__} has no save(); use a "
                         "detectors.detector.Detector or unset store_path")
    watcher = (StoreWatcher(guarded, cfg.watch_store, cfg.watch_interval_s, metrics, admin_lock)
               if cfg.watch_store is not None else None)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(watcher.run()) if watcher is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="unlearn-guard proxy", version="0.1.0", lifespan=lifespan)
    app.state.store_watcher = watcher
    app.state.guarded = guarded
    app.state.config = cfg
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)  # type: ignore[arg-type]

    def openapi() -> dict[str, Any]:
        """The OpenAPI schema with this server's limits (max_tokens cap, message count) filled in."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            comps = schema.get("components", {}).get("schemas", {})
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = comps.get(name, {}).get("properties", {})
                for field in ("max_tokens", "max_completion_tokens"):
                    for branch in props.get(field, {}).get("anyOf", []):
                        if branch.get("type") == "integer":
                            branch["maximum"] = cfg.max_tokens_cap
                if "messages" in props:
                    props["messages"]["maxItems"] = cfg.max_messages
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

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

    def error(request: Request, status: int, message: str, type_: str, param: str | None = None,
              code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        """An OpenAI-style error response, counted by endpoint, status and code."""
        metrics.error_responses.labels(_endpoint_of(request.url.path), str(status), code or type_).inc()
        return JSONResponse(_error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.type == "timeout":
            metrics.fault("request_timeout")
        return error(request, exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(GuardUnavailableError)
    async def _unavailable(request: Request, exc: GuardUnavailableError) -> JSONResponse:
        stage = _STAGE_FAULT.get(exc.stage, exc.stage)
        metrics.fault(f"{stage}_timeout" if "TimeoutError" in str(exc) else f"{stage}_error")
        return error(request, 503, str(exc), "guard_unavailable", code="guard_unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(BackendError)
    async def _backend(request: Request, exc: BackendError) -> JSONResponse:
        kind = getattr(exc, "kind", "error")
        metrics.fault(f"backend_{kind}" if kind != "error" else "backend_error")
        log.error("backend error (%s): %s", kind, exc)
        return error(request, 504 if kind == "timeout" else 502, str(exc), "upstream_error",
                     code="upstream_error" if kind == "error" else f"upstream_{kind}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if not _UNION_TAG.match(str(x))]
        loc = loc[1:] if loc and loc[0] == "body" else loc
        typ = first.get("type", "")
        if typ == "json_invalid":
            return error(request, 400, _diagnose_body(await request.body()), "invalid_request_error", "body",
                         "invalid_json")
        param = ".".join(loc) or None
        if param is None:
            value = first.get("input")
            if isinstance(value, bytes | str):
                msg = "request body must be a JSON object sent with Content-Type: application/json"
            else:
                msg = f"request body must be a JSON object (got {type(value).__name__}); see /docs for the fields"
            return error(request, 400, msg, "invalid_request_error", "body", "invalid_body")
        if typ == "extra_forbidden":
            accepted = ", ".join(_accepted_fields(request.url.path, loc))
            return error(request, 400, f"unknown field '{param}'; accepted fields here: {accepted}",
                         "invalid_request_error", param, "unknown_field")
        if typ == "missing":
            return error(request, 400, f"{param}: this field is required", "invalid_request_error", param,
                         "missing_field")
        value, msg = first.get("input"), str(first.get("msg", "invalid value"))
        if "got " in msg:
            got = ""
        elif isinstance(value, int | float | bool) or value is None:
            got = f" (got {value!r})"
        else:
            got = f" (got {type(value).__name__})" if typ.endswith("_type") else ""
        return error(request, 400, f"invalid request: {param}: {msg}{got}", "invalid_request_error", param,
                     "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            return error(request, 400, _diagnose_body(await request.body()), "invalid_request_error", "body",
                         "invalid_body")
        return error(request, exc.status_code, str(exc.detail), "invalid_request_error",
                     headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        metrics.fault("internal_error")
        log.error("internal error on %s: %s", request.url.path, exc.__class__.__name__, exc_info=exc)
        return error(request, 500, f"internal error ({exc.__class__.__name__}); the request was not answered",
                     "internal_error")

    def check_text(texts: list[str], param: str) -> None:
        """Refuse prompts with no text or too much text (400 naming ``param``)."""
        total = sum(len(t) for t in texts)
        if total > cfg.max_prompt_chars:
            raise ApiError(400, f"{param}: {total} characters of text is over this server's limit of "
                           f"{cfg.max_prompt_chars}", "invalid_request_error", param, "prompt_too_long")
        if not any(t.strip() for t in texts):
            raise ApiError(400, f"{param}: no text to answer (every message or prompt is empty)",
                           "invalid_request_error", param, "empty_prompt")

    def check_unicode(req: BaseModel) -> None:
        """400 naming the field when a string holds a lone UTF-16 surrogate (JSON '\\ud800')."""
        where = _lone_surrogate(req.model_dump(exclude_none=True))
        if where is not None:
            raise ApiError(400, f"{where}: text holds a lone UTF-16 surrogate escape, which is not valid Unicode; "
                           "send UTF-8 text", "invalid_request_error", where, "invalid_unicode")

    def params_of(req: _GenRequest, max_tokens: int | None, field: str = "max_tokens") -> GenParams:
        mt = max_tokens or guarded.config.max_new_tokens
        if mt > cfg.max_tokens_cap:
            raise ApiError(400, f"{field} {mt} is over this server's cap of {cfg.max_tokens_cap}",
                           "invalid_request_error", field)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenParams(max_new_tokens=mt, temperature=req.temperature or 0.0, top_p=req.top_p or 1.0,
                         stop=stop, seed=req.seed)

    async def run_guarded(make: Callable[[], Awaitable[GuardResult]]) -> GuardResult:
        """Run the guarded model's async path (detector calls micro-batched across requests) under the limits."""
        async with sem:
            try:
                return await asyncio.wait_for(make(), timeout=cfg.request_timeout_s)
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
        except Exception as e:  # noqa: BLE001 - any failure mid-stream ends in an error event, never silence
            if isinstance(e, GuardUnavailableError):
                kind, code = "guard_unavailable", "guard_unavailable"  # counted from the trace below
            elif isinstance(e, BackendError):
                kind, code = "upstream_error", f"upstream_{e.kind}" if e.kind != "error" else "upstream_error"
                metrics.fault(f"backend_{e.kind}" if e.kind != "error" else "backend_error")
            elif isinstance(e, asyncio.TimeoutError):
                kind, code = "timeout", "timeout"
                metrics.fault("request_timeout")
            else:
                kind, code = "internal_error", "internal_error"
                metrics.fault("internal_error")
            log.error("stream aborted: %s (%s)", code, e.__class__.__name__)
            metrics.requests.labels(endpoint, "stream_error").inc()
            yield f"data: {json.dumps(_error_body(str(e) or kind, kind, code=code))}\n\n".encode()
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
        check_text([m["content"] for m in msgs], "messages")
        check_unicode(req)
        params = params_of(req, req.max_completion_tokens or req.max_tokens,
                           "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
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
            res = await run_guarded(lambda: guarded.agenerate(msgs, params))
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
        check_text([prompt], "prompt")
        check_unicode(req)
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
        res = await run_guarded(lambda: guarded.acomplete(prompt, params))
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

    def probe() -> str | None:
        """The first part that cannot serve ('backend' or 'detector'), or None when all can."""
        if not guarded.ready():
            return "backend"
        det = guarded.detector
        own = getattr(det, "ready", None)
        try:
            ok = bool(own()) if callable(own) else det.detect("readiness probe") is not None
        except Exception as e:  # noqa: BLE001 - a detector that cannot judge makes every request fail closed
            log.warning("readiness: detector failed (%s)", e.__class__.__name__)
            ok = False
        return None if ok else "detector"

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            failed = await asyncio.wait_for(asyncio.to_thread(probe), timeout=5.0)
        except Exception:  # noqa: BLE001 - any failure (or a late probe) means not ready
            failed = "probe"
        if failed is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "failed": failed}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/targets", dependencies=[Depends(admin_auth)])
    async def list_targets() -> dict[str, Any]:
        return {"targets": guarded.target_ids()}

    def persist() -> None:
        """Save the detector to ``store_path`` (atomically; the caller holds ``admin_lock``)."""
        if cfg.store_path is None:
            return
        try:
            guarded.detector.save(cfg.store_path)  # type: ignore[attr-defined]
            if watcher is not None and cfg.store_path.resolve() == watcher.path.resolve():
                watcher.note_saved()
        except Exception as e:
            metrics.fault("store_save_error")
            log.error("saving the forget store to %s failed: %s: %s", cfg.store_path, e.__class__.__name__, e)
            raise ApiError(500, f"the change is live but saving the forget store failed ({e.__class__.__name__}: "
                           f"{e}); it will be lost on restart unless a later save succeeds", "store_save_error") from e

    def add_locked(targets: list[ForgetTarget]) -> None:
        """Add the targets all or none (ids must be new), then save; runs under the admin lock."""
        with admin_lock:
            known = set(guarded.target_ids())
            taken = [t.id for t in targets if t.id in known]
            if taken:
                raise ApiError(409, f"forget target(s) {taken} already exist; DELETE them first or use new ids",
                               "conflict_error", "id", "target_exists")
            done: list[str] = []
            try:
                for t in targets:
                    guarded.add_target(t)
                    done.append(t.id)
            except Exception as e:
                for tid in done:
                    guarded.remove_target(tid)
                if isinstance(e, AdminError):
                    raise ApiError(501, str(e), "not_implemented") from e
                if isinstance(e, ValueError):
                    raise ApiError(400, f"target {targets[len(done)].id!r} was refused: {e}", "invalid_request_error",
                                   "targets") from e
                raise
            persist()

    def remove_locked(target_id: str) -> bool:
        """Remove one target, then save; runs under the admin lock."""
        with admin_lock:
            try:
                removed = guarded.remove_target(target_id)
            except AdminError as e:
                raise ApiError(501, str(e), "not_implemented") from e
            if removed:
                persist()
            return removed

    target_schema = _inline_schema(ForgetTarget)

    @app.post("/admin/targets", dependencies=[Depends(admin_auth)], status_code=201, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "anyOf": [target_schema, {"type": "array", "items": target_schema, "minItems": 1}]}}}}})
    async def add_targets(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, _diagnose_body(body), "invalid_request_error", "body", "invalid_body") from e
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise ApiError(400, "no targets given: send a ForgetTarget object or a non-empty list of them",
                           "invalid_request_error", "targets")
        try:
            targets = [ForgetTarget.model_validate(x) for x in items]
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "body"
            raise ApiError(400, f"invalid target: {where}: {err['msg']}", "invalid_request_error", where) from e
        ids = [t.id for t in targets]
        if len(set(ids)) != len(ids):
            raise ApiError(400, f"duplicate target ids in one request: {sorted({i for i in ids if ids.count(i) > 1})}",
                           "invalid_request_error", "id")
        where = _lone_surrogate(items)
        if where is not None:
            raise ApiError(400, f"{where}: text holds a lone UTF-16 surrogate escape, which is not valid Unicode",
                           "invalid_request_error", where, "invalid_unicode")
        await asyncio.to_thread(add_locked, targets)
        log.info("admin added targets %s", ids)
        return JSONResponse({"added": ids}, status_code=201)

    @app.delete("/admin/targets/{target_id}", dependencies=[Depends(admin_auth)])
    async def remove_target(target_id: str) -> dict[str, Any]:
        if not await asyncio.to_thread(remove_locked, target_id):
            raise ApiError(404, f"no forget target {target_id[:100]!r}", "not_found_error", "target_id")
        log.info("admin removed target %s", target_id)
        return {"removed": target_id}

    return app
