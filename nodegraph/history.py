"""The server's store in SQLite (the standard library's sqlite3): run history and the persistent prompt queue.

Each finished prompt is stored as one JSON document in ComfyUI's history shape (prompt, outputs, status). The
oldest entries are dropped past ``max_items``.

The ``queue`` table holds every accepted prompt until its history entry is written: the entry is written and the
row removed in one transaction, so a crash between the two can neither lose a prompt nor run it twice. A row is
``running`` from the moment the worker takes it; after a crash that is how the prompt that was running is found.
Commits are synchronous (``synchronous=FULL``): what ``/prompt`` answered for survives a power cut as well as a
``kill -9``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class QueuedRow:
    """A prompt in the stored queue: its place (``number``, then arrival ``seq``), whether the worker had taken it,
    and what was stored of it when it was accepted (``record``, JSON)."""

    prompt_id: str
    number: float
    seq: int
    running: bool
    record: dict


class History:
    """Finished prompts (ComfyUI's ``/history``) and the prompts accepted but not finished (the queue), in one file."""

    def __init__(self, path: str | Path, max_items: int = 10_000):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items
        self._lock = threading.Lock()  # written by the worker thread, read by the event loop
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS history (prompt_id TEXT PRIMARY KEY, number INTEGER, "
                         "created REAL, document TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS queue (prompt_id TEXT PRIMARY KEY, number REAL NOT NULL, "
                         "seq INTEGER NOT NULL, running INTEGER NOT NULL DEFAULT 0, created REAL, "
                         "record TEXT NOT NULL)")

    def add(self, prompt_id: str, number: float, document: dict) -> None:
        """Write a finished prompt's entry and drop it from the queue, in one transaction."""
        text = json.dumps(document, default=repr)
        with self._lock, self._transaction():
            self._db.execute("INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?)",
                             (prompt_id, number, time.time(), text))
            self._db.execute("DELETE FROM queue WHERE prompt_id = ?", (prompt_id,))
            self._db.execute("DELETE FROM history WHERE rowid NOT IN "
                             "(SELECT rowid FROM history ORDER BY created DESC, rowid DESC LIMIT ?)", (self.max_items,))

    # --- the queue ---------------------------------------------------------------------------------------------------

    def enqueue(self, prompt_id: str, number: float, seq: int, record: dict) -> None:
        """Store an accepted prompt (committed on return). sqlite3.IntegrityError when ``prompt_id`` is queued."""
        text = json.dumps(record, default=repr)
        with self._lock:
            self._db.execute("INSERT INTO queue VALUES (?, ?, ?, 0, ?, ?)", (prompt_id, number, seq, time.time(), text))

    def mark_running(self, prompt_id: str) -> None:
        """The worker has taken the prompt: after a crash it is the one that was running."""
        with self._lock:
            self._db.execute("UPDATE queue SET running = 1 WHERE prompt_id = ?", (prompt_id,))

    def dequeue(self, prompt_ids: list[str]) -> None:
        """Forget queued prompts without a history entry (the client deleted them before they ran)."""
        with self._lock, self._transaction():
            self._db.executemany("DELETE FROM queue WHERE prompt_id = ?", [(p,) for p in prompt_ids])

    def queued(self) -> list[QueuedRow]:
        """The stored queue, in its order: the prompt that was running first, then by number and arrival."""
        with self._lock:
            rows = self._db.execute("SELECT prompt_id, number, seq, running, record FROM queue "
                                    "ORDER BY running DESC, number, seq").fetchall()
        return [QueuedRow(pid, number, seq, bool(running), json.loads(record))
                for pid, number, seq, running, record in rows]

    def _transaction(self):
        return _Transaction(self._db)

    def get(self, prompt_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT document FROM history WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def page(self, limit: int, offset: int = 0) -> dict:
        """The newest ``limit`` entries after skipping ``offset``, oldest first (as ComfyUI lists them)."""
        with self._lock:
            rows = self._db.execute("SELECT prompt_id, document FROM history ORDER BY created DESC, rowid DESC "
                                    "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return {pid: json.loads(doc) for pid, doc in reversed(rows)}

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM history").fetchone()[0]

    def delete(self, prompt_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM history WHERE prompt_id = ?", [(p,) for p in prompt_ids])

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM history")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, exc, tb) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")
