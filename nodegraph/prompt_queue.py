"""The run queue: prompts waiting to run, those running, and the worker threads that run them in order.

The queue owns the order of runs, interrupting running prompts, the queue's status and the history entry of
every finished prompt. It knows two things only through interfaces, so that either can be swapped: the ``Runner``
that runs a plan (the local ``Executor``; a distributed worker that forwards a remote run's events can stand in)
and the ``RunProtocol`` that says what clients are told (``nodegraph.comfy_protocol``, ComfyUI's messages). What
the protocol says is handed to ``send`` (the websocket hub) from the worker thread, and kept in the history entry.

Rows and history entries have ComfyUI's shapes (``/queue``, ``/history``). Prompts wait in the order of their
``number`` (ComfyUI's priority: lower first; a prompt queued at the front gets one below all others), then of
arrival. A prompt imported from ComfyUI's format carries ``report``, which names its nodes by the ids its client
sent: every event, output and history entry of it is told under those ids.

Every accepted prompt is in the store (``History``'s queue table) before ``put`` returns, and leaves it only with its
history entry (one transaction), or when a client deletes it. ``restore`` reloads what a previous process left:
prompts waiting run in their order, each compiled again against the current node library (one that no longer
compiles gets a history entry with status ``error``); the prompt that was running gets one with status
``interrupted``, unless its client asked for ``extra_data.requeue_on_restart``, and then it runs again, first. A
prompt cancelled because the server is stopping is left in the store, as after a crash, for the next start to
settle.

How many prompts run at once is the runner's ``capacity()`` (the local executor has none: one at a time; a Dask
cluster's is its number of GPU workers, asked again while prompts wait, so that workers joining are used at once).
Prompts start in the queue's order, except that a client never has two prompts running at once (prompts without a
client id count as one client): each client's prompts run, and finish, in the order it queued them. A runner may
also ``choose`` among the first few waiting prompts (a cluster picks one whose models a free worker already holds);
a prompt passed over ``PATIENCE`` times goes next.

What clients hear of a run's end (``executing`` with ``node: null``, ``execution_success`` and the queue's
``status``) goes out only once the history entry holding the run's outputs is written and the prompt has left
``/queue``: several clients fetch ``/history/{prompt_id}`` or ``/queue`` the moment they hear it.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from . import events as ev
from .events import Event, EventBus
from .executor import RunResult
from .history import History, QueuedRow
from .validate import Plan
from .workflow import Workflow

log = logging.getLogger("nodegraph.queue")

Message = tuple[str, Any]  # (type, data): what a protocol makes of an event
Send = Callable[[str, Any, "str | None"], None]  # type, data, the client it is for (None: every client); any thread
STATUS = {"success": "success", "failed": "error", "cancelled": "interrupted"}  # run status -> history status_str
REQUEUE = "requeue_on_restart"  # the extra_data key: run the prompt again if the server dies while it runs
RESTARTED = "the server stopped while the prompt ran; it was not run again (queue it with extra_data." \
            f"{REQUEUE}: true for that)"


class Runner(Protocol):
    """What the queue needs of whatever runs its prompts."""

    events: EventBus

    def run(self, plan: Plan, *, run_id: str) -> RunResult: ...

    def cancel(self, run_id: str) -> bool: ...

    # optional: ``capacity() -> int``, how many prompts it runs at once now (without it: one); and
    # ``choose(plans) -> int``, which of these waiting plans (in queue order) to start now (without it: the first)


class NodeNames(Protocol):
    """How a client names the nodes of its prompt (``nodegraph.comfy_protocol.ClientIds`` for ComfyUI's)."""

    def __call__(self, node_id: str) -> str | None: ...  # the client's id of our node; None: do not tell

    def class_type(self, node_id: str, ours: str | None) -> str | None: ...  # the client's type of its node


class Compile(Protocol):
    """How a stored prompt becomes a run again after a restart (the server's reading of ``/prompt``): its
    workflow, plan and client node names; raises when it no longer loads or validates (the message says why)."""

    def __call__(self, document: Any, targets: list[str] | None, extra: dict
                 ) -> tuple[Workflow, Plan, NodeNames | None]: ...


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
    targets: list[str] | None = None  # the output nodes the client asked for (None: all), to compile it again
    resumed: bool = False  # it was running when the server stopped and runs again before anything else
    passed: int = 0  # prompts queued after it that started first (a runner's choice), bounded by PATIENCE

    def as_row(self) -> list:
        return [self.number, self.prompt_id, self.document, {**self.extra, "client_id": self.client_id},
                self.outputs]

    @property
    def order(self) -> tuple:
        return (not self.resumed, self.number, self.seq)

    def record(self) -> dict:
        """What the store keeps of it: enough to compile it again, or to write its history entry without that."""
        return {"prompt": self.document, "client_id": self.client_id, "extra": self.extra, "targets": self.targets,
                "outputs": self.outputs}


class PromptQueue:
    """Prompts waiting to run, those running, and the worker threads that run them in order."""

    POLL = 1.0  # seconds between asking a runner with a capacity how many prompts it can run, while prompts wait
    WINDOW = 8  # how many waiting prompts a runner that chooses (model affinity) may choose from
    PATIENCE = 4  # how many later prompts may start before a waiting one; then it goes next, whatever is chosen

    def __init__(self, runner: Runner, history: History, send: Send, protocol: RunProtocol):
        self.runner = runner
        self.history = history
        self.send = send
        self.protocol = protocol
        self._pending: list[QueueItem] = []
        self.running: dict[str, QueueItem] = {}  # prompt id -> item, in the order they started
        self._cond = threading.Condition()
        self._counter = 0
        self._stop = False
        self._slots = 1
        self._threads: list[threading.Thread] = []  # long-lived: a thread keeps its OpenMP pool between runs

    def start(self) -> None:
        self._refresh_slots()
        if hasattr(self.runner, "capacity"):
            self._threads.append(threading.Thread(target=self._poll, name="nodegraph-capacity", daemon=True))
            self._threads[-1].start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            running = list(self.running)
        for prompt_id in running:
            self.runner.cancel(prompt_id)
        deadline = time.monotonic() + 10
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    @property
    def remaining(self) -> int:
        with self._cond:
            return len(self._pending) + len(self.running)

    def put(self, workflow: Workflow, document: dict, plan: Plan, client_id: str | None, extra: dict,
            front: bool = False, *, number: float | None = None, prompt_id: str | None = None,
            report: NodeNames | None = None, targets: list[str] | None = None) -> QueueItem:
        """Queue a compiled prompt; it is in the store when this returns. ``number`` places it (default: after
        everything queued, or before everything with ``front``); ``prompt_id`` is the client's choice of id
        (ValueError when that id is waiting or running); ``report`` names its nodes for the client; ``targets`` are
        the output nodes the client asked for, kept to compile it again after a restart."""
        with self._cond:
            if prompt_id is not None and any(i.prompt_id == prompt_id for i in self._items()):
                raise ValueError(f"a prompt with id {prompt_id!r} is already queued")
            self._counter += 1
            if number is None:
                number = -self._counter if front else self._counter
            outputs = [report(o) or o for o in plan.targets] if report else plan.targets
            item = QueueItem(number, prompt_id or str(uuid.uuid4()), workflow, document, client_id, extra, outputs,
                             plan, report, self._counter, targets)
            try:
                self.history.enqueue(item.prompt_id, item.number, item.seq, item.record())
            except sqlite3.IntegrityError:  # a row left by an earlier process, not reloaded (restore not run)
                raise ValueError(f"a prompt with id {item.prompt_id!r} is already queued") from None
            self._add(item)
        self._status()
        return item

    def _add(self, item: QueueItem) -> None:
        self._pending.append(item)
        self._pending.sort(key=lambda i: i.order)
        self._cond.notify_all()

    def restore(self, compile: Compile) -> list[str]:
        """Take up what the store holds from an earlier process (call it before ``start``): the prompt that was
        running is settled as interrupted, or queued first when its client asked for that; the others are compiled
        again and queued in their order, or settled with an error when they no longer compile. Returns the ids of
        the prompts queued again."""
        queued = []
        for row in self.history.queued():
            extra = row.record.get("extra") or {}
            if row.running and extra.get(REQUEUE) is not True:
                self._settle(row, "interrupted", self._interrupted(row.prompt_id))
                continue
            try:
                workflow, plan, report = compile(row.record["prompt"], row.record.get("targets"), extra)
            except Exception as exc:  # whatever it is, the queue goes on without it
                log.warning("queued prompt %s no longer runs: %s", row.prompt_id, exc)
                problem = RuntimeError(f"the prompt was queued before the server restarted and no longer "
                                       f"validates against its nodes: {exc}")
                self._settle(row, "error", [list(self.protocol.crashed(row.prompt_id, problem))])
                continue
            with self._cond:
                self._counter = max(self._counter, row.seq, abs(int(row.number)))
                self._add(QueueItem(row.number, row.prompt_id, workflow, row.record["prompt"],
                                    row.record.get("client_id"), extra, row.record.get("outputs") or plan.targets,
                                    plan, report, row.seq, row.record.get("targets"), resumed=row.running))
            queued.append(row.prompt_id)
        return queued

    def _interrupted(self, prompt_id: str) -> list[list]:
        """The history messages of a run the restart cut short: its end as the protocol tells an interrupted run's,
        each naming the restart as the reason."""
        end = Event(ev.RUN_FINISHED, prompt_id, None, {"status": "cancelled"})
        return [[kind, {**data, "reason": RESTARTED} if isinstance(data, dict) else data]
                for kind, data in self.protocol.translate(end, prompt_id) if self.protocol.recorded((kind, data))]

    def _settle(self, row: QueuedRow, status: str, messages: list[list]) -> None:
        """The history entry of a stored prompt that will not run (which takes it out of the store)."""
        record = row.record
        prompt = [row.number, row.prompt_id, record.get("prompt"),
                  {**(record.get("extra") or {}), "client_id": record.get("client_id")}, record.get("outputs") or []]
        self.history.add(row.prompt_id, row.number, {
            "prompt": prompt, "outputs": {},
            "status": {"status_str": status, "completed": False, "messages": messages},
            "meta": {"settled": time.time()}})

    def _items(self) -> list[QueueItem]:
        return self._pending + list(self.running.values())

    def snapshot(self) -> dict:
        with self._cond:
            return {"queue_running": [i.as_row() for i in self.running.values()],
                    "queue_pending": [i.as_row() for i in self._pending]}

    def delete(self, prompt_ids: list[str]) -> int:
        wanted = set(prompt_ids)
        with self._cond:
            removed = [i.prompt_id for i in self._pending if i.prompt_id in wanted]
            self._pending = [i for i in self._pending if i.prompt_id not in wanted]
            self.history.dequeue(removed)
        if removed:
            self._status()
        return len(removed)

    def clear(self) -> None:
        with self._cond:
            self.history.dequeue([i.prompt_id for i in self._pending])
            self._pending.clear()
        self._status()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Cancel the running prompt ``prompt_id``, or every running prompt when None; False when none was."""
        with self._cond:
            running = [i for i in self.running if prompt_id is None or i == prompt_id]
        return any([self.runner.cancel(i) for i in running])

    def _status(self) -> None:
        self.send(*self.protocol.status(self.remaining), None)

    def _refresh_slots(self) -> None:
        """Ask the runner how many prompts it can run at once, and have a worker thread for each."""
        capacity = getattr(self.runner, "capacity", None)
        slots = 1
        if capacity is not None:
            try:
                slots = max(1, int(capacity()))
            except Exception:  # a cluster that does not answer: keep what it had
                log.warning("could not ask the runner for its capacity", exc_info=True)
                slots = self._slots
        with self._cond:
            self._slots = slots
            while sum(t.name.startswith("nodegraph-worker") for t in self._threads) < slots and not self._stop:
                thread = threading.Thread(target=self._work, name=f"nodegraph-worker-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify_all()

    def _next(self) -> QueueItem | None:
        """The prompt to start now, if a slot is free (call holding ``_cond``): the first waiting prompt whose
        client has none running; or, with a runner that has ``choose(plans) -> index``, the one it picks among the
        first ``WINDOW`` such prompts (one per client: each client's prompts still start in its order), unless
        the first has already seen ``PATIENCE`` later prompts start before it."""
        if len(self.running) >= self._slots:
            return None
        taken = {i.client_id for i in self.running.values()}
        eligible = []
        for item in self._pending:
            if item.client_id not in taken:
                taken.add(item.client_id)
                eligible.append(item)
                if len(eligible) == self.WINDOW:
                    break
        if not eligible:
            return None
        pick = eligible[0]
        choose = getattr(self.runner, "choose", None)
        if choose is not None and len(eligible) > 1 and pick.passed < self.PATIENCE and not pick.resumed:
            try:
                index = choose([i.plan for i in eligible])
            except Exception:  # a cluster that does not answer: queue order
                log.warning("the runner could not choose the next prompt", exc_info=True)
                index = 0
            pick = eligible[index] if isinstance(index, int) and 0 <= index < len(eligible) else pick
        for item in eligible:
            if item is pick:
                break
            item.passed += 1
        return pick

    def _poll(self) -> None:
        """While prompts wait, ask a runner with a capacity for it again (workers join and leave)."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._pending)
                if self._stop:
                    return
            self._refresh_slots()
            with self._cond:
                self._cond.wait(self.POLL)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (item := self._next()) is None:
                    self._cond.wait()
                if self._stop:
                    return
                self._pending.remove(item)
                self.running[item.prompt_id] = item
                self.history.mark_running(item.prompt_id)
            try:
                self._run(item)
            except BaseException:  # the queue must keep going whatever one prompt does (even sys.exit())
                log.exception("prompt %s crashed the worker", item.prompt_id)
            finally:
                with self._cond:
                    self.running.pop(item.prompt_id, None)
                    self._cond.notify_all()  # a slot is free, and the client's next prompt may start
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
        except BaseException as exc:  # SystemExit too: on this thread nothing else would write the history entry
            log.exception("prompt %s failed outside any node", item.prompt_id)
            status = "error"
            tell(self.protocol.crashed(item.prompt_id, exc))
            # the run never finished, so its end was not told: tell it as a run's end is told
            end = Event(ev.RUN_FINISHED, item.prompt_id, None, {"status": "failed"})
            for message in self.protocol.translate(end, item.prompt_id):
                tell(message, now=False)
        finally:
            unsubscribe()
        if status == "interrupted" and self._stop:
            return  # cut short by the server stopping: left in the store, and the next start settles it
        # Clients read /history/{prompt_id} as soon as they hear that the run ended: write it before telling them.
        try:
            self.history.add(item.prompt_id, item.number, {
                "prompt": item.as_row(), "outputs": outputs,
                "status": {"status_str": status, "completed": status == "success", "messages": messages},
                "meta": {"started": started, "finished": time.time()}})
        finally:
            with self._cond:
                self.running.pop(item.prompt_id, None)  # a client that hears the end and reads /queue finds it gone
                self._cond.notify_all()
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
