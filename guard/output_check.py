"""Output check: the answer, also while it streams, is checked against the forget store.

``detector.detect_leak`` runs every ``check_every_tokens`` streamed deltas on the text written since
the previous check plus ``check_overlap_chars`` before it (so a fact split across two checks is
seen whole), and once more on the whole answer at the end. In 'block' mode text is released to the client only after a check passed, so leaked text
never leaves; a leak stops generation and the policy's refusal is substituted. 'log' only logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from detectors.types import Detection
from guard.config import GuardConfig
from guard.types import GuardTrace

log = logging.getLogger(__name__)


class LeakCheckError(RuntimeError):
    """The detector failed while checking output (the failure policy decides what happens)."""


class StreamChecker:
    """Feeds streamed deltas through leak checks and decides what may be released.

    ``adetect_leak`` is awaited for each check: the guard passes the micro-batcher's ``submit`` (concurrent
    requests share detector calls) or a deadline-bound call of ``detect_leak`` in a worker thread.
    """

    def __init__(self, adetect_leak: Callable[[str], Awaitable[Detection]], config: GuardConfig,
                 trace: GuardTrace) -> None:
        """Check with ``adetect_leak``; results and timings go into ``trace``."""
        self.adetect_leak = adetect_leak
        self.cfg = config
        self.mode = config.output_check
        self.trace = trace
        trace.output_check_mode = self.mode
        self.text = ""
        self.released = 0
        self.checked = 0
        self.pending = 0
        self.leaked: Detection | None = None

    def _verdict(self, det: Detection) -> bool:
        """Record one leak check; True when it found a leak that matters in this mode."""
        self.trace.output_checks += 1
        if det.flagged:
            self.trace.output_check_fired = True
            self.trace.leak_target_ids = sorted(set(self.trace.leak_target_ids) | set(det.target_ids))
            log.warning("output check fired (mode=%s, score=%.3f, targets=%s)", self.mode, det.score, det.target_ids)
            if self.mode == "block":
                self.leaked = det
                return True
        return False

    async def _check(self, text: str) -> bool:
        """Run one leak check (its time goes into the trace, any failure becomes a LeakCheckError); True when
        it found a leak that matters in this mode."""
        t0 = time.perf_counter()
        try:
            det = await self.adetect_leak(text)
        except Exception as e:
            raise LeakCheckError(f"detect_leak failed: {e.__class__.__name__}: {e}") from e
        finally:
            self.trace.add_time("output_check", time.perf_counter() - t0)
        return self._verdict(det)

    def _due(self, delta: str) -> str | None:
        """Add a delta; the text to check now (the new text plus the overlap), or None when no check is due."""
        self.text += delta
        if self.mode == "off":
            return None
        self.pending += 1
        if self.pending < self.cfg.check_every_tokens:
            return None
        self.pending = 0
        start = max(0, self.checked - self.cfg.check_overlap_chars)
        self.checked = len(self.text)
        return self.text[start:]

    async def feed(self, delta: str) -> str | None:
        """Add a delta; return the text now safe to release ('' to hold), or None when a leak blocks the stream."""
        due = self._due(delta)
        if due is None:
            return "" if self.mode == "block" else self._release()
        return None if await self._check(due) else self._release()

    def _release(self) -> str:
        out, self.released = self.text[self.released:], len(self.text)
        return out

    def release_unchecked(self) -> str:
        """After a failed check that the failure policy let through: stop checking and release the rest."""
        self.mode = "off"
        return self._release()

    async def finish(self) -> str | None:
        """Final check on the whole answer; return the rest to release, or None when it leaks."""
        if self.mode == "off" or not self.text:
            return self._release()
        return None if await self._check(self.text) else self._release()


async def check_text(adetect_leak: Callable[[str], Awaitable[Detection]], text: str, config: GuardConfig,
                     trace: GuardTrace) -> bool:
    """Check a finished answer; True when it must be replaced by the refusal (block mode and a leak)."""
    checker = StreamChecker(adetect_leak, config, trace)
    checker.text = text
    return await checker.finish() is None  # 'off' or an empty answer: no detector call
