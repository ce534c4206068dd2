"""Run history in SQLite (the standard library's sqlite3): it survives a restart, is bounded and paginated.

Each finished prompt is stored as one JSON document in ComfyUI's history shape (prompt, outputs, status). The
oldest entries are dropped past ``max_items``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path


class History:
    def __init__(self, path: str | Path, max_items: int = 10_000):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items
        self._lock = threading.Lock()  # written by the worker thread, read by the event loop
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS history (prompt_id TEXT PRIMARY KEY, number INTEGER, "
                         "created REAL, document TEXT NOT NULL)")

    def add(self, prompt_id: str, number: int, document: dict) -> None:
        text = json.dumps(document, default=repr)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?)",
                             (prompt_id, number, time.time(), text))
            self._db.execute("DELETE FROM history WHERE rowid NOT IN "
                             "(SELECT rowid FROM history ORDER BY created DESC, rowid DESC LIMIT ?)", (self.max_items,))

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
