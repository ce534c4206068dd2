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
    nbytes: int  # the memory its values hold, each storage once (storages shared with other entries included)
    storages: tuple = ()  # the keys of the storages it holds, each once (the key objects are shared: see _hold)
    models: bool = False  # it holds model weights (a value marked ``__nodegraph_model__``)


class ResultCache:
    """An LRU map from node keys to results, bounded by a count of entries and by the memory they hold.

    The memory is counted per storage, not per value: values report the tensor storages they hold
    (``__nodegraph_storages__``, see :func:`storages_of`), and a storage reached from several entries (a checkpoint's
    UNet under its LoadCheckpoint and under every LoRA or FreeU handle built on it, a text encoder held by the
    conditioning it encoded) is counted once, while any entry holds it. Over the budget, least recently used entries
    go first until the total fits; an entry whose weights others still hold frees nothing, so eviction goes on.

    Evicting mid-run never breaks the run: the executor keeps its own references to the values a run computed or
    read, so an evicted entry's memory is released when the run that uses it ends.
    """

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 8 * 1024**3):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._refs: dict[Hashable, list] = {}  # storage key -> [entries holding it, its bytes, the key itself]
        self._bytes = 0
        self.evictions = 0
        self._lock = threading.Lock()  # the server reads statistics from another thread

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, values: tuple, ui: dict) -> None:
        # walking a model's tensors takes a moment: done outside the lock
        storages = _unique(storages_of(values))
        nbytes = sum(n for _, n in storages)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._release(old)
            if nbytes > self.max_bytes:
                return  # it cannot fit however much goes: keep what is there (a budget of 0 caches nothing)
            self._entries[key] = CacheEntry(values, ui, nbytes, self._hold(storages), any(map(is_model, values)))
            while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
                _, evicted = self._entries.popitem(last=False)
                self._release(evicted)
                self.evictions += 1

    def _hold(self, storages: tuple[tuple[Hashable, int], ...]) -> tuple:
        """Count the entry's storages in; returns their keys. An entry holds the key objects already known rather
        than its own copies: a conditioning holds its text encoder's hundreds of tensors, and its bookkeeping
        would otherwise outweigh its embeddings (and grow outside the budget)."""
        keys = []
        for skey, nbytes in storages:
            ref = self._refs.get(skey)
            if ref is None:
                ref = self._refs[skey] = [0, nbytes, skey]
                self._bytes += nbytes
            ref[0] += 1
            keys.append(ref[2])
        return tuple(keys)

    def _release(self, entry: CacheEntry) -> None:
        for skey in entry.storages:
            ref = self._refs[skey]
            ref[0] -= 1
            if ref[0] == 0:
                del self._refs[skey]
                self._bytes -= ref[1]

    def discard(self, keys) -> None:
        """Drop the entries of ``keys`` (those present), releasing what they hold."""
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    self._release(entry)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._refs.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        """The memory the entries hold, each storage counted once."""
        return self._bytes

    def stats(self) -> dict:
        """For ``/system_stats``: ``bytes`` is the memory held (each storage once; ``shared_bytes`` is what
        counting per entry would have added); ``model_entries`` / ``model_bytes`` are the entries holding model
        weights and the memory they hold together."""
        with self._lock:
            entries = list(self._entries.values())
            total, storages = self._bytes, len(self._refs)
            model_storages = {skey for e in entries if e.models for skey in e.storages}
            model_bytes = sum(self._refs[skey][1] for skey in model_storages)
        return {"entries": len(entries), "bytes": total, "max_entries": self.max_entries,
                "max_bytes": self.max_bytes, "model_entries": sum(e.models for e in entries),
                "model_bytes": model_bytes, "storages": storages,
                "shared_bytes": sum(e.nbytes for e in entries) - total, "evictions": self.evictions}


def is_model(value: Any) -> bool:
    """Whether a value holds model weights (its class sets ``__nodegraph_model__ = True``)."""
    return bool(getattr(type(value), "__nodegraph_model__", False))


def tensor_storage(tensor: Any) -> tuple[Hashable, int]:
    """The storage key and size of an array-like with ``untyped_storage()`` (a torch tensor, duck-typed: the engine
    does not import torch). Two views of one storage have one key; the key holds while the storage lives."""
    try:
        storage = tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):  # an opaque layout (oneDNN's blocked weights): its own memory
        return ("object", id(tensor)), int(tensor.nbytes)
    ptr = storage.data_ptr()
    if not ptr:  # no memory of its own (empty, or on the meta device)
        return ("object", id(tensor)), 0
    return ("storage", str(tensor.device), ptr), int(storage.nbytes())


def storages_of(value: Any, _depth: int = 0) -> list[tuple[Hashable, int]]:
    """(key, bytes) of the memory a value holds, for counting each storage once across cache entries.

    A value may define ``__nodegraph_storages__()`` returning such pairs (a model handle: its weights' storages,
    keyed with :func:`tensor_storage`); tensors are keyed by their storage; other objects count once each, under
    their identity, by ``__nodegraph_nbytes__()`` when they define it, else ``nbytes`` (arrays) or their own size;
    containers add their items. Keys of identity are valid while the cache holds the value, as it does."""
    method = getattr(value, "__nodegraph_storages__", None)
    if method is not None and not isinstance(value, type):
        return list(method())
    if callable(getattr(value, "untyped_storage", None)):
        return [tensor_storage(value)]
    own = ("object", id(value))
    sizer = getattr(value, "__nodegraph_nbytes__", None)
    if sizer is not None and not isinstance(value, type):
        return [(own, int(sizer()))]
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return [(own, nbytes)]
    out = [(own, sys.getsizeof(value))]
    if _depth < 4 and isinstance(value, (tuple, list, set, frozenset)):
        for item in value:
            out += storages_of(item, _depth + 1)
    elif _depth < 4 and isinstance(value, dict):
        for item in value.values():
            out += storages_of(item, _depth + 1)
    return out


def _unique(pairs: list[tuple[Hashable, int]]) -> tuple[tuple[Hashable, int], ...]:
    return tuple(dict(pairs).items())


def estimate_nbytes(value: Any) -> int:
    """The memory a value holds, each storage once (see :func:`storages_of`)."""
    return sum(n for _, n in _unique(storages_of(value)))


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
