"""The result cache: content-addressed node results kept for the life of the process, least recently used first out.

A node's key is a hash of what determines its result: its type and version, its literal inputs (for inputs naming
files, the file's identity rather than its name) and the keys of the upstream results it reads. Node ids and layout
play no part, so the same sub-graph in two workflows shares results, and switching A -> B -> A reruns nothing of A
while the budget holds.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable


@dataclass(frozen=True)
class CacheEntry:
    values: tuple
    ui: dict
    nbytes: int


class ResultCache:
    """An LRU map from node keys to results, bounded by a count of entries and an estimate of bytes."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 8 * 1024**3):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the server reads statistics from another thread

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, values: tuple, ui: dict) -> None:
        entry = CacheEntry(values, ui, estimate_nbytes(values))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self._bytes,
                "max_entries": self.max_entries, "max_bytes": self.max_bytes}


def estimate_nbytes(value: Any, _depth: int = 0) -> int:
    """A cheap estimate of the memory a value holds. Arrays and tensors report ``nbytes``; other objects may define
    ``__nodegraph_nbytes__()`` (e.g. a handle to model weights); containers are summed."""
    sizer = getattr(value, "__nodegraph_nbytes__", None)
    if sizer is not None and not isinstance(value, type):
        return int(sizer())
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if _depth < 4 and isinstance(value, (tuple, list, set, frozenset)):
        return sys.getsizeof(value) + sum(estimate_nbytes(v, _depth + 1) for v in value)
    if _depth < 4 and isinstance(value, dict):
        return sys.getsizeof(value) + sum(estimate_nbytes(v, _depth + 1) for v in value.values())
    return sys.getsizeof(value)


def static_key(type_name: str, version: int, literals: dict[str, Any]) -> str:
    """The part of a node's key known once the workflow is validated: type, version and plain literal inputs."""
    # repr of JSON-like values is deterministic once dict items are sorted, and much cheaper than json.dumps.
    return repr((type_name, version, _canonical(literals)))


def node_key(static: str, dynamic: Any, upstream: list[tuple[str, str, str]], extra: Any = None) -> str:
    """The content hash of a node's result: its static part, the identities of inputs naming files, the keys of
    the upstream results it reads as (input name, upstream key, output name), and anything the run adds."""
    text = f"{static}|{dynamic!r}|{upstream!r}|{extra!r}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _canonical(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(repr(v) for v in value))
    if isinstance(value, Path):
        return str(value)
    return value


def file_identity(path: str | os.PathLike) -> Hashable:
    """What identifies a file's content cheaply: path, size and modification time (for a folder, of every file
    in it). Replacing a file under the same name changes it."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    if not path.is_dir():
        return (str(path), st.st_size, st.st_mtime_ns)
    parts = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                fst = os.stat(full)
            except OSError:
                continue
            parts.append((os.path.relpath(full, path), fst.st_size, fst.st_mtime_ns))
    return (str(path), tuple(parts))
