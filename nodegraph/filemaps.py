"""Private memory maps of files that stay valid when another program rewrites the file in place (Linux).

A memory-mapped weights file loads in a fraction of the time of a copy and shares the page cache, but the map
reads the file as it is *now*: a program that truncates or rewrites the file in place (``cp new old``, a download
restarted under the same name) makes a later read of the map fault (SIGBUS: the process dies) or see other bytes.
Copy-on-write pages are no protection: truncation discards them too. Renaming a new file over the old one, or
deleting it, is harmless (the map keeps the old file).

A :class:`Guard` holds a read lease on the file (``fcntl(F_SETLEASE)``): the kernel then holds any open of the file
for writing, and any truncation, until the holder lets go (up to ``/proc/sys/fs/lease-break-time``, 45 s by
default), and tells it with a signal. One thread of this module answers: it copies every private map of the file
into anonymous memory *at the same address* (the copy is moved over the map with ``mremap``, so pointers into it
stay valid and a reader sees the same bytes throughout), then releases the lease, and the writer goes on. The maps
have become memory of the process's own, as a copied load would have made them. The copy must end before the
kernel gives up waiting (then the file is truncated under the maps anyway), and writing 1 GB into fresh memory took
0.9-3.3 s on the 2-core development VM (fresh pages are slow there): files larger than the break time allows at
``COPY_S_PER_GB`` with half of it to spare are not guarded (an SD1.5 float32 file of 4.3 GB is, an SDXL one of
13.9 GB is not, at the default 45 s; raise ``/proc/sys/fs/lease-break-time`` for more).

The notice is a signal whose default action is to ignore it (SIGURG), directed at the answering thread
(``F_SETOWN_EX``), which alone blocks and waits for it: no other thread, handler or event loop is involved, and a
notice is answered while the main thread runs a long computation. The kernel sends the first notices of a new lease
to the whole process, until the lease is directed at the thread an instant later: such a notice is ignored, and the
thread, which also checks every guard each second, answers within that second.

A child forked after a guard was taken (``os.fork``, multiprocessing's "fork") would share the parent's lease, and
the parent gives it up as soon as its own maps are copied: the child takes a lease of its own on each guarded file
as it starts, answered by a thread of its own (or, where it cannot have one, copies its maps of that file at once).

Where a lease cannot be had (not Linux, a file of another user without CAP_LEASE, a file open for writing right now,
a file system without leases such as NFS, a file too large, see above) :func:`guard` gives None and the caller
copies instead.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import mmap
import os
import signal
import struct
import sys
import threading
import time
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no leases, no guards
    fcntl = None

from . import heap

log = logging.getLogger(__name__)

_SIGNAL = signal.SIGURG  # default action: ignored (see the module docstring)
_POLL_S = 1.0
_PRUNE_AFTER_S = 60.0
_CHUNK = 64 * 1024 * 1024  # bytes copied per mremap: bounds the extra memory while a map is replaced
COPY_S_PER_GB = 4.0  # a pessimistic time to copy maps into fresh memory (see the module docstring)
_MADV_HUGEPAGE = 14
# Linux's values (fcntl.h), for Pythons whose fcntl module lacks the names
_F_SETSIG, _F_SETOWN_EX, _F_OWNER_TID, _F_SETLEASE, _F_GETLEASE = 10, 15, 0, 1024, 1025
_F_RDLCK, _F_UNLCK = 0, 2
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_MAP_ANONYMOUS = 0x20

# Held while guards are taken or given up, maps made or unmapped, and by anyone who must see a mapped range stay
# as it is (a guard moves memory over the ranges it answers for).
LOCK = threading.RLock()
_guards: dict[tuple[int, int], "Guard"] = {}
_answering: list["Guard"] = []  # the guard whose maps are being copied (under LOCK)
_deferred: list[tuple[int, int]] = []  # maps to unmap once that copy is done
_listener: threading.Thread | None = None
_listener_tid: int | None = None


def _libc():
    libc = heap._libc()
    if libc is not None and not getattr(libc, "_filemaps_typed", False):
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mremap.restype = ctypes.c_void_p
        libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        libc._filemaps_typed = True
    return libc


def supported() -> bool:
    """Whether guards can work here at all (Linux with leases enabled)."""
    if not sys.platform.startswith("linux") or fcntl is None or _libc() is None:
        return False
    try:
        return Path("/proc/sys/fs/leases-enable").read_text().strip() != "0"
    except OSError:
        return False


class Guard:
    """A read lease on one file, answered by copying the file's private maps into the process's own memory."""

    def __init__(self, path: Path, fd: int, key: tuple[int, int]):
        self.path = path
        self._fd = fd
        self.key = key  # (st_dev, st_ino)
        self.broken = False  # the lease was given up: maps made from now on would be unguarded
        self.taken = time.monotonic()

    def map(self, offset: int, nbytes: int):
        """A writable buffer over ``nbytes`` of the file from ``offset``, privately mapped (copy on write: writes
        never reach the file) and guarded; None once the guard has been broken (read a copy instead). The map is
        unmapped when the buffer and everything viewing it (``torch.frombuffer``) are gone."""
        with LOCK:
            if self.broken:
                return None
            return map_region(self._fd, offset, nbytes)

    def _answer(self) -> None:
        """Copy the file's private maps into anonymous memory in place, then let the writer go."""
        with LOCK:
            if self.broken:
                return
            self.broken = True
            _guards.pop(self.key, None)
            _answering.append(self)
            try:
                moved = _replace_all(private_maps(self.key))
                log.info("%s is being written: %.0f MB of its maps copied into memory first", self.path, moved / 2**20)
            except Exception:  # noqa: BLE001 - the writer must be let go whatever happens
                log.exception("%s is being written and its maps could not all be copied", self.path)
            finally:
                _answering.clear()
                _release(self._fd)
                while _deferred:  # maps whose tensors went while they were being copied
                    _libc().munmap(*_deferred.pop())

    def _breaking(self) -> bool:
        try:
            return fcntl.fcntl(self._fd, _F_GETLEASE) != _F_RDLCK
        except OSError:
            return True


