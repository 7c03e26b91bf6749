"""Atomic file and directory writes: a crash mid-write leaves the previous version intact."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to a temp file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write an object as JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_PATH_LOCKS: dict[str, threading.RLock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (so a rename survives a power loss), to disk; best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # file system or kernel without RENAME_EXCHANGE: the two-rename fallback
    raise OSError(err, f"cannot swap {a} into place: {os.strerror(err)}", str(b))


def _sweep_stale(path: Path) -> None:
    """Remove temp directories left by writes to ``path`` whose process no longer runs."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(path.name) + 2:].split(".", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("removing %s, left by an interrupted write (process %d is gone)", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            continue


def path_lock(path: Path) -> threading.RLock:
    """One lock per destination, so two threads of a process never swap the same directory at once."""
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(str(path.resolve()), threading.RLock())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory to fill; on success it replaces ``path`` in one atomic step.

    Every file is fsynced before the swap. On Linux the swap is ``renameat2(RENAME_EXCHANGE)``, so
    a process killed at any moment leaves either the previous or the new version at ``path``,
    never none and never a mix. Elsewhere the old directory is first moved aside to
    ``.<name>.old-<pid>-<thread>`` and :func:`recover_dir` puts it back if a crash came between the
    two renames. On an exception the temp directory is removed and ``path`` is left as it was.
    Temp directories of writers that died are swept by the next write; writes to one path are
    serialised within a process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path_lock(path):
        _sweep_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
            _fsync(tmp)
            if not path.exists():
                os.replace(tmp, path)
            elif not _exchange(tmp, path):
                old = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            _fsync(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the previous version


def recover_dir(path: str | Path, is_valid: Callable[[Path], bool] | None = None) -> bool:
    """Put back the previous version of ``path`` when a fallback swap died between its two renames.

    Does nothing when ``path`` exists. Otherwise the newest ``.<name>.old-*`` that ``is_valid``
    accepts is renamed to ``path``; returns whether one was restored.
    """
    path = Path(path)
    if path.exists():
        return False
    for old in sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if is_valid is not None and not is_valid(old):
            continue
        os.replace(old, path)
        log.warning("%s was missing after an interrupted write; restored the previous version from %s", path, old.name)
        return True
    return False


class WriterLockTimeout(TimeoutError):
    """Another process held a directory's writer lock for longer than the caller would wait."""


@contextlib.contextmanager
def writer_lock(path: str | Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<name>.lock`` beside the directory ``path`` while its owner reads, changes
    and saves it, so processes sharing it (proxy replicas, the CLI) write one at a time and none saves over a change
    it has not read. Without ``fcntl`` (not POSIX) or where the lock file cannot be created, nothing is locked (a
    warning says so). Raises :class:`WriterLockTimeout` after ``timeout_s``; the lock ends with the block or the
    process."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        log.warning("cannot open the writer lock beside %s (%s); saving without it", path, e.__class__.__name__)
        yield
        return
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WriterLockTimeout(f"another process has been writing {path} for over {timeout_s:g} s") from None
                time.sleep(0.01)
        yield  # closing the descriptor releases the lock, also when the process dies
    finally:
        os.close(fd)
