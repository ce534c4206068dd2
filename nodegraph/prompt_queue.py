"""The run queue: prompts waiting to run, the one running, and the worker thread that runs them one at a time.

The queue owns the order of runs, interrupting the running prompt, the queue's status and the history entry of
every finished prompt. It knows two things only through interfaces, so that either can be swapped: the ``Runner``
that runs a plan (the local ``Executor``; a distributed worker that forwards a remote run's events can stand in)
and the ``RunProtocol`` that says what clients are told (``nodegraph.comfy_protocol``, ComfyUI's messages). What
the protocol says is handed to ``send`` (the websocket hub) from the worker thread, and kept in the history entry.

Rows and history entries have ComfyUI's shapes (``/queue``, ``/history``). Prompts wait in the order of their
``number`` (ComfyUI's priority: lower first; a prompt queued at the front gets one below all others), then of
arrival. A prompt imported from ComfyUI's format carries ``report``, which names its nodes by the ids its client
sent: every event, output and history entry of it is told under those ids.

What clients hear of a run's end (``executing`` with ``node: null``, ``execution_success`` and the queue's
``status``) goes out only once the history entry holding the run's outputs is written: several clients fetch
``/history/{prompt_id}`` the moment they hear it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from . import events as ev
from .events import Event, EventBus
from .executor import RunResult
from .history import History
from .validate import Plan
from .workflow import Workflow

log = logging.getLogger("nodegraph.queue")

Message = tuple[str, Any]  # (type, data): what a protocol makes of an event
Send = Callable[[str, Any, "str | None"], None]  # type, data, the client it is for (None: every client); any thread
STATUS = {"success": "success", "failed": "error", "cancelled": "interrupted"}  # run status -> history status_str


class Runner(Protocol):
    """What the queue needs of whatever runs its prompts."""

    events: EventBus

    def run(self, plan: Plan, *, run_id: str) -> RunResult: ...

    def cancel(self, run_id: str) -> bool: ...


class NodeNames(Protocol):
    """How a client names the nodes of its prompt (``nodegraph.comfy_protocol.ClientIds`` for ComfyUI's)."""

    def __call__(self, node_id: str) -> str | None: ...  # the client's id of our node; None: do not tell

    def class_type(self, node_id: str, ours: str | None) -> str | None: ...  # the client's type of its node


class RunProtocol(Protocol):
    """How a queue's runs are told to clients (a module such as ``nodegraph.comfy_protocol`` fits)."""

    def translate(self, event: Event, prompt_id: str) -> list[Message]: ...

    def crashed(self, prompt_id: str, exc: BaseException) -> Message: ...

    def status(self, remaining: int, sid: str | None = None) -> Message: ...

    def recorded(self, message: Message) -> bool: ...


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    workflow: Workflow
    document: dict
    client_id: str | None
    extra: dict
    outputs: list[str]
    plan: Any = None
    report: NodeNames | None = None  # our node ids -> the client's
    seq: int = 0  # arrival, for prompts of the same number

    def as_row(self) -> list:
        return [self.number, self.prompt_id, self.document, {**self.extra, "client_id": self.client_id},
                self.outputs]


class PromptQueue:
    """Prompts waiting to run, the one running, and the worker thread that runs them in order."""

    def __init__(self, runner: Runner, history: History, send: Send, protocol: RunProtocol):
        self.runner = runner
        self.history = history
        self.send = send
        self.protocol = protocol
        self._pending: list[QueueItem] = []
        self.running: QueueItem | None = None
        self._cond = threading.Condition()
        self._counter = 0
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="nodegraph-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self.running is not None:
            self.runner.cancel(self.running.prompt_id)
        self._thread.join(timeout=10)

    @property
    def remaining(self) -> int:
        with self._cond:
            return len(self._pending) + (self.running is not None)

    def put(self, workflow: Workflow, document: dict, plan: Plan, client_id: str | None, extra: dict,
            front: bool = False, *, number: float | None = None, prompt_id: str | None = None,
            report: NodeNames | None = None) -> QueueItem:
        """Queue a compiled prompt. ``number`` places it (default: after everything queued, or before everything
        with ``front``); ``prompt_id`` is the client's choice of id (ValueError when that id is waiting or running);
        ``report`` names its nodes for the client."""
        with self._cond:
            if prompt_id is not None and any(i.prompt_id == prompt_id for i in self._items()):
                raise ValueError(f"a prompt with id {prompt_id!r} is already queued")
            self._counter += 1
            if number is None:
                number = -self._counter if front else self._counter
            outputs = [report(o) or o for o in plan.targets] if report else plan.targets
            item = QueueItem(number, prompt_id or str(uuid.uuid4()), workflow, document, client_id, extra, outputs,
                             plan, report, self._counter)
            self._pending.append(item)
            self._pending.sort(key=lambda i: (i.number, i.seq))
            self._cond.notify()
        self._status()
        return item

    def _items(self) -> list[QueueItem]:
        return self._pending + ([self.running] if self.running is not None else [])

    def snapshot(self) -> dict:
        with self._cond:
            return {"queue_running": [self.running.as_row()] if self.running else [],
                    "queue_pending": [i.as_row() for i in self._pending]}

    def delete(self, prompt_ids: list[str]) -> int:
        wanted = set(prompt_ids)
        with self._cond:
            before = len(self._pending)
            self._pending = [i for i in self._pending if i.prompt_id not in wanted]
            removed = before - len(self._pending)
        if removed:
            self._status()
        return removed

    def clear(self) -> None:
        with self._cond:
            self._pending.clear()
        self._status()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Cancel the running prompt (only if it is ``prompt_id``, when given); False when nothing was running."""
        running = self.running
        if running is None or (prompt_id is not None and prompt_id != running.prompt_id):
            return False
        return self.runner.cancel(running.prompt_id)

    def _status(self) -> None:
        self.send(*self.protocol.status(self.remaining), None)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                item = self.running = self._pending.pop(0)
            try:
                self._run(item)
            except Exception:  # the queue must keep going whatever one prompt does
                log.exception("prompt %s crashed the worker", item.prompt_id)
            finally:
                with self._cond:
                    self.running = None
                self._status()

    def _run(self, item: QueueItem) -> None:
        messages: list[list] = []  # what the history entry keeps of what was told
        last: list[Message] = []  # the end of the run, told once the history entry exists
        started = time.time()
        outputs: dict[str, dict] = {}

        def tell(message: Message, now: bool = True) -> None:
            if self.protocol.recorded(message):
                messages.append(list(message))
            if now:
                self.send(*message, item.client_id)
            else:
                last.append(message)

        def on_event(event: Event) -> None:
            if event.run_id == item.prompt_id:
                event = _reported(event, item.report)
                if event is None:
                    return
                for message in self.protocol.translate(event, item.prompt_id):
                    tell(message, now=event.type != ev.RUN_FINISHED)

        unsubscribe = self.runner.events.subscribe(on_event)
        try:
            result = self.runner.run(item.plan, run_id=item.prompt_id)
            status, outputs = STATUS[result.status], _reported_outputs(result.ui, item.report)
        except Exception as exc:
            log.exception("prompt %s failed outside any node", item.prompt_id)
            status = "error"
            tell(self.protocol.crashed(item.prompt_id, exc))
            # the run never finished, so its end was not told: tell it as a run's end is told
            end = Event(ev.RUN_FINISHED, item.prompt_id, None, {"status": "failed"})
            for message in self.protocol.translate(end, item.prompt_id):
                tell(message, now=False)
        finally:
            unsubscribe()
        # Clients read /history/{prompt_id} as soon as they hear that the run ended: write it before telling them.
        try:
            self.history.add(item.prompt_id, item.number, {
                "prompt": item.as_row(), "outputs": outputs,
                "status": {"status_str": status, "completed": status == "success", "messages": messages},
                "meta": {"started": started, "finished": time.time()}})
        finally:
            for message in last:
                self.send(*message, item.client_id)


def _reported(event: Event, report: NodeNames | None) -> Event | None:
    """``event`` under the client's node ids and types; None when it is about a node the client does not know."""
    if report is None or event.node_id is None:
        return event
    node = report(event.node_id)
    if node is None:
        return None
    data = event.data
    if "because_of" in data:
        data = {**data, "because_of": report(data["because_of"]) if data["because_of"] is not None else None}
    if "type" in data:
        data = {**data, "type": report.class_type(node, data["type"])}
    return dataclasses.replace(event, node_id=node, data=data)


def _reported_outputs(ui: dict[str, dict], report: NodeNames | None) -> dict[str, dict]:
    """A run's outputs by the client's node ids (lists of two nodes reported as one are joined)."""
    if report is None:
        return ui
    out: dict[str, dict] = {}
    for node_id, node_ui in ui.items():
        target = report(node_id)
        if target is None:
            continue
        merged = out.setdefault(target, {})
        for key, value in node_ui.items():
            if isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = merged[key] + value
            else:
                merged[key] = value
    return out