def guard(path: Path | str) -> Guard | None:
    """The guard of ``path`` (taken now, or the one already held for the same file); None where a lease cannot be
    had (see the module docstring), and then nothing is held."""
    if not supported():
        return None
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # read-only: a read lease needs it
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if st.st_size > max_guarded_bytes():
            raise OSError(f"{st.st_size / 1e9:.1f} GB cannot be copied within the lease-break time")
        with LOCK:
            _prune()
            held = _guards.get(key)
            if held is not None and not held.broken:
                os.close(fd)
                return held
            tid = _start_listener()
            # the signal first (the lease keeps it), then the lease, then its owner: the thread that answers
            fcntl.fcntl(fd, _F_SETSIG, _SIGNAL)
            fcntl.fcntl(fd, _F_SETLEASE, _F_RDLCK)
            fcntl.fcntl(fd, _F_SETOWN_EX, struct.pack("ii", _F_OWNER_TID, tid))
            held = _guards[key] = Guard(path, fd, key)
            return held
    except OSError as e:
        log.debug("%s: no lease (%s); it will be copied, not mapped", path, e)
        _release(fd)
        return None


class Unguarded:
    """Maps of a file without a guard, for callers that know the file stays as it is while they use them (or that
    replace what they mapped at once). Same interface as :class:`Guard`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        self._finalizer = weakref.finalize(self, os.close, self._fd)  # the maps need no descriptor of their own

    def map(self, offset: int, nbytes: int):
        return map_region(self._fd, offset, nbytes)


def _prune() -> None:
    """Give up guards of files this process no longer maps (a model unloaded), once their loads are surely past
    their first map: each holds a descriptor, which would keep a deleted file's disk space. Called on each new
    guard, and every ``_PRUNE_AFTER_S`` by the answering thread."""
    now = time.monotonic()
    for key, g in list(_guards.items()):
        if now - g.taken > _PRUNE_AFTER_S and not private_maps(key):
            del _guards[key]
            g.broken = True
            _release(g._fd)


def map_region(fd: int, offset: int, nbytes: int):
    """A writable buffer over ``nbytes`` of the open file ``fd`` from ``offset``, privately mapped, unguarded
    (see :meth:`Guard.map`). The map keeps no file descriptor of its own."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset - start + nbytes
    libc = _libc()
    if libc is None or sys.platform == "win32":  # mmap's own object (it keeps a duplicate of the descriptor)
        return memoryview(mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=start))[offset - start:]
    address = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of {length} bytes at {start}: {os.strerror(ctypes.get_errno())}")
    buffer = (ctypes.c_char * nbytes).from_address(address + offset - start)
    weakref.finalize(buffer, _unmap, address, length)
    return buffer


def _unmap(address: int, length: int) -> None:
    with LOCK:  # never while a guard moves memory to this address
        if _answering:  # this very thread, copying maps (a collection ran in its Python code): after the copy
            _deferred.append((address, length))
        else:
            _libc().munmap(address, length)


