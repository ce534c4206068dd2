"""Freed memory back to the operating system after long nodes.

glibc's allocator keeps freed blocks of its heaps for later requests and, once a large block was freed, serves
requests up to 32 MB from those heaps too (its mmap threshold grows). A long node (a sampler, a VAE decode) frees
hundreds of MB of intermediates that stay in the process's RSS: the next node's own peak then comes on top of them,
and a server keeps them between prompts. ``malloc_trim(0)`` returns the free pages of every heap; it costs a
millisecond or so, which only a long node can pay for, and the next node faults the pages back in as it uses them.
Measured on the SD1.5-size model in bfloat16 at 512 (``benchmarks/speed.py``'s job): RSS between prompts 3.02 ->
2.70 GB (weights 2.13 GB), the decode's peak 3.35 -> 3.25 GB, no change in time. Elsewhere (no glibc) a no-op.

Within one long node the same holds between its stages: :func:`trim_if_due` is for code that runs a model stage by
stage (nodes/fastpaths.py calls it before each block of a UNet or VAE), and trims only when the last trim is at
least ``STAGE_TRIM_S`` old, so that small models, whose stages take microseconds, never pay for it.

:func:`discard` is for memory still allocated but whose contents are dead (the part of a buffer that an in-place
computation no longer needs): its whole pages leave the RSS at once and read as zeros if touched again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
import time

# Nodes that ran at least this long give their freed memory back; shorter ones (most nodes) skip the call.
TRIM_AFTER_S = 0.25
# Within a node, a trim at most this often (see trim_if_due).
STAGE_TRIM_S = 0.05

_last_trim = 0.0


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except (OSError, TypeError):
        return None


@functools.cache
def _malloc_trim():
    libc = _libc()
    return getattr(libc, "malloc_trim", None) if libc is not None else None  # glibc's only (not musl, macOS)


def trim() -> bool:
    """Give the free pages of the allocator's heaps back to the OS; True when glibc could (and did)."""
    global _last_trim
    fn = _malloc_trim()
    _last_trim = time.monotonic()
    return bool(fn is not None and fn(0))


def trim_if_due() -> bool:
    """:func:`trim` when the last trim was at least ``STAGE_TRIM_S`` ago; True when it trimmed."""
    return time.monotonic() - _last_trim >= STAGE_TRIM_S and trim()


def discard(address: int, nbytes: int) -> int:
    """Drop the whole pages within ``[address, address + nbytes)`` from the process's memory
    (``madvise(MADV_DONTNEED)``): private anonymous pages read as zeros afterwards, pages of a private file map as
    the file's bytes. The caller owns that memory and needs none of its contents. Returns the bytes dropped (0 off
    Linux, or when no whole page lies inside)."""
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    libc = _libc() if sys.platform.startswith("linux") else None
    if end <= start or libc is None:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return end - start if libc.madvise(start, end - start, getattr(mmap, "MADV_DONTNEED", 4)) == 0 else 0


def after_node(duration: float) -> None:
    if duration >= TRIM_AFTER_S:
        trim()
