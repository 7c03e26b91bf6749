"""Hot reload of the forget store when another process (an admin replica) writes a new version.

The served store only moves forward: every saved store carries a generation and the name of its forget
task (see :mod:`detectors.persistence`). A version on disk with a lower generation than the one served
(or the same generation with other content), or one built for another task, is refused: logged at ERROR
with both generations, counted (``store_rollback_refused``, ``store_foreign_task_refused``) and not
loaded, unless an admin forces it (``POST /admin/store/reload`` with ``{"force": true}``). A version
that does not verify or load yet (damaged, or half-copied by ``cp -r`` / rsync) is retried with
exponential back-off until it loads, and reported as a pending reload meanwhile.

How soon a replica sees a new version: :meth:`StoreWatcher.run` looks at the manifest's ``stat()`` every
``poll_s`` seconds (``POLL_S``, 0.25 s; at most ``interval_s``) and checks at once when it changed (every
atomic save swaps the directory in, so the manifest has a new inode), and makes a full check every
``interval_s`` seconds anyway (retries, and an in-place rewrite a ``stat()`` might not tell apart). An
idle replica costs one ``stat()`` per ``poll_s``; a new store is served within ``poll_s`` plus its load
time (measured by ``eval/bench/replicas.py``), whatever ``interval_s`` is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from guard.api import GuardedLLM
from guard.server.metrics import Metrics

if TYPE_CHECKING:  # detectors.persistence imports faiss: only where a store is read
    from detectors.persistence import StoreHeader

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0  # retries of a failing version wait at most this long (and at most 8 check intervals)
POLL_S = 0.25  # run() stats the manifest this often between full checks: a saved store is seen within it
_MISSING = "<no manifest>"  # the failing "version" while the directory has no manifest

Stamp = tuple[int, int, int, int]


def _manifest_stamp(path: Path) -> Stamp | None:
    """(device, inode, size, mtime in ns) of a store directory's manifest, or None while there is none: one
    ``stat()`` that tells a saved version from the last one (an atomic save swaps the directory in: a new inode)."""
    try:
        st = os.stat(path / "manifest.json")
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _manifest_digest(path: Path) -> str | None:
    """sha256 of a store directory's manifest (it lists every file's checksum), or None while there is none."""
    try:
        return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass(frozen=True)
class ServedStore:
    """The version of the store a guard serves now (from its detector's ``meta``; generation 0 when unknown)."""

    generation: int
    task: str | None
    content_digest: str | None


def store_of(detector: Any) -> ServedStore:
    """The version a detector is, from its ``meta`` (``Detector.load`` and ``save`` record it there)."""
    meta = getattr(detector, "meta", None)
    meta = meta if isinstance(meta, dict) else {}
    try:
        generation = int(meta.get("generation", 0) or 0)
    except (TypeError, ValueError):
        generation = 0
    task = meta.get("task")
    return ServedStore(generation, None if task is None else str(task), meta.get("content_digest"))


def served_store(guarded: GuardedLLM) -> ServedStore:
    """The version of the store the guard serves, to compare a version on disk with."""
    return store_of(guarded.detector)


def other_content(disk: StoreHeader | ServedStore, served: ServedStore) -> bool:
    """Whether a version on disk has the served generation but other content (both digests known): a rollback for
    the watcher, a conflict for the admin writer."""
    return (disk.generation == served.generation and bool(disk.content_digest) and bool(served.content_digest)
            and disk.content_digest != served.content_digest)


def refusal(disk: StoreHeader | ServedStore, served: ServedStore) -> tuple[str, str] | None:
    """(fault kind, reason) when version ``disk`` must not replace the served one unforced, else None.

    A task counts as foreign only when both tasks are recorded and differ; an equal generation is a
    rollback only when both content digests are known and differ (directories saved before generations
    existed have neither, and load as before).
    """
    if disk.task is not None and served.task is not None and disk.task != served.task:
        return ("store_foreign_task_refused",
                f"it was built for task {disk.task!r} but this replica serves task {served.task!r}")
    if disk.generation < served.generation:
        return ("store_rollback_refused",
                f"its generation {disk.generation} is older than the served generation {served.generation}")
    if other_content(disk, served):
        return ("store_rollback_refused",
                f"it has the served generation {served.generation} but other content")
    return None


def same_version(disk: StoreHeader, served: ServedStore) -> bool:
    """Whether the version on disk is the one served (same generation and content), so there is nothing to load."""
    return (disk.generation == served.generation and disk.content_digest is not None
            and disk.content_digest == served.content_digest)


Outcome = Literal["reloaded", "unchanged", "refused", "failed", "waiting"]


@dataclass(frozen=True)
class ReloadResult:
    """What one reload attempt did, for the admin endpoint and the logs."""

    outcome: Outcome
    generation: int  # the generation served after the attempt
    message: str
    fault: str | None = None  # the fault kind of a refusal


class StoreWatcher:
    """Reloads the guard's forget store when the watched directory's manifest changes, forward only.

    Stores are written atomically (the whole directory swapped in one step), but a store copied in by
    hand arrives file by file: a version that does not verify or load is logged, counted once as
    ``store_reload_error`` and retried after ``interval_s``, then twice that, up to
    ``min(MAX_BACKOFF_S, 8 * interval_s)``, until it loads (a newer manifest is tried at once). A version
    is marked seen only when it loaded, was the one served already, or was refused on purpose (older
    generation, same generation with other content, foreign task; see :func:`refusal`). The guard keeps
    serving the store it has meanwhile; :meth:`status` reports the pending reload and the last refusal.
    """

    def __init__(self, guarded: GuardedLLM, path: Path, interval_s: float, metrics: Metrics,
                 lock: threading.Lock, clock: Callable[[], float] = time.monotonic, poll_s: float = POLL_S) -> None:
        """Watch ``path``; ``lock`` is the admin lock, so a reload never interleaves with an admin change.

        ``run`` stats the manifest every ``poll_s`` seconds (at most ``interval_s``), so a new version is
        picked up within ``poll_s`` however long ``interval_s`` is.
        """
        self.guarded, self.path, self.interval_s, self.metrics, self.lock = guarded, Path(path), interval_s, metrics, lock
        self.clock = clock
        self.poll_s = min(poll_s, interval_s)
        self.stamp = _manifest_stamp(self.path)  # before the digest: a save in between is seen by the first poll
        self.max_backoff_s = max(interval_s, min(MAX_BACKOFF_S, 8 * interval_s))
        self.seen = _manifest_digest(self.path)
        self.failing: str | None = None  # manifest digest of the version that failed to load (pending), or _MISSING
        self.failing_since: float | None = None
        self.delay = interval_s
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.refused: dict[str, Any] | None = None  # the last version refused on purpose, while it is on disk

    @property
    def pending(self) -> bool:
        """Whether a changed version on disk has not been loaded yet (it failed and is being retried)."""
        return self.failing is not None

    def check(self) -> bool:
        """Reload if the manifest changed since the last check (retries wait their back-off); True when swapped in."""
        with self.lock:  # an admin save and its note_saved() are never split by a check
            return self.attempt_locked(force=False, wait=True).outcome == "reloaded"

    def reload(self, force: bool = False) -> ReloadResult:
        """Load the store on disk now (the admin action); ``force`` also takes an older or foreign version."""
        with self.lock:
            return self.attempt_locked(force=force, wait=False)

    def attempt_locked(self, force: bool, wait: bool) -> ReloadResult:
        """One reload attempt; the caller holds the admin lock. ``wait``: a watcher check (skips seen versions, backs off)."""
        served = served_store(self.guarded)
        digest = _manifest_digest(self.path)
        if wait and digest == self.seen:
            if self.failing is not None:  # the directory went back to the version already seen
                self._clear_pending()
            return ReloadResult("unchanged", served.generation, "no new version")
        if wait and (digest or _MISSING) == self.failing and self.clock() < self.retry_at:
            return ReloadResult("waiting", served.generation, f"retrying after back-off: {self.last_error}")
        if digest is None:
            return self._failed(None, f"{self.path}/manifest.json is missing (the store is gone or being copied)")
        from detectors.detector import load_detector
        from detectors.persistence import read_store_header

        forced_over: tuple[str, str] | None = None
        try:
            header = read_store_header(self.path)
            if not force:
                why = refusal(header, served)
                if why is not None:
                    return self._refuse(digest, header, served, *why)
                if same_version(header, served):
                    self._mark_seen(digest)
                    return ReloadResult("unchanged", served.generation, f"generation {served.generation} is served")
            det = load_detector(self.path, encoder=getattr(self.guarded.detector, "encoder", None))
            loaded = store_of(det)
            # check what was loaded too: the directory may have been swapped since its header was read
            why = refusal(loaded, served)
            if why is not None and not force:
                return self._refuse(digest, loaded, served, *why)
            forced_over = why
            self.guarded.replace_detector(det)
        except Exception as e:  # noqa: BLE001 - any failure leaves the previous store served and is retried
            return self._failed(digest, f"{e.__class__.__name__}: {e}")
        self._mark_seen(digest)
        self.metrics.store_reloads.inc()
        if forced_over is not None:
            self.metrics.store_forced_reloads.inc()
            log.warning("FORCED reload of the forget store from %s: generation %d of task %r replaces generation %d "
                        "of task %r, which an unforced reload refuses (%s)", self.path, loaded.generation, loaded.task,
                        served.generation, served.task, forced_over[1])
        else:
            log.info("reloaded the forget store from %s: generation %d (was %d)", self.path, loaded.generation,
                     served.generation)
        return ReloadResult("reloaded", loaded.generation, f"generation {loaded.generation} of task {loaded.task!r} "
                            f"replaced generation {served.generation}")

    def _mark_seen(self, digest: str | None) -> None:
        """Record a version as dealt with: loaded, already served, or written by this process."""
        self.seen = digest
        self.refused = None
        self._clear_pending()

    def _clear_pending(self) -> None:
        """Forget the failing version and its back-off."""
        self.failing, self.failing_since, self.last_error, self.delay, self.retry_at = None, None, None, self.interval_s, 0.0

    def _refuse(self, digest: str, disk: StoreHeader | ServedStore, served: ServedStore, fault: str,
                why: str) -> ReloadResult:
        """Refuse a version on purpose: log at ERROR, count, mark it seen so it is not tried again."""
        first = self.refused is None or self.refused.get("manifest_digest") != digest
        self.seen = digest
        self._clear_pending()
        self.refused = {"generation": disk.generation, "task": disk.task, "reason": why, "fault": fault,
                        "manifest_digest": digest}
        if first:
            self.metrics.fault(fault)
        log.error("refused the forget store in %s: %s (on disk: generation %d, task %r; served: generation %d, "
                  "task %r); still serving generation %d. To load it anyway: POST /admin/store/reload "
                  '{"force": true}', self.path, why, disk.generation, disk.task, served.generation, served.task,
                  served.generation)
        return ReloadResult("refused", served.generation, f"refused the store on disk: {why}", fault)

    def _failed(self, digest: str | None, error: str) -> ReloadResult:
        """A version that does not load (yet): count it once, keep serving, retry after a growing back-off."""
        served = served_store(self.guarded)
        key = digest or _MISSING
        if key != self.failing:
            self.failing, self.failing_since, self.delay = key, self.clock(), self.interval_s
            self.metrics.fault("store_reload_error")
            log.error("reloading the forget store from %s failed (%s); still serving generation %d, retrying in %.3g s",
                      self.path, error, served.generation, self.delay)
        else:
            self.delay = min(self.delay * 2, self.max_backoff_s)
            log.warning("reloading the forget store from %s still fails after %.3g s (%s); retrying in %.3g s",
                        self.path, self.clock() - (self.failing_since or self.clock()), error, self.delay)
        self.retry_at = self.clock() + self.delay
        self.last_error = error
        return ReloadResult("failed", served.generation, f"the store on disk did not load: {error}")

    def changed(self) -> bool:
        """Whether the manifest's ``stat()`` differs from the last poll's (one system call; remembers the new one)."""
        stamp = _manifest_stamp(self.path)
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        return True

    async def run(self) -> None:
        """Until cancelled: check as soon as a poll sees the manifest change, and every ``interval_s`` seconds anyway
        (the poll, the check and its load run in worker threads: a stalled network volume never blocks the event
        loop, which goes on serving the store it has)."""
        due = time.monotonic() + self.interval_s
        while True:
            await asyncio.sleep(self.poll_s)
            if await asyncio.to_thread(self.changed) or time.monotonic() >= due:
                await asyncio.to_thread(self.check)
                due = time.monotonic() + self.interval_s

    def note_saved(self) -> None:
        """Remember a version this process wrote itself, so it is not reloaded."""
        self._mark_seen(_manifest_digest(self.path))

    def status(self) -> dict[str, Any]:
        """The served version and any pending or refused reload, for ``/readyz``."""
        served = served_store(self.guarded)
        refused = None if self.refused is None else {k: v for k, v in self.refused.items() if k != "manifest_digest"}
        return {"generation": served.generation, "task": served.task, "pending_reload": self.pending,
                "last_reload_error": self.last_error, "refused": refused}

