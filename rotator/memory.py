"""Give memory back to the operating system after a large piece of work (a scan).

CPython frees objects as soon as nothing refers to them, but glibc's allocator keeps
the freed pages of large arenas for reuse, so a daemon's RSS would stay at its largest
scan's height. `give_back` collects reference cycles, then asks glibc to return what it
can (`malloc_trim`); elsewhere (musl, macOS) the collection alone is done."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def give_back() -> None:
    """Free unreachable objects and return free heap pages to the operating system."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
