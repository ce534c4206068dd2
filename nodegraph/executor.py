"""The executor: runs a validated plan node by node, reusing cached results and isolating failures.

For each planned node, in order: if an input's source failed, was skipped or was cancelled, the node is skipped;
otherwise its key is computed from its literals and its inputs' keys, and a cached result is reused or the node runs.
A failing node is recorded with its traceback and only its dependants are skipped: independent branches still run,
so their outputs are saved. A node that runs out of memory (``MemoryError``, torch's ``OutOfMemoryError``) ends the
run instead: the nodes after it are skipped, and the results this run put in the cache are released, so that the next
prompt starts with the memory given back. Cancellation is checked between nodes and, through the context, inside long
nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections import OrderedDict
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import events as ev
from . import heap
from .cache import ResultCache, node_key
from .events import Event, EventBus
from .node import normalise_outputs
from .registry import Registry
from .settings import Settings
from .spec import Combo, Socket
from .validate import Plan, compile_workflow
from .workflow import Link, Workflow

RAN, CACHED, FAILED, SKIPPED, CANCELLED = "ran", "cached", "failed", "skipped", "cancelled"
OUT_OF_MEMORY_HINT = ("Try a smaller image size or batch, keep fewer results cached (--cache-gb), or unload models "
                      "(POST /free) and run it again.")


class Cancelled(Exception):
    """Raised inside a node (by ``ctx.check_cancelled`` or ``ctx.progress``) when its run was cancelled."""


class RunContext:
    """What a node's ``run`` receives as ``ctx``: progress, cancellation, where to write, a logger, and the
    process's ``Settings`` (folders, device, precision; ``ctx.settings.previews`` when a client shows previews)."""

    def __init__(self, run: "_RunState", node_id: str, node_type: str):
        self._run = run
        self.run_id = run.run_id
        self.node_id = node_id
        self.node_type = node_type
        self.output_dir: Path = run.output_dir
        self.settings: Settings = run.settings
        self.log = logging.LoggerAdapter(logging.getLogger(f"nodegraph.node.{node_type}"),
                                         {"run_id": run.run_id, "node_id": node_id})

    @property
    def workflow(self) -> dict | None:
        """The workflow being run, as its JSON document (for output nodes that embed it in their files)."""
        return self._run.workflow_json()

    @property
    def cancelled(self) -> bool:
        return self._run.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self._run.cancel_event.is_set():
            raise Cancelled()

    def progress(self, value: float, max: float | None = None, preview: Any = None) -> None:
        """Report progress (``value`` of ``max``), optionally with a preview; also a cancellation point."""
        self.check_cancelled()
        data = {"value": value, "max": max}
        if preview is not None:
            data["preview"] = preview
        self._run.publish(ev.NODE_PROGRESS, self.node_id, data)


@dataclass
class NodeRecord:
    """What happened to one node in a run."""

    status: str
    type: str
    duration: float = 0.0
    error: dict | None = None

    def to_json(self) -> dict:
        out = {"status": self.status, "type": self.type, "duration": self.duration}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class RunResult:
    """The outcome of a run: each planned node's record, and the outputs and UI results of those that finished."""

    run_id: str
    status: str  # "success", "failed" or "cancelled"
    nodes: dict[str, NodeRecord]
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    ui: dict[str, dict] = field(default_factory=dict)
    duration: float = 0.0
    keys: dict[str, str] = field(default_factory=dict)  # node id -> its result's cache key (nodes that got one)

    def output(self, node_id: str | int, name: str | None = None) -> Any:
        """The value of output ``name`` of node ``node_id`` (the only output when ``name`` is omitted)."""
        outs = self.values.get(str(node_id))
        if outs is None:
            record = self.nodes.get(str(node_id))
            why = f"it {record.status}" if record else "it was not part of this run"
            raise KeyError(f"node {node_id} has no outputs: {why}")
        if name is None:
            if len(outs) != 1:
                raise KeyError(f"node {node_id} has outputs {', '.join(outs)}: name one")
            return next(iter(outs.values()))
        return outs[name]

    def count(self, status: str) -> int:
        return sum(1 for r in self.nodes.values() if r.status == status)

    @property
    def errors(self) -> list[dict]:
        return [dict(node_id=nid, **r.error) for nid, r in self.nodes.items() if r.error is not None]

    def summary(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in (RAN, CACHED, FAILED, SKIPPED, CANCELLED) if self.count(s)]
        return f"{self.status}: {', '.join(parts) or 'nothing to do'} in {self.duration:.2f}s"


@dataclass
class _RunState:
    run_id: str
    output_dir: Path
    settings: Settings
    bus: EventBus
    workflow: Workflow | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    out_of_memory: str | None = None  # the node that ran out of memory: the run stops there
    cached: list[str] = field(default_factory=list)  # the keys this run put in the cache
    _workflow_json: dict | None = None

    def workflow_json(self) -> dict | None:
        if self._workflow_json is None and self.workflow is not None:
            self._workflow_json = self.workflow.to_json()
        return self._workflow_json

    def publish(self, kind: str, node_id: str | None = None, data: dict | None = None) -> None:
        if self.bus.active:
            self.bus.publish(Event(kind, self.run_id, node_id, data or {}))


