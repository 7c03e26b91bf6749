"""Sync views of async code: one event loop in a daemon thread runs the coroutines the sync APIs wait on.

The guard pipeline and the HTTP backend's calls are written once, as async (as inspect_ai's ``eval`` wraps
``eval_async``); their sync methods are thin wrappers over :func:`run_sync` and :func:`iter_sync`. The loop
is shared by every caller in the process and started on first use (again after a fork, whose child has no
threads); blocking work inside the coroutines goes to executors, so one slow request does not hold the others.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid: int | None = None


def _runner_loop() -> asyncio.AbstractEventLoop:
    """The process's sync-runner loop, started on first use."""
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid() or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="sync-runner-loop", daemon=True).start()
            _loop, _pid = loop, os.getpid()
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code (any thread, even one whose own loop is running)."""
    loop = _runner_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("a sync API was called from inside its own runner loop; await the async API instead")
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result()
    except BaseException:
        fut.cancel()  # e.g. KeyboardInterrupt while waiting: stop the coroutine too
        raise


class SyncIterator(Iterator[T]):
    """A blocking iterator over an async iterator that runs on the sync-runner loop; ``close`` closes it."""

    def __init__(self, agen: AsyncIterator[T]) -> None:
        """Wrap ``agen`` (not started yet: its first step runs on the runner loop)."""
        self._agen = agen
        self._done = False

    def __iter__(self) -> SyncIterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            return run_sync(_anext(self._agen))
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None

    def close(self) -> None:
        """Stop the async iterator early (its ``finally`` blocks run on the loop)."""
        if self._done:
            return
        self._done = True
        aclose = getattr(self._agen, "aclose", None)
        if callable(aclose):
            run_sync(aclose())


async def _anext(agen: AsyncIterator[T]) -> T:
    """``anext`` as a coroutine, for ``run_coroutine_threadsafe``."""
    return await agen.__anext__()


def iter_sync(agen: AsyncIterator[T]) -> SyncIterator[T]:
    """A sync iterator over ``agen``."""
    return SyncIterator(agen)
