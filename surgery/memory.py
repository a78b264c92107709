"""Keep glibc's heap from holding on to the surgery's freed tensors.

glibc's malloc (Linux) serves a request of at least its *mmap threshold* with a mapping of
its own, which `free` hands straight back to the system; smaller requests come from the
heap, which keeps freed memory for reuse. The threshold is dynamic by default: freeing a
mapped block raises it to that block's size (up to 32 MiB). After the q(z) kernel frees its
16 MiB block, the multi-MiB tensors of every later decoder call come from the heap, and a
loop that allocates and frees them at every step can leave its freed chunks unused: the heap
then grows by a step's allocations at every step, although nothing stays in use. That is how
a default run reached 8 GB once in six (results/memory/README.md: 84 MB in use and 1.8 GB
held free after 300 steps of the importance-sampling loop's pattern, in some runs).

`pin_mmap_threshold` sets the threshold once, which also turns its dynamic raising off: every
tensor from 128 KiB up is then its own mapping and leaves the process when freed. The
surgery's entry points call it; it changes no number, only where memory comes from.
Elsewhere (macOS, musl) it does nothing: those allocators return large blocks themselves.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

#: glibc's `mallopt` parameter number of M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3

#: Requests from this size up are mapped, never taken from the heap: glibc's own initial
#: threshold, kept fixed instead of raised.
MMAP_THRESHOLD = 128 << 10


def _find_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None for a C library without it.

    Looked up among the symbols the process already has (`dlopen(NULL)`): the interpreter links
    the C library. `ctypes.util.find_library` would start `ldconfig` at every import."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


_MALLOPT = _find_mallopt()
_pinned: int | None = None


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `nbytes` for this process (once; later calls are free).

    Returns:
        True when the threshold is pinned; False where the C library has no `mallopt`.
    """
    global _pinned
    if _pinned == nbytes:
        return True
    if _MALLOPT is None or _MALLOPT(_M_MMAP_THRESHOLD, int(nbytes)) != 1:
        return False
    _pinned = int(nbytes)
    return True
