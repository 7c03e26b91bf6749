"""OpenAI-style errors: the ``{"error": {"message", "type", "param", "code"}}`` body and the app's handlers.

A failed or late detector answers 503 ``guard_unavailable`` (fail closed); upstream faults answer 502/504;
a full upstream queue answers 429 ``rate_limit_exceeded`` (``guard.server.limits``); a rejected request body
answers 400 whose ``param`` names the field. Every error response is counted by endpoint, status and code, and
every fault by kind.

The message of an upstream or guard failure is the proxy's own text: an upstream's error body, an SSE error
event or an exception's message may quote unchecked model output (or the upstream's address), so a client sees
at most the upstream's HTTP status, a short identifier-like error code and an exception's class name.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from guard.server.metrics import Metrics, _endpoint_of
from guard.server.schemas import _UNION_TAG, _accepted_fields, _diagnose_body
from guard.server.state import ServerState
from guard.types import BackendError, GuardUnavailableError, RequestFieldError, safe_token

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        """Status, message and OpenAI error type (e.g. invalid_request_error)."""
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code or type_
        self.headers = headers


_UPSTREAM_TEXT = {
    "unreachable": "the upstream model server could not be reached",
    "timeout": "the upstream model server did not answer in time",
    "http_error": "the upstream model server answered with an error",
    "bad_response": "the upstream model server sent a response that is not a valid OpenAI answer",
    "stream_cut": "the upstream stream was cut off before it ended",
    "stream_error": "the upstream stream failed",
}

_STAGE_TEXT = {"detector": "the detector", "guard": "the guard model", "output_check": "the output check"}


def backend_failure(exc: BaseException) -> tuple[int, str, str]:
    """HTTP status, client message and error code of a backend failure, in the proxy's own words (the upstream's
    status and error code at most, never its text or address)."""
    kind = getattr(exc, "kind", "error")
    code = "upstream_error" if kind == "error" else f"upstream_{kind}"
    status = getattr(exc, "status", None)
    message = _UPSTREAM_TEXT.get(kind, "the upstream model failed")
    if kind == "http_error" and isinstance(status, int) and 100 <= status <= 599:
        message = f"the upstream model server answered HTTP {status}"
    upstream_code = safe_token(getattr(exc, "code", None))
    if upstream_code is not None:
        message += f" (upstream error code: {upstream_code})"
    if kind == "http_error" and status == 429:  # the upstream sheds load: so does the proxy, the client retries
        return 429, message + "; retry later", "upstream_rate_limited"
    if kind == "http_error" and status in (400, 404, 413, 422):  # the request itself: e.g. a field it does not support
        return 400, (message + "; it refused the request as invalid (check the fields it supports, e.g. vLLM needs "
                     "--enable-auto-tool-choice for tools, and the prompt's length)"), "upstream_invalid_request"
    return (504 if kind == "timeout" else 502), message + "; the request was not answered", code


def unavailable_message(exc: GuardUnavailableError) -> str:
    """The client message of a fail-closed guard stage: which stage, late or failed, and the exception's class
    name (never its message, which may quote a detector's or the guard model's input or output)."""
    fault = exc.fault
    stage = _STAGE_TEXT.get(fault.stage.value, "a guard stage")
    if fault.timeout:
        return f"guard unavailable: {stage} did not answer in time; the request was not answered"
    cls = safe_token(fault.error)
    return f"guard unavailable: {stage} failed{f' ({cls})' if cls else ''}; the request was not answered"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body (also sent as the last SSE event of a stream that fails midway)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code or type_}}


def error_response(metrics: Metrics, request: Request, status: int, message: str, type_: str,
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error response, counted by endpoint, status and code."""
    metrics.error_responses.labels(_endpoint_of(request.url.path), str(status), code or type_).inc()
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, state: ServerState) -> None:
    """Answer every error, ours or FastAPI's or an unexpected one, with OpenAI's body and count it."""
    metrics = state.metrics
    error = partial(error_response, metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.type == "timeout":
            metrics.fault("request_timeout")
        return error(request, exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestFieldError)
    async def _field(request: Request, exc: RequestFieldError) -> JSONResponse:
        return error(request, 400, str(exc), "invalid_request_error", exc.field, exc.code)

    @app.exception_handler(GuardUnavailableError)
    async def _unavailable(request: Request, exc: GuardUnavailableError) -> JSONResponse:
        metrics.fault(exc.fault.metric)
        return error(request, 503, unavailable_message(exc), "guard_unavailable", code="guard_unavailable",
                     headers={"Retry-After": "5"})

    @app.exception_handler(BackendError)
    async def _backend(request: Request, exc: BackendError) -> JSONResponse:
        kind = getattr(exc, "kind", "error")
        metrics.fault(f"backend_{kind}" if kind != "error" else "backend_error")
        log.error("backend error (%s): %s", kind, exc)  # the backend's message: upstream text only redacted
        status, message, code = backend_failure(exc)
        if status == 429:
            return error(request, 429, message, "requests", code=code,
                         headers={"Retry-After": str(state.config.retry_after_s)})
        if status == 400:
            return error(request, 400, message, "invalid_request_error", code=code)
        return error(request, status, message, "upstream_error", code=code)

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
