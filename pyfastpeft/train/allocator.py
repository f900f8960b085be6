"""The C allocator's handling of freed memory, for a training process (glibc only).

glibc returns freed memory to the kernel: a large block (from 128 KiB, rising with what is freed, at most
32 MiB) is its own mapping, unmapped on free, and the heap's free top is trimmed. A training step frees
its activations at the end and allocates them again in the next, so every step faults those pages back
in. Where a fault is expensive (virtual machines), that is a large share of a step: on a 2-core KVM guest
a LoRA step of SmolLM2-135M at 4 x 128 tokens faulted 99-172 k pages, with up to 1.6 s of system CPU time,
and the default ``finetune`` run ran at 333-335 instead of 283-289 tokens/s with ``--keep-freed-memory``
(README, Benchmarks). The cost: the process keeps its peak, and a heap without separate mappings
fragments (that run's peak was 2897-2957 instead of 2710-2719 MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to serve every allocation from its heap (no block gets a mapping of its own)
    and never to hand freed heap memory back to the kernel, for the rest of the process. Returns False,
    changing nothing, where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # the largest int: freed memory at the top of the heap is never trimmed
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
