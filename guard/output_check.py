"""Output check: the answer, also while it streams, is checked against the forget store.

``detector.detect_leak`` runs every ``check_every_tokens`` streamed deltas on the text written since
the previous check plus ``check_overlap_chars`` before it (so a fact split across two checks is
seen whole), and once more on the whole answer at the end. In 'block' mode text is released to the client only after a check passed, so leaked text
never leaves; a leak stops generation and the policy's refusal is substituted. 'log' only logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from detectors.types import Detection
from guard.config import GuardConfig
from guard.types import GuardTrace

log = logging.getLogger(__name__)


class LeakCheckError(RuntimeError):
    """The detector failed while checking output (the failure policy decides what happens)."""


class StreamChecker:
    """Feeds streamed deltas through leak checks and decides what may be released."""

    def __init__(self, detect_leak: Callable[[str], Detection], config: GuardConfig, trace: GuardTrace) -> None:
        """``detect_leak`` is the detector's method; results and timings go into ``trace``."""
        self.detect_leak = detect_leak
        self.cfg = config
        self.mode = config.output_check
        self.trace = trace
        trace.output_check_mode = self.mode
        self.text = ""
        self.released = 0
        self.checked = 0
        self.pending = 0
        self.leaked: Detection | None = None

    def _check(self, text: str) -> bool:
        """Run one leak check; True when it found a leak that matters in this mode."""
        t0 = time.perf_counter()
        try:
            det = self.detect_leak(text)
        except Exception as e:
            raise LeakCheckError(f"detect_leak failed: {e.__class__.__name__}: {e}") from e
        finally:
            self.trace.add_time("output_check", time.perf_counter() - t0)
        self.trace.output_checks += 1
        if det.flagged:
            self.trace.output_check_fired = True
            self.trace.leak_target_ids = sorted(set(self.trace.leak_target_ids) | set(det.target_ids))
            log.warning("output check fired (mode=%s, score=%.3f, targets=%s)", self.mode, det.score, det.target_ids)
            if self.mode == "block":
                self.leaked = det
                return True
        return False

    def feed(self, delta: str) -> str | None:
        """Add a delta; return the text now safe to release ('' to hold), or None when a leak blocks the stream."""
        self.text += delta
        if self.mode == "off":
            out, self.released = self.text[self.released:], len(self.text)
            return out
        self.pending += 1
        if self.pending < self.cfg.check_every_tokens:
            return "" if self.mode == "block" else self._release()
        self.pending = 0
        start = max(0, self.checked - self.cfg.check_overlap_chars)
        self.checked = len(self.text)
        if self._check(self.text[start:]):
            return None
        return self._release()

    def _release(self) -> str:
        out, self.released = self.text[self.released:], len(self.text)
        return out

    def finish(self) -> str | None:
        """Final check on the whole answer; return the rest to release, or None when it leaks."""
        if self.mode == "off":
            return self._release()
        if self.text and self._check(self.text):
            return None
        return self._release()


def check_text(detect_leak: Callable[[str], Detection], text: str, config: GuardConfig, trace: GuardTrace) -> bool:
    """Check a finished answer; True when it must be replaced by the refusal (block mode and a leak)."""
    if config.output_check == "off" or not text:
        trace.output_check_mode = config.output_check
        return False
    checker = StreamChecker(detect_leak, config, trace)
    checker.text = text
    return checker.finish() is None
