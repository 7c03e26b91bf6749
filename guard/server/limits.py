"""Request body size limit, as ASGI middleware around the whole app."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from guard.server.errors import ApiError, error_body


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (Content-Length checked first, then counted)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        """Wrap an ASGI app."""
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Answer 413 for a body over the limit; pass every other request through unchanged."""
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
        body = json.dumps(error_body(f"request body over this server's limit of {self.max_bytes} bytes",
                                     "invalid_request_error", "body", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
