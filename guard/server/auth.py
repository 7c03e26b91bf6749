"""API-key checks: a client key for the OpenAI endpoints, a separate admin key for ``/admin``.

With client keys configured, ``/metrics`` and the API docs (``/docs``, ``/redoc``, ``/openapi.json``) need a
client key too, unless ``public_metrics`` / ``public_docs``; ``/healthz`` and ``/readyz`` stay open for load
balancers. Keys are compared with ``hmac.compare_digest`` against every configured key and never logged.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from guard.server.errors import ApiError
from guard.server.state import ServerState


def _key_of(request: Request) -> str | None:
    """The key a request presents: ``Authorization: Bearer …`` or ``x-api-key``."""
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


async def client_auth(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries a client key (open when none is configured)."""
    st: ServerState = request.app.state.guard
    if st.client_keys and not _matches(_key_of(request), st.client_keys):
        raise ApiError(401, "invalid or missing API key", "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def admin_auth(request: Request) -> None:
    """FastAPI dependency: 403 when the server has no admin key, 401 unless the request carries it."""
    st: ServerState = request.app.state.guard
    if st.admin_key is None:
        raise ApiError(403, "admin endpoints are disabled: the server has no admin key", "permission_error")
    if not _matches(_key_of(request), [st.admin_key]):
        raise ApiError(401, "invalid or missing admin key", "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


_DOC_PATHS = frozenset({"/docs", "/redoc", "/openapi.json"})


async def ops_auth(request: Request) -> None:
    """FastAPI dependency of the operations and docs routes: a client key for ``/metrics`` and the docs when
    client keys are configured (unless made public); the probes stay open."""
    st: ServerState = request.app.state.guard
    path = getattr(request.scope.get("route"), "path", request.url.path)
    if path == "/metrics":
        public = st.config.public_metrics
    elif path in _DOC_PATHS:
        public = st.config.public_docs
    else:
        return
    if not public:
        await client_auth(request)
