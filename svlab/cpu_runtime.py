"""Process-wide settings that make CPU training faster and its results exact: the C allocator and
oneMKL's vector-math dispatch. Both are called by ``train.py`` (and the embedding helpers) before
any tensor work; each says when it does not apply. Also: whether this CPU computes bfloat16 natively
(``train.amp``).

keep_freed_memory (``train.keep_freed_memory``)
    One CPU training step allocates and frees the activations and gradients of a whole batch, in
    blocks of many megabytes. glibc's ``malloc`` serves every block above its mmap threshold (32 MiB
    at most) with a fresh ``mmap`` and unmaps it on ``free``, so in every step the kernel hands out
    and zero-fills the same memory again, page by page (minor page faults). Told to serve large
    blocks from its heap too (``M_MMAP_MAX = 0``) and never to give the top of the heap back
    (``M_TRIM_THRESHOLD`` = 2 GiB - 1), glibc puts a freed activation back in the heap and the next
    step takes it again: once the heap has settled, no page is faulted in, and the step is faster.
    The price: the process keeps its peak memory until it exits, and the heap needs a few steps to
    settle (small allocations split freed blocks at first), so the peak resident memory grows.
    Inputs whose shape changes from call to call fragment the heap further, so only training, whose
    crops all have one shape, turns it on, after its features are read. Only glibc (Linux) has
    ``mallopt``; elsewhere nothing changes. Measurements: ``tools/benchmark.py`` (keys
    ``allocator_*``) and docs/performance.md.

warm_up_vector_math
    PyTorch computes float ``sqrt``, ``exp``, ``log``, ``tanh``, ``cos``, ... of contiguous tensors
    with oneMKL's vector math (VML), each intra-op thread on its own chunk. oneMKL 2024.2 (the one in
    the torch 2.13 wheels) picks each function's kernel lazily at its first call, and when that first
    call runs on several threads at once, one thread can run a low-accuracy kernel for its whole chunk
    (pytorch/pytorch#188792). In training that was Adam's first ``sqrt`` now and then: the run then
    differs in the last digits from every other run with the same seed, and a resumed run from the
    uninterrupted one. One single-threaded call of each function, in float32 and float64, on a
    1-element tensor, before any parallel use resolves the dispatch (the fix of
    pytorch/pytorch#188791, from the outside).

native_bfloat16 (``train.amp: bf16`` on the CPU)
    CPUs with AMX (Intel Xeon 4th generation, "Sapphire Rapids", and later) multiply bfloat16
    matrices in tile units, AVX512-BF16 ones (Cooper Lake, AMD Zen 4) with bfloat16 dot products;
    oneDNN uses either for convolutions and matrix products under ``torch.autocast("cpu")``, and
    training gets faster (``tools/benchmark.py``, keys ``bf16_*``; docs/performance.md). Without
    either, bfloat16 is emulated and slower than float32. float16 autocast has no fast CPU kernels
    for these layers at all.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest trim threshold mallopt takes (an int): never trim the top of the heap.
NEVER_TRIM = 2 ** 31 - 1

# The float unary ops ATen sends to oneMKL VML (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL).
VML_FUNCTIONS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
                 "sqrt", "tan", "tanh", "trunc")
_vector_math_ready = False


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


def has_tunable_malloc() -> bool:
    """Whether ``keep_freed_memory`` can act here: the C library is glibc with ``mallopt``."""
    return _glibc() is not None


def native_bfloat16() -> tuple[bool, str]:
    """``(True, instruction set)`` where this CPU computes bfloat16 products natively (AMX-BF16 or
    AVX512-BF16), else ``(False, why)``. See the module docstring."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if caps.get(flag):
            return True, name
    what = caps.get("cpu_name") or platform.processor() or "this CPU"
    return False, f"{what} has neither AMX-BF16 nor AVX512-BF16: bfloat16 is emulated there"


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


def warm_up_vector_math() -> bool:
    """Call every VML-backed unary op once, single-threaded, in float32 and float64 (see the module
    docstring). Cheap (well under a millisecond) and done once per process; returns whether this call
    did the work (False: already done, or a torch build without MKL, where there is nothing to warm)."""
    global _vector_math_ready
    if _vector_math_ready or not torch.backends.mkl.is_available():
        return False
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            x = torch.full((1,), 0.5, dtype=dtype)  # inside every function's domain
            for name in VML_FUNCTIONS:
                getattr(torch, name)(x)
    _vector_math_ready = True
    return True