class Executor:
    """Validates and runs workflows against a registry, sharing one result cache across runs.

    One executor runs one workflow at a time (the server queues prompts); ``cancel`` may be called from any thread.
    ``settings`` (default: from the environment) reach every node as ``ctx.settings``; output nodes write to
    ``output_dir`` when given, else to the settings' output folder.
    """

    def __init__(self, registry: Registry, cache: ResultCache | None = None, events: EventBus | None = None,
                 output_dir: str | Path | None = None, settings: Settings | None = None):
        self.registry = registry
        self.cache = cache if cache is not None else ResultCache()
        self.events = events if events is not None else EventBus()
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        settings = settings if settings is not None else Settings.from_env()
        self.settings = settings.replace(output_dir=output_dir)
        self._active: dict[str, _RunState] = {}
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        # The settings that change what a node computes are part of every cache key: results computed on another
        # device or in another precision are never reused.
        self._settings = settings
        self._settings_key = repr(settings.fingerprint())
        self._plans = OrderedDict()  # choices and file identities were checked under the old settings

    @property
    def output_dir(self) -> Path:
        return self._settings.output_dir

    def compile(self, workflow: Workflow, outputs: Iterable[str] | None = None) -> Plan:
        """Validate; raises ``ValidationFailed`` listing every error.

        Plans are remembered by the workflow's content, so re-running an unchanged graph skips validation; only
        choices computed at run time (files in a folder) are checked again."""
        targets = list(outputs) if outputs is not None else None
        fingerprint = _fingerprint(workflow, targets)
        known = self._plans.get(fingerprint)
        if known is not None and _choices_still_valid(known, self.settings):
            self._plans.move_to_end(fingerprint)
            return dataclasses.replace(known, workflow=workflow)
        plan = compile_workflow(workflow, self.registry, targets, self.settings)
        self._plans[fingerprint] = plan
        while len(self._plans) > 64:
            self._plans.popitem(last=False)
        return plan

    def cancel(self, run_id: str) -> bool:
        """Ask the run ``run_id`` to stop; False if no such run is active."""
        with self._lock:
            state = self._active.get(run_id)
        if state is None:
            return False
        state.cancel_event.set()
        return True

    def run(self, workflow: Workflow | Plan, outputs: Iterable[str] | None = None, *, run_id: str | None = None,
            output_dir: str | Path | None = None) -> RunResult:
        """Validate (unless given a plan) and run. Raises ``ValidationFailed`` before running anything if the
        workflow is invalid; node failures are reported in the result, never raised."""
        plan = workflow if isinstance(workflow, Plan) else self.compile(workflow, outputs)
        settings = self.settings.replace(output_dir=output_dir)
        state = _RunState(run_id or uuid.uuid4().hex, settings.output_dir, settings, self.events,
                          plan.workflow)
        with self._lock:
            if state.run_id in self._active:
                raise ValueError(f"a run with id {state.run_id!r} is already active")
            self._active[state.run_id] = state
        try:
            return self._execute(plan, state)
        finally:
            with self._lock:
                self._active.pop(state.run_id, None)

    def _execute(self, plan: Plan, state: _RunState) -> RunResult:
        started = time.perf_counter()
        records: dict[str, NodeRecord] = {}
        keys: dict[str, str] = {}
        values: dict[str, dict[str, Any]] = {}
        ui: dict[str, dict] = {}
        state.publish(ev.RUN_STARTED, data={"nodes": [n.id for n in plan.order]})
        memo_key = (self._settings_key, str(state.output_dir))
        memo = plan.key_memo.get(memo_key) if plan.fixed_keys else None
        for node in plan.order:
            name = node.type.name
            blocked = next((l.node for l in node.links.values() if records[l.node].status not in (RAN, CACHED)), None)
            if state.cancel_event.is_set():
                records[node.id] = NodeRecord(CANCELLED, name)
                continue
            blocked = blocked or state.out_of_memory
            if blocked is not None:
                records[node.id] = NodeRecord(SKIPPED, name)
                state.publish(ev.NODE_SKIPPED, node.id, {"because_of": blocked})
                continue
            key = memo[node.id] if memo is not None else self._key(node, keys, state)
            keys[node.id] = key
            hit = self.cache.get(key)
            if hit is not None:
                values[node.id] = _named(node.type, hit.values)
                if hit.ui:
                    ui[node.id] = hit.ui
                records[node.id] = NodeRecord(CACHED, name)
                state.publish(ev.NODE_CACHED, node.id, {"ui": hit.ui} if hit.ui else {})
                continue
            records[node.id] = self._run_node(node, key, values, ui, state)

        if plan.fixed_keys and len(keys) == len(plan.order):
            plan.key_memo[memo_key] = keys
        if state.out_of_memory is not None:
            self.cache.discard(state.cached)  # what this out-of-memory run cached
        if state.cancel_event.is_set():
            status = "cancelled"
        elif any(r.status == FAILED for r in records.values()):
            status = "failed"
        else:
            status = "success"
        result = RunResult(state.run_id, status, records, values, ui, time.perf_counter() - started, keys)
        state.publish(ev.RUN_FINISHED, data={"status": status, "duration": result.duration,
                                             "counts": {s: result.count(s) for s in
                                                        (RAN, CACHED, FAILED, SKIPPED, CANCELLED)}})
        return result

    def _key(self, node, keys: dict[str, str], state: _RunState) -> str:
        node_type = node.type
        if not node_type.cacheable:
            return uuid.uuid4().hex  # unique, so this node and everything downstream reruns
        inputs = node_type.inputs
        dynamic = [inputs[name].identity(node.literals[name], state.settings) for name in node.dynamic]
        upstream = [(name, keys[source], output) for name, source, output in node.link_order]
        # An output node writes into the run's output folder: a different folder is a different result.
        extra = self._settings_key + (str(state.output_dir) if node_type.output_node else "")
        return node_key(node.static_key, dynamic, upstream, extra)

    def _run_node(self, node, key: str, values: dict[str, dict[str, Any]], ui: dict[str, dict], state: _RunState) -> NodeRecord:
        node_type = node.type
        state.publish(ev.NODE_STARTED, node.id, {"type": node_type.name})
        started = time.perf_counter()
        try:
            kwargs = dict(node.literals)
            for name, link in node.links.items():
                kwargs[name] = values[link.node][link.output]
                _check_linked_value(node_type, name, kwargs[name], link, state.settings)
            returned = node_type().run(RunContext(state, node.id, node_type.name), **kwargs)
            out, node_ui = normalise_outputs(node_type, returned)
        except Cancelled:
            state.cancel_event.set()
            return NodeRecord(CANCELLED, node_type.name, time.perf_counter() - started)
        except BaseException as exc:
            # A node's sys.exit() or KeyboardInterrupt would end the server's worker thread: there it is the node's
            # failure. On the main thread (the command line) it may be the user's Ctrl-C, which must stop the run.
            if not isinstance(exc, Exception) and threading.current_thread() is threading.main_thread():
                raise
            duration = time.perf_counter() - started
            message = str(exc)
            if not isinstance(exc, Exception):
                message = (f"{node_type.name} (node {node.id}) raised {type(exc).__name__}({message}) to stop the "
                           f"process")
            elif _is_out_of_memory(exc):
                state.out_of_memory = node.id
                first = message.strip().splitlines()[0].rstrip(".") if message.strip() else type(exc).__name__
                message = f"{node_type.name} (node {node.id}) ran out of memory: {first}. {OUT_OF_MEMORY_HINT}"
            error = {"type": node_type.name, "exception_type": type(exc).__name__, "message": message,
                     "traceback": traceback.format_exc()}
            heap.after_node(duration)
            state.publish(ev.NODE_FAILED, node.id, error)
            return NodeRecord(FAILED, node_type.name, duration, error)
        duration = time.perf_counter() - started
        values[node.id] = _named(node_type, out)
        if node_ui:
            ui[node.id] = node_ui
        self.cache.put(key, out, node_ui)
        state.cached.append(key)
        heap.after_node(duration)  # before the next node allocates on top of this one's freed intermediates
        state.publish(ev.NODE_FINISHED, node.id, {"duration": duration, **({"ui": node_ui} if node_ui else {})})
        return NodeRecord(RAN, node_type.name, duration)


