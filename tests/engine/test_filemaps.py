"""Guarded private maps (nodegraph/filemaps.py): a file rewritten in place under a guarded map leaves the map's
bytes as they were, and the process alive. Scenarios that would die of SIGBUS without the guard run in a child
process, so that a failure is a failed test, not a dead test run."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nodegraph import filemaps

pytestmark = pytest.mark.skipif(not filemaps.supported(), reason="leases are a Linux feature (and enabled)")


_BYTES = 3 * 1024 * 1024 + 123  # over a few pages, not a whole number of them


@pytest.fixture
def path(tmp_path) -> Path:
    p = tmp_path / "w.bin"
    p.write_bytes(torch.randint(0, 256, (_BYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                  .numpy().tobytes())
    if filemaps.guard(p) is None:
        pytest.skip("this file system or user cannot take leases")
    filemaps.release(p)
    return p


def _mapped(maps, offsets=((0, 1000), (4096 + 17, 2_000_000), (2_100_000, _BYTES - 2_100_000))):
    return [torch.frombuffer(maps.map(o, n), dtype=torch.uint8) for o, n in offsets], offsets


def _child(code: str, path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (``path``, ``expected`` (the file's bytes), ``mapped`` (tensors viewing
    three guarded maps of it) and ``rewrite_elsewhere`` defined): a SIGBUS there fails the test, not the run."""
    prelude = textwrap.dedent(f"""
        import subprocess, sys, threading, time
        from pathlib import Path
        import torch
        from nodegraph import filemaps
        from tests.engine.test_filemaps import _mapped
        path = Path({str(path)!r})
        expected = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        maps = filemaps.guard(path)
        mapped, offsets = _mapped(maps)
        def same():
            return all(torch.equal(t, expected[o:o + n]) for t, (o, n) in zip(mapped, offsets))
        def rewrite_elsewhere():  # another program: truncate, then write other bytes
            t = time.monotonic()
            subprocess.run([sys.executable, "-c",
                            f"f = open({{str(path)!r}}, 'r+b'); f.truncate(0); f.write(b'x' * 100); f.close()"],
                           check=True)
            return time.monotonic() - t
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])


def test_a_guarded_map_keeps_its_bytes_when_another_program_truncates_the_file(path):
    result = _child("""
        assert same() and len(filemaps.private_maps(maps.key)) == 3
        waited = rewrite_elsewhere()
        assert path.stat().st_size == 100
        assert same(), "the maps kept their bytes"
        assert filemaps.private_maps(maps.key) == [], "the maps became memory of the process's own"
        assert maps.broken and path not in [g.path for g in filemaps.held()]
        assert maps.map(0, 8) is None  # a broken guard maps nothing more
        print(f"ok {waited:.2f}")
    """, path)
    assert result.returncode == 0, result.stderr
    # answered by the guard's thread, not by the kernel's timeout (lease-break-time, 45 s by default)
    assert result.stdout.startswith("ok") and float(result.stdout.split()[1]) < 20


def test_the_guard_answers_this_processs_own_writes(path):
    result = _child("""
        with open(path, "r+b") as f:  # this very thread: held until the guard's thread has copied the maps
            f.truncate(0)
        assert same()
        print("ok")
    """, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_guard_answers_while_the_main_thread_computes(path):
    result = _child("""
        writer = threading.Thread(target=rewrite_elsewhere)
        writer.start()
        x = torch.randn(400, 400)
        while writer.is_alive():  # the main thread stays inside torch meanwhile
            x = torch.mm(x, x).div_(400)
        assert same()
        print("ok")
    """, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_maps_go_with_their_tensors_and_idle_guards_are_given_up(path, monkeypatch):
    other = path.with_name("other.bin")
    other.write_bytes(b"0123456789")
    maps = filemaps.guard(path)
    try:
        assert filemaps.guard(path) is maps  # one guard per file
        mapped, offsets = _mapped(maps)
        expected = path.read_bytes()
        assert all(bytes(t.numpy()) == expected[o:o + n] for t, (o, n) in zip(mapped, offsets))
        # each in a map of its own, at the file's offset within a page (as a map of the whole file places it)
        assert all(t.data_ptr() % 4096 == o % 4096 for t, (o, _) in zip(mapped, offsets))
        assert len(filemaps.private_maps(maps.key)) == 3
        del mapped
        gc.collect()
        assert filemaps.private_maps(maps.key) == []
        monkeypatch.setattr(filemaps, "_PRUNE_AFTER_S", 0.0)
        assert filemaps.guard(other) is not None
        held = [g.path for g in filemaps.held()]
        assert maps.broken and other in held and path not in held  # no maps left: given up
    finally:
        filemaps.release(path)
        filemaps.release(other)


def test_no_guard_for_a_file_open_for_writing(path):
    with open(path, "r+b"):
        assert filemaps.guard(path) is None  # a download still writing it: copied, not mapped
    assert path not in [g.path for g in filemaps.held()]
    maps = filemaps.Unguarded(path)  # asked for anyway (--map-weights): mapped without a guard
    assert bytes(maps.map(5000, 8)) == path.read_bytes()[5000:5008]


def test_no_guard_for_a_file_too_large_to_copy_within_the_lease_break_time(path, monkeypatch):
    seconds = int(Path("/proc/sys/fs/lease-break-time").read_text())
    assert filemaps.max_guarded_bytes() == int(seconds / 2 / filemaps.COPY_S_PER_GB * 1e9)
    monkeypatch.setattr(filemaps, "COPY_S_PER_GB", seconds / 2 / (_BYTES - 16) * 1e9)  # a few bytes short
    assert filemaps.guard(path) is None and path not in [g.path for g in filemaps.held()]
    monkeypatch.setattr(filemaps, "COPY_S_PER_GB", seconds / 2 / (_BYTES + 16) * 1e9)
    assert filemaps.guard(path) is not None
    filemaps.release(path)


def test_the_answering_thread_gives_up_idle_guards_by_itself(path, monkeypatch):
    """A server that unloaded its models and loads no more still lets go of their files."""
    monkeypatch.setattr(filemaps, "_PRUNE_AFTER_S", 0.2)
    maps = filemaps.guard(path)
    try:
        deadline = time.monotonic() + 10
        while path in [g.path for g in filemaps.held()] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert maps.broken and path not in [g.path for g in filemaps.held()]
    finally:
        filemaps.release(path)


@pytest.mark.parametrize("lease", ["own lease", "no lease"])
def test_a_child_forked_after_the_guard_keeps_its_maps_when_the_file_is_rewritten(path, lease):
    """A forked child shares the parent's lease, which the parent gives up once it has copied its own maps: the
    child takes a lease of its own, answered by a thread of its own (or, without one, copies its maps as it starts),
    and its maps keep their bytes too."""
    result = _child("""
        import os
        if {no_lease}:
            filemaps.guard = lambda path: None  # the child cannot have one
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: tell the parent it is ready, wait for the rewrite, then read its maps
            try:
                os.write(ready_w, b"1")
                os.read(go_r, 1)
                os._exit(0 if same() and filemaps.private_maps(maps.key) == [] else 3)
            finally:
                os._exit(4)
        os.read(ready_r, 1)
        waited = rewrite_elsewhere()
        os.write(go_w, b"1")
        _, status = os.waitpid(pid, 0)
        assert same()
        print("child", os.waitstatus_to_exitcode(status), f"{{waited:.2f}}")
    """.format(no_lease=lease == "no lease"), path)
    assert result.returncode == 0, result.stderr
    _, code, waited = result.stdout.split()
    # 0: the old bytes, in memory of its own; 3: other bytes or still the file's maps; -7: dead of SIGBUS
    assert code == "0"
    assert float(waited) < 20  # the child answered too (not the kernel's timeout)
