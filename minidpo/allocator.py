"""glibc's malloc told to keep the memory torch frees, so the next step reuses its pages.

Why: every training step and every sampled token allocates tensors of 0.1-30 MB and
frees them again. glibc serves a block above its mmap threshold with freshly mapped
pages and unmaps it on free, and gives the top of its heap back to the kernel once more
than its trim threshold is free; so each step's tensors land on new pages, and the
kernel zero-fills every 4 KiB page on its first touch (a page fault). On a 2-core
virtual machine a DPO step took 1.49x as long and the whole pipeline 1.21x with glibc as
it comes (``scripts/bench_allocator.py``, ``scripts/benchmark.py``; the README has the
runs). The usual cure in this
field is to preload jemalloc or tcmalloc; this is the same effect without a new
dependency.

`keep_freed_memory` raises both thresholds once, with ``mallopt``: blocks up to
`MMAP_THRESHOLD` come from the heap and freed memory stays in it for the next
allocation. The process then holds on to its peak heap instead of returning it between
steps; nothing else changes. Allocation never changes an arithmetic result: the tiny
pipeline writes the same files, bit for bit, either way.

Where it applies: Linux with glibc; elsewhere (macOS, musl) it does nothing. The
command line calls it at start. ``MINIDPO_MALLOC=default`` leaves glibc's own
behaviour (the benchmark's "before").
"""

from __future__ import annotations

import ctypes
import os
import platform

from minidpo.errors import MinidpoError

ENV = "MINIDPO_MALLOC"  # "keep" (the default) or "default": glibc as it comes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # free heap above this goes back to the kernel


def mode(environ: dict[str, str] | None = None) -> str:
    """``keep`` or ``default``, from `ENV`; anything else is one MinidpoError."""
    value = (os.environ if environ is None else environ).get(ENV, "keep") or "keep"
    if value not in ("keep", "default"):
        raise MinidpoError(f"{ENV}: must be keep or default, got {value!r}")
    return value


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (calling it again changes
    nothing); True when applied."""
    if mode(environ) == "default" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; setting either turns off glibc's sliding threshold
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