def private_maps(key: tuple[int, int]) -> list[tuple[int, int]]:
    """The address ranges of this process's private maps of the file ``key`` = (st_dev, st_ino)."""
    dev, ino = key
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 5 or not fields[1].endswith("p") or int(fields[4]) != ino:
                continue
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if os.makedev(major, minor) == dev:
                low, high = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((low, high))
    return ranges


def _replace_all(ranges: list[tuple[int, int]]) -> int:
    """Move a copy of each range in anonymous memory over it, in chunks, on as many threads as there are cores
    (up to 8: the time goes in faulting fresh pages, which the kernel does in parallel); the bytes moved."""
    chunks = [(start, min(_CHUNK, high - start)) for low, high in ranges for start in range(low, high, _CHUNK)]
    if not chunks:
        return 0
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(chunks))) as pool:
        list(pool.map(lambda chunk: _replace(*chunk), chunks))  # the first failure, once every chunk had its try
    return sum(n for _, n in chunks)


def _replace(start: int, n: int) -> None:
    libc = _libc()
    copy = libc.mmap(None, n, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
    if copy in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "no memory for the copy of a map")
    libc.madvise(copy, n, _MADV_HUGEPAGE)  # fewer faults where transparent huge pages are on (a hint only)
    ctypes.memmove(copy, start, n)
    if libc.mremap(copy, n, n, _MREMAP_MAYMOVE | _MREMAP_FIXED, start) != start:
        libc.munmap(copy, n)
        raise OSError(ctypes.get_errno(), "mremap over a map failed")


def max_guarded_bytes() -> int:
    """The largest file a guard is taken for: its copy must fit in half the kernel's lease-break time."""
    try:
        seconds = int(Path("/proc/sys/fs/lease-break-time").read_text())
    except (OSError, ValueError):
        seconds = 45
    return int(seconds / 2 / COPY_S_PER_GB * 1e9)


def _release(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETLEASE, _F_UNLCK)
    except OSError:
        pass
    os.close(fd)


def _start_listener() -> int:
    """The thread that answers the guards' notices (started once; a daemon: it never holds the process up)."""
    global _listener
    if _listener is None or not _listener.is_alive():
        started = threading.Event()
        _listener = threading.Thread(target=_listen, args=(started,), name="nodegraph-filemaps", daemon=True)
        _listener.start()
        started.wait()
    return _listener_tid


def _listen(started: threading.Event) -> None:
    global _listener_tid
    signal.pthread_sigmask(signal.SIG_BLOCK, {_SIGNAL})
    _listener_tid = threading.get_native_id()
    started.set()
    pruned = time.monotonic()
    while True:
        try:
            signal.sigtimedwait({_SIGNAL}, _POLL_S)
            with LOCK:
                breaking = [g for g in _guards.values() if g._breaking()]
            for g in breaking:
                g._answer()
            if time.monotonic() - pruned > _PRUNE_AFTER_S:  # a server that unloaded its models loads no more
                pruned = time.monotonic()
                with LOCK:
                    _prune()
        except Exception:  # noqa: BLE001 - the thread must outlive any one failure: every lease points at it
            log.exception("answering a lease notice failed")


def _after_fork_in_child() -> None:
    """In a forked child: guards of its own for the files the parent guarded (see the module docstring)."""
    global LOCK, _listener, _listener_tid
    # the parent's lock may have been held by one of its other threads, which do not exist here
    LOCK = threading.RLock()
    _listener = _listener_tid = None
    inherited = [g for g in _guards.values() if not g.broken]
    halfway = list(_answering)  # forked while the parent copied these maps: the rest of them are copied here
    _guards.clear()
    _answering.clear()
    _deferred.clear()
    for g in inherited + halfway:
        try:
            os.close(g._fd)  # the parent's open file, and lease: not released here, the parent still holds it
        except OSError:
            pass
        own = None if g in halfway else guard(g.path)
        if own is not None and own.key == g.key:
            g._fd, g.taken = own._fd, own.taken
            _guards[g.key] = g  # the child's own lease, under the object its loaders hold
            continue
        if own is not None:  # the path names another file by now: the maps are of the old one
            release(g.path)
        g.broken = True
        try:
            _replace_all(private_maps(g.key))
        except Exception:  # noqa: BLE001 - the child goes on; its maps of this file stay unguarded
            log.exception("%s: a forked child could not copy its maps of it", g.path)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def held() -> list[Guard]:
    """The guards held now."""
    with LOCK:
        return list(_guards.values())


def release(path: Path | str) -> bool:
    """Give up the guard of ``path`` without touching its maps (for tests and for callers that copied what they
    mapped); True if one was held."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    with LOCK:
        g = _guards.pop((st.st_dev, st.st_ino), None)
        if g is None:
            return False
        g.broken = True
        _release(g._fd)
        return True
