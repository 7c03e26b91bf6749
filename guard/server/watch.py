"""Hot reload of the forget store when another process (an admin replica) writes a new version."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from pathlib import Path

from guard.api import GuardedLLM
from guard.server.metrics import Metrics

log = logging.getLogger(__name__)


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
        from detectors import load_detector

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
