"""Run events and their subscribers: the CLI progress bar, the server's websocket, tests.

Events are published synchronously on the thread that runs the workflow. A subscriber that needs another thread
(the server's event loop) hands the event over itself. A subscriber that raises is logged and otherwise ignored:
a broken listener must never break a run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("nodegraph.events")

RUN_STARTED = "run_started"
NODE_STARTED = "node_started"
NODE_PROGRESS = "node_progress"
NODE_CACHED = "node_cached"
NODE_FINISHED = "node_finished"
NODE_FAILED = "node_failed"
NODE_SKIPPED = "node_skipped"
RUN_FINISHED = "run_finished"


@dataclass(frozen=True)
class Event:
    type: str
    run_id: str
    node_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


class EventBus:
    """Fans events out to any number of subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        with self._lock:
            self._subscribers = [*self._subscribers, fn]

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [s for s in self._subscribers if s is not fn]

        return unsubscribe

    @property
    def active(self) -> bool:
        """Whether anyone listens (publishers skip building events nobody reads)."""
        return bool(self._subscribers)

    def publish(self, event: Event) -> None:
        for fn in self._subscribers:  # a snapshot: subscribing during a publish is safe
            try:
                fn(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", fn, event.type)
