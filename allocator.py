"""The C allocator during training: keep freed memory for the next step instead of returning it.

Why this exists: one CPU training step of the default x-vector (batch 64, 2-s crops) allocates and
frees about 0.6 GB of activations and gradients, in blocks of 6-77 MB. glibc's ``malloc`` serves every
block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and unmaps it on ``free``, so in
every step the kernel hands out and zero-fills some 150 000 new pages (minor page faults). On the
2-core reference machine, keeping the memory makes the step 1.12-1.22x faster (``benchmark.py``, keys
``allocator_*``).

:func:`keep_freed_memory` tells glibc to serve large blocks from its heap too (``M_MMAP_MAX = 0``) and
never to give the top of the heap back (``M_TRIM_THRESHOLD`` = 2 GiB - 1). A freed activation then goes
back to the heap and the next step takes it again: after the first steps no page is faulted in.
The price: the process keeps its peak memory until it exits, and the heap needs a few steps to settle
(small allocations split freed blocks at first): about +20 % peak resident memory for the default
x-vector at batch 64 (975 -> 1 155 MiB in the benchmark). Inputs whose shape changes from call to
call fragment the heap further, so only training, whose crops all have one shape, turns it on
(``train.keep_freed_memory``), after its features are read.

Only glibc (Linux) has ``mallopt``; on macOS, Windows or musl :func:`keep_freed_memory` changes nothing
and says why.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest trim threshold mallopt takes (an int): never trim the top of the heap.
NEVER_TRIM = 2 ** 31 - 1


def _glibc():
    """The C library as a ``ctypes.CDLL`` if it is glibc with ``mallopt``, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> tuple[bool, str]:
    """Make glibc keep freed memory in the heap for reuse (see the module docstring).

    Process-wide and not undone; processes started later by ``fork`` (DataLoader workers) inherit it.
    Returns ``(applied, message)``: ``(False, why)`` where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False, f"the C library here is not glibc ({platform.system()} {platform.libc_ver()[0] or '?'})"
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return False, "glibc refused the mallopt settings"
    return True, "glibc malloc keeps freed memory for reuse (M_MMAP_MAX=0, no heap trimming)"
