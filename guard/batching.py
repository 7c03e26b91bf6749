"""Micro-batching of detector calls for the async path: concurrent requests share one encoder call.

A :class:`MicroBatcher` lives on the event loop. ``await batcher.submit(text)`` queues the text; the
queue is sent as one batch call (e.g. ``detector.detect_batch``) in a worker thread when ``window_s``
has passed since the first queued text, when ``max_batch`` texts are waiting, or as soon as a running
batch finishes and frees a slot (at most ``max_inflight`` batches run at once, so a busy server gets
bigger batches and an idle one waits at most ``window_s``). Each caller gets its own item of the
batch's answer. A batch call that raises, answers the wrong number of items or misses its deadline
fails every request of the batch with that error; the caller applies the failure policy. The worker
thread of a late batch cannot be stopped: it finishes in the background and its answer is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _LoopState(Generic[T, R]):
    """Queue and counters of one event loop (a batcher may be used from several loops, one at a time each)."""

    pending: list[tuple[T, asyncio.Future[R]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    inflight: int = 0


@dataclass
class BatchStats:
    """How the batcher has grouped its work (for tests, logs and benchmarks)."""

    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    max_batch_seen: int = 0

    def mean_batch(self) -> float:
        """Items per batch call so far (0 before the first batch)."""
        return self.items / self.batches if self.batches else 0.0


class MicroBatcher(Generic[T, R]):
    """Groups items submitted by concurrent coroutines into batch calls run in a worker thread."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, window_s: float = 0.002, max_batch: int = 64,
                 max_inflight: int = 1, timeout_s: Callable[[int], float] | float = 10.0,
                 executor: concurrent.futures.Executor | None = None, name: str = "batch") -> None:
        """``fn`` maps a list of items to their answers in order; ``timeout_s`` may depend on the batch size."""
        if max_batch < 1 or max_inflight < 1 or window_s < 0:
            raise ValueError("MicroBatcher needs max_batch >= 1, max_inflight >= 1 and window_s >= 0")
        self.fn = fn
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._timeout = timeout_s if callable(timeout_s) else (lambda n, t=float(timeout_s): t)
        self.executor = executor
        self.name = name
        self.stats = BatchStats()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState[T, R]] = weakref.WeakKeyDictionary()

    def _state(self, loop: asyncio.AbstractEventLoop) -> _LoopState[T, R]:
        st = self._states.get(loop)
        if st is None:
            st = self._states[loop] = _LoopState()
        return st

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its answer (raises the batch's error when the batch call fails)."""
        loop = asyncio.get_running_loop()
        st = self._state(loop)
        fut: asyncio.Future[R] = loop.create_future()
        st.pending.append((item, fut))
        if len(st.pending) >= self.max_batch:
            self._dispatch(loop, st)
        elif st.timer is None and st.inflight < self.max_inflight:
            st.timer = loop.call_later(self.window_s, self._on_timer, loop, st)
        return await fut

    def _on_timer(self, loop: asyncio.AbstractEventLoop, st: _LoopState[T, R]) -> None:
        st.timer = None
        self._dispatch(loop, st)

    def _dispatch(self, loop: asyncio.AbstractEventLoop, st: _LoopState[T, R]) -> None:
        """Start batch calls for the queued items while there is a free slot."""
        while st.pending and st.inflight < self.max_inflight:
            if st.timer is not None:
                st.timer.cancel()
                st.timer = None
            batch = [(x, f) for x, f in st.pending[:self.max_batch] if not f.done()]  # drop cancelled callers
            del st.pending[:self.max_batch]
            if not batch:
                continue
            st.inflight += 1
            loop.create_task(self._run(loop, st, batch), name=f"{self.name}-batch")

    async def _run(self, loop: asyncio.AbstractEventLoop, st: _LoopState[T, R],
                   batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Run one batch call in a worker thread and resolve every caller's future."""
        items = [x for x, _ in batch]
        n = len(items)
        self.stats.batches += 1
        self.stats.items += n
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, n)
        timeout = self._timeout(n)
        try:
            try:
                out = await asyncio.wait_for(loop.run_in_executor(self.executor, self.fn, items), timeout=timeout)
            except asyncio.TimeoutError as e:
                raise TimeoutError(f"no answer within {timeout:.1f}s (batch of {n})") from e
            out = list(out)
            if len(out) != n:
                raise RuntimeError(f"{self.name} returned {len(out)} results for {n} items")
        except asyncio.CancelledError:
            for _, f in batch:
                f.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
            self.stats.failed_batches += 1
            log.debug("%s batch of %d failed: %s (message: %d chars, not logged)", self.name, n, e.__class__.__name__,
                      len(str(e)))
            for _, f in batch:
                if not f.done():
                    f.set_exception(e)
        else:
            for (_, f), r in zip(batch, out, strict=True):
                if not f.done():
                    f.set_result(r)
        finally:
            st.inflight -= 1
            if st.pending and not loop.is_closed():
                self._dispatch(loop, st)
