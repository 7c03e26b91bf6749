"""The proxy's limits: the request body size (ASGI middleware) and the upstream slots with their bounded queue.

``UpstreamLimiter`` is what ``create_app`` sets as ``GuardedLLM.upstream_slot``: at most ``max_concurrency``
target-model calls (an answer, or a whole stream) run at once, at most ``max_queue`` requests wait for a slot
(first come, first served), and one more is refused at once with :class:`Overloaded` (HTTP 429 with
``Retry-After``). Refusals decided before any target call never take a slot. A waiter whose request deadline
passes (or whose client goes away) leaves the queue; a slot handed to it as it left is passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from guard.server.errors import ApiError, error_body

log = logging.getLogger(__name__)


class Overloaded(ApiError):
    """Every upstream slot is busy and the queue is full: 429 ``rate_limit_exceeded`` with ``Retry-After``."""

    def __init__(self, running: int, waiting: int, retry_after_s: int) -> None:
        """The limiter's state when it refused, and the Retry-After to send."""
        super().__init__(429, f"the server is at capacity ({running} upstream calls running, {waiting} waiting); "
                         f"retry after {retry_after_s}s", "requests", code="rate_limit_exceeded",
                         headers={"Retry-After": str(retry_after_s)})


class UpstreamLimiter:
    """Bounds the target-model calls of one app: ``max_concurrency`` at once, ``max_queue`` waiting, FIFO.

    Thread-safe, so the guarded model's sync API (another event loop) may share it; a freed slot is handed to
    the oldest waiter on that waiter's own loop.
    """

    def __init__(self, max_concurrency: int, max_queue: int, retry_after_s: int = 1,
                 on_shed: Callable[[], None] | None = None) -> None:
        """Slots, queue length, the Retry-After of a refusal and a callback per refusal (a metrics counter)."""
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("UpstreamLimiter needs max_concurrency >= 1 and max_queue >= 0")
        self.max_concurrency, self.max_queue, self.retry_after_s = max_concurrency, max_queue, retry_after_s
        self._on_shed = on_shed
        self._lock = threading.Lock()
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._shed_unlogged, self._logged_at = 0, -float("inf")

    @property
    def running(self) -> int:
        """Slots in use now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body of the ``async with`` (``GuardedLLM.upstream_slot``)."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Take a slot, waiting in line for one; Overloaded at once when the line is full."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._running < self.max_concurrency and not self._waiters:
                self._running += 1
                return
            full = len(self._waiters) >= self.max_queue
            if not full:
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append(fut)
            running, waiting = self._running, len(self._waiters)
        if full:
            if self._on_shed is not None:
                self._on_shed()
            self._log_shed(running, waiting)
            raise Overloaded(running, waiting, self.retry_after_s)
        try:
            await fut
        except BaseException:
            with self._lock:
                handed = fut.done() and not fut.cancelled()
                if not handed:
                    fut.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
            if handed:  # the slot arrived as this request gave up: pass it on
                self.release()
            raise

    def _log_shed(self, running: int, waiting: int) -> None:
        """Log sheds at WARNING at most every 10 s (with the count since), so an overload does not flood the log."""
        self._shed_unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= 10.0:
            log.warning("upstream queue full (%d running, %d waiting): %d request(s) shed with 429 since the last "
                        "report", running, waiting, self._shed_unlogged)
            self._shed_unlogged, self._logged_at = 0, now

    def release(self) -> None:
        """Free a slot: hand it to the oldest waiter, or count it free when nobody waits."""
        with self._lock:
            if not self._waiters:
                self._running -= 1
                return
            fut = self._waiters.popleft()  # the slot passes to it: ``running`` stays the same
        loop = fut.get_loop()
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is here:
            self._give(fut)
            return
        try:
            loop.call_soon_threadsafe(self._give, fut)
        except RuntimeError:  # that waiter's loop has closed: the next one gets the slot
            self.release()

    def _give(self, fut: asyncio.Future[None]) -> None:
        """Wake a waiter with its slot (on its loop); one that has already given up passes the slot on."""
        if fut.done():
            self.release()
        else:
            fut.set_result(None)


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