def _fingerprint(workflow: Workflow, outputs: list[str] | None) -> str:
    """A hash of everything validation reads from a workflow (not its layout)."""
    doc = [outputs, workflow.outputs,
           [(nid, e.type, e.version, [(k, ("link", v.node, v.output) if isinstance(v, Link) else v)
                                      for k, v in e.inputs.items()]) for nid, e in workflow.nodes.items()]]
    text = json.dumps(doc, separators=(",", ":"), default=repr)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _choices_still_valid(plan: Plan, settings: Settings) -> bool:
    for node in plan.order:
        for name, value in node.literals.items():
            spec = node.type.inputs[name]
            computed = spec.dynamic_identity or (isinstance(spec, Combo) and spec.computed)
            if computed and spec.check(value, settings):
                return False
    return True


def _is_out_of_memory(exc: BaseException | None) -> bool:
    """``MemoryError``, or torch's ``OutOfMemoryError`` (CUDA, MPS; by name: the engine does not import torch), raised
    or wrapped: loaders turn any library error into their own ("cannot load the UNet: ..."), naming the file."""
    for _ in range(8):  # the chain of causes, not endlessly
        if exc is None:
            return False
        if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _named(node_type, out: tuple) -> dict[str, Any]:
    return {o.name: v for o, v in zip(node_type.outputs, out)}


def _check_linked_value(node_type, name: str, value: Any, link, settings: Settings) -> None:
    """Widgets fed by links get their bounds checked at run time, since no literal was there to validate."""
    spec = node_type.inputs[name]
    if isinstance(spec, Socket):
        return
    problems = spec.check(value, settings)
    if problems:
        raise ValueError(f"input {name!r} received {value!r} from node {link.node} ({link.output}): "
                         f"{problems[0].message}")
