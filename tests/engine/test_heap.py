"""Long nodes give their freed memory back to the OS (nodegraph/heap.py); short ones do not pay for the call."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import nodegraph as ng
from nodegraph import heap

from . import toy
from .test_executor import chain


@pytest.mark.parametrize("threshold, expected", [(0.0, 4), (60.0, 0)])
def test_nodes_trim_the_heap_only_when_they_ran_long(monkeypatch, threshold, expected):
    calls = []
    monkeypatch.setattr(heap, "TRIM_AFTER_S", threshold)
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1) or True)
    result = ng.Executor(toy.registry()).run(chain())
    assert result.status == "success"
    assert len(calls) == expected  # one per node that ran: Const, Add, Scale, Show
    calls.clear()
    ng.Executor(toy.registry()).run(chain(), outputs=["2"])
    assert len(calls) == (2 if threshold == 0 else 0)


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_trim_returns_freed_heap_pages_to_the_os():
    blocks = [bytearray(64 << 10) for _ in range(3000)]  # 190 MB of heap blocks (below the mmap threshold)
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])  # touched: resident
    pinned = blocks[-1]  # the heap's top stays in use, so only trimming inside the heap can give pages back
    del blocks
    before = _rss()
    if not heap.trim():
        pytest.skip("no glibc malloc_trim here")
    assert before - _rss() > 100 << 20
    assert pinned[0] == 1


def test_stages_trim_only_when_the_last_trim_is_old_enough(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(heap, "STAGE_TRIM_S", 60.0)
    assert heap.trim()  # a node's trim counts as the last one
    assert not heap.trim_if_due() and len(calls) == 1
    monkeypatch.setattr(heap, "STAGE_TRIM_S", 0.0)
    assert heap.trim_if_due() and heap.trim_if_due() and calls == [0, 0, 0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_discard_drops_whole_pages_of_owned_memory_and_nothing_around_them():
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    # private and anonymous, as the allocator maps large blocks (a plain mmap(-1, n) is shared)
    region = mmap.mmap(-1, 8 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.write(b"\x07" * (8 * page))
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    # from the middle of page 2 to the middle of page 6: pages 3, 4 and 5 lie wholly inside
    assert heap.discard(address + 2 * page + page // 2, 4 * page) == 3 * page
    data = region[:]
    assert data[:3 * page] == b"\x07" * (3 * page)  # the partial page before is kept
    assert data[3 * page:6 * page] == bytes(3 * page)  # dropped pages read as zeros
    assert data[6 * page:] == b"\x07" * (2 * page)
    assert heap.discard(address + 1, page // 2) == 0  # no whole page inside
