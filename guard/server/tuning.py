"""Process-wide allocator tuning for a long-running proxy (glibc malloc)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def set_malloc_mmap_threshold(kb: int | None) -> bool:
    """Keep a long-running proxy's heap from growing: blocks of at least ``kb`` KiB get their own mapping,
    returned to the OS when freed (glibc ``mallopt(M_MMAP_THRESHOLD)``). Process-wide, so only the process
    owner (``unlearn-guard serve``) calls it. True when set; False for None or a C library without mallopt."""
    if kb is None:
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("malloc_mmap_threshold_kb=%d ignored: this C library has no mallopt (not glibc)", kb)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, kb * 1024) == 1
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d KiB) was refused; the heap keeps glibc's default threshold", kb)
    return ok
