"""Running prompts on a Dask cluster: worker processes that hold the engine, and a ``Runner`` that sends them work.

A worker (``nodegraph worker --scheduler ADDR``) is a ``distributed`` worker carrying the ``NodegraphWorker`` plugin:
its own settings (models folder, device), node library, result cache and ``Executor``. It offers one ``GPU``
resource, and every prompt asks for one, so a worker runs one prompt at a time and a prompt runs whole on one worker.

The server's queue calls ``DaskRunner`` as it calls the local executor. The runner ships the workflow's JSON and its
targets (never a pickled plan: the worker validates it again against its own registry and folders), and the worker
sends back, in order, every event of the run through a ``distributed.Queue`` named after the run; the runner
publishes them on its own ``EventBus``, so the queue and the websocket protocol see a remote run as a local one.
Files an output node writes go into a folder of the run's own on the worker; their bytes travel with the event that
names them and are written into the server's output (or temp) folder, under a free name when the name is taken (the
event and the result are told the name they got). Cancelling sets a ``distributed.Event`` the worker waits on; it
cancels the run through ``Executor.cancel``, which the nodes see at their next progress report (one step).

The queue runs as many prompts at once as the cluster has ``GPU`` resources (``DaskRunner.capacity``). Dispatch
prefers a free worker whose cache holds results of the prompt's model files (the values of folder choices, such as
the checkpoint and LoRA names; each worker reports what its cache still holds after every prompt), then any free
worker (Dask's choice, the least
busy), and only when every worker is busy the one with the models. When a worker frees up while prompts wait,
``choose`` lets the queue start one of the first few waiting prompts whose models it holds rather than the first
(``PromptQueue.WINDOW``, ``PATIENCE`` bound how far and how often). If a worker dies mid-prompt, Dask runs the task
again on another one.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import events as ev
from .events import Event, EventBus
from .executor import Executor, NodeRecord, RunResult
from .paths import safe_join
from .settings import Settings
from .validate import Plan

log = logging.getLogger("nodegraph.cluster")

GPU = "GPU"  # the Dask resource each worker offers once: one prompt at a time per worker
PLUGIN = "nodegraph"  # the plugin's name on the worker
END = "__end__"  # the last item of a run's event queue

try:  # the engine works without the cluster extra; only this module's users need it
    from distributed import WorkerPlugin as _PluginBase
except ImportError:  # pragma: no cover
    _PluginBase = object


# --- the worker side -------------------------------------------------------------------------------------------------

@dataclass
class WorkerState:
    """What a worker holds between prompts: its executor (registry, cache, settings) and what it last loaded."""

    executor: Executor
    held: dict[str, set[str]] = field(default_factory=dict)  # a model -> cache keys of results that read it

    @property
    def models(self) -> set[str]:
        """The models (``folder:name``) its cache still holds a result of: what a prompt for them would not load."""
        return set(self.held)

    def remember(self, plan: Plan, result: RunResult) -> None:
        """Note the models ``plan`` read and the keys of the results that read them; forget what the cache let go."""
        for node_id, models in models_by_node(plan).items():
            if node_id in result.keys:
                for model in models:
                    self.held.setdefault(model, set()).add(result.keys[node_id])
        cache = self.executor.cache
        self.held = {model: kept for model, keys in self.held.items() if (kept := {k for k in keys if k in cache})}


class NodegraphWorker(_PluginBase):
    """A Dask worker plugin that builds the worker's engine once: settings, node library, registry, result cache and
    an ``Executor``. It is picklable (settings and names only), so ``Client.register_plugin`` can install it on every
    worker, present and future; ``nodegraph worker`` passes it to the worker it starts."""

    name = PLUGIN

    def __init__(self, settings: Settings, *, library: str | None = None, node_paths: Sequence[str] = (),
                 cache_bytes: int | None = None, builtin: bool = True):
        self.settings = settings
        self.library = library
        self.node_paths = list(node_paths)
        self.cache_bytes = cache_bytes
        self.builtin = builtin

    def setup(self, worker) -> None:
        from .cache import ResultCache
        from .library import BUILTIN, NoLibrary, load_library
        from .registry import build_registry

        library = load_library(self.library or BUILTIN) if self.builtin else NoLibrary()
        library.configure(self.settings)
        registry = build_registry(self.node_paths, library)
        cache = ResultCache(max_bytes=self.cache_bytes) if self.cache_bytes is not None else ResultCache()
        worker.extensions[PLUGIN] = WorkerState(Executor(registry, cache=cache, settings=self.settings))

    def teardown(self, worker) -> None:
        worker.extensions.pop(PLUGIN, None)


def run_prompt(document: dict, targets: list[str] | None, run_id: str, *, previews: bool = False) -> dict:
    """The task a worker runs for one prompt: validate ``document`` against the worker's registry, run it, and send
    every event (with the bytes of the files output nodes wrote) to the queue named after the run. Returns the
    run's result as plain data."""
    from distributed import Event as DaskEvent, Queue, get_worker

    from .workflow import from_json

    worker = get_worker()
    state: WorkerState = worker.extensions[PLUGIN]
    executor = state.executor
    events = Queue(_queue_name(run_id))
    cancel = DaskEvent(_cancel_name(run_id))
    out_dir = Path(tempfile.mkdtemp(prefix="nodegraph-run-"))  # previews stay in the worker's temp folder
    done = threading.Event()

    def forward(event: Event) -> None:
        if event.run_id != run_id:
            return
        data = dict(event.data)
        files = _files_of(data.get("ui"), {"output": out_dir, "temp": Path(executor.settings.temp_dir)})
        # pickled here: the queue's own encoding (msgpack) would hand the server tuples for lists
        events.put(pickle.dumps({"type": event.type, "node_id": event.node_id, "data": data, "files": files}))

    def watch_cancel() -> None:
        # a long poll on the scheduler; the executor's cancel is seen by the nodes at their next progress report
        while not done.is_set():
            try:
                if cancel.wait(timeout=0.5):
                    executor.cancel(run_id)
                    return
            except Exception:  # the scheduler is gone: the run goes on, its end is what matters
                return

    watcher = threading.Thread(target=watch_cancel, name=f"nodegraph-cancel-{run_id}", daemon=True)
    unsubscribe = executor.events.subscribe(forward)
    settings = executor.settings
    try:
        if previews != settings.previews:
            executor.settings = settings = settings.replace(previews=previews)
        plan = executor.compile(from_json(document), targets)
        watcher.start()
        # the run's own folders, so that file names never collide between runs; the server names them for good
        result = executor.run(plan, run_id=run_id, output_dir=out_dir)
    finally:
        done.set()
        unsubscribe()
        shutil.rmtree(out_dir, ignore_errors=True)
    state.remember(plan, result)
    events.put(END)  # after every event: the server reads until here
    return {"status": result.status, "duration": result.duration, "ui": result.ui, "worker": worker.address,
            "nodes": {nid: r.to_json() for nid, r in result.nodes.items()}, "models": sorted(state.models)}


def worker_info(dask_worker) -> dict:
    """What ``/system_stats`` can show of a worker: its devices, the models its cache holds, the cache's size."""
    state: WorkerState | None = dask_worker.extensions.get(PLUGIN)
    if state is None:
        return {"ready": False}
    return {"ready": True, "device": state.executor.settings.device, "models": sorted(state.models),
            "cache": state.executor.cache.stats()}


def _files_of(ui: Any, roots: dict[str, Path]) -> list[dict]:
    """The files a node's UI results name in the run's folders, with their bytes."""
    files = []
    for items in (ui or {}).values():
        if not isinstance(items, list):
            continue
        for item in items:
            if not isinstance(item, dict) or item.get("type") not in roots or "filename" not in item:
                continue
            name = "/".join(p for p in (item.get("subfolder") or "", item["filename"]) if p)
            try:
                data = safe_join(roots[item["type"]], name).read_bytes()
            except (OSError, ValueError):
                continue  # not written by this run (a cached result's file): the server may already have it
            files.append({"type": item["type"], "name": name, "data": data})
    return files


# --- the server side -------------------------------------------------------------------------------------------------

class DaskRunner:
    """A ``Runner`` (``nodegraph.prompt_queue``) that runs each prompt on a worker of a Dask cluster.

    ``local`` is the server's executor: its settings say where files go and whether previews are wanted. Events of
    a remote run are published on ``events`` as the local executor publishes its own."""

    def __init__(self, client, local: Executor):
        self.client = client
        self.local = local
        self.events = EventBus()
        self.affinity: dict[str, set[str]] = {}  # worker address -> the models its cache held after its last prompt
        self.placed: dict[str, str] = {}  # run id -> the worker that ran it (tests and logs)
        self._active: dict[str, Any] = {}  # run id -> its future, None until submitted
        self._started: set[str] = set()  # runs a worker took up (their first event arrived)
        self._claimed: dict[str, str] = {}  # run id -> the worker it asked for (not free for the next prompt)
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, address: str, local: Executor, security=None) -> "DaskRunner":
        from distributed import Client

        return cls(Client(address, security=security, set_as_default=False), local)

    def run(self, plan: Plan, *, run_id: str) -> RunResult:
        from distributed import Queue

        if plan.workflow is None:
            raise ValueError("a remote run needs the plan's workflow document")
        wanted = models_of(plan)
        submit: dict[str, Any] = {}
        with self._lock:
            self._active[run_id] = None
        worker = self._preferred(wanted, run_id)
        if worker is not None:
            submit.update(workers=[worker], allow_other_workers=True)
        names: dict[tuple[str, str], str] = {}  # (type, worker's name) -> the name on the server
        events = Queue(_queue_name(run_id), client=self.client)
        try:
            future = self.client.submit(run_prompt, plan.workflow.to_json(), list(plan.targets), run_id,
                                        previews=self.local.settings.previews, key=f"nodegraph-{run_id}",
                                        pure=False, resources={GPU: 1}, **submit)
            with self._lock:
                self._active[run_id] = future
            # A task that fails (after Dask's own retries on another worker) never ends its events: end them for it.
            # (A blocking get rather than polling with a timeout, which the scheduler logs as an error each time.)
            future.add_done_callback(lambda f: f.status == "finished" or threading.Thread(
                target=events.put, args=(END,), daemon=True).start())
            while (item := events.get()) != END:
                self._started.add(run_id)
                self._publish(run_id, pickle.loads(item), names)
            if future.cancelled():  # cancelled while it waited for a worker: it never ran
                self.events.publish(Event(ev.RUN_FINISHED, run_id, None, {"status": "cancelled", "duration": 0.0,
                                                                          "counts": {}}))
                return RunResult(run_id, "cancelled", {})
            remote = future.result()
        finally:
            with self._lock:
                self._active.pop(run_id, None)
                self._claimed.pop(run_id, None)
                self._started.discard(run_id)
            self._forget(run_id, events)
        with self._lock:
            self.affinity[remote["worker"]] = set(remote["models"])
            self.placed[run_id] = remote["worker"]
        nodes = {nid: NodeRecord(r["status"], r["type"], r.get("duration", 0.0), r.get("error"))
                 for nid, r in remote["nodes"].items()}
        return RunResult(run_id, remote["status"], nodes, {}, _renamed(remote["ui"], names), remote["duration"])

    def cancel(self, run_id: str) -> bool:
        from distributed import Event as DaskEvent

        with self._lock:
            if run_id not in self._active:
                return False
            future, started = self._active[run_id], run_id in self._started
        DaskEvent(_cancel_name(run_id), client=self.client).set()  # seen by the worker once it runs the prompt
        if future is not None and not started:
            future.cancel()  # still waiting for a free worker (or just starting: the event stops it there)
        return True

    def capacity(self) -> int:
        """How many prompts the cluster runs at once: its workers' ``GPU`` resources (the queue asks while prompts
        wait, so that workers joining are used at once)."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return int(sum((w.get("resources") or {}).get(GPU, 0) for w in workers))

    def choose(self, plans: list[Plan | None]) -> int:
        """Which of these waiting prompts (queue order) to start now: the first whose models a free worker's cache
        holds, so that a worker freeing up takes work it has loaded (0, the first, when none fits)."""
        processing = self.client.processing()
        with self._lock:
            free = self._free(processing)
            loaded = [self.affinity[address] for address in free if self.affinity.get(address)]
        if not loaded:
            return 0
        for index, plan in enumerate(plans):
            wanted = models_of(plan) if plan is not None else set()
            if any(wanted & models for models in loaded):
                return index
        return 0

    def workers(self) -> dict[str, dict]:
        """Each worker's address -> its device, the models its cache holds and its size (for ``/system_stats``)."""
        return self.client.run(worker_info)

    def close(self) -> None:
        self.client.close()

    def _free(self, processing: dict) -> set[str]:
        """Workers with no task and not asked for by a prompt on its way to them (call holding ``_lock``)."""
        return {address for address, tasks in processing.items() if not tasks} - set(self._claimed.values())

    def _preferred(self, wanted: set[str], run_id: str) -> str | None:
        """The worker to ask for: the free one whose cache holds most of ``wanted``; None (Dask's choice, the
        least busy) when no free worker has any of it but one is free; when none is free, the busy one with most of
        it. (A prompt waits at its worker even when another frees up first, so a busy worker is the last resort.)"""
        if not wanted:
            return None
        processing = self.client.processing()  # live workers -> the tasks they hold
        with self._lock:
            free = self._free(processing)
            best, overlap = None, 0
            for address, models in self.affinity.items():
                common = len(wanted & models)
                if address in processing and common > overlap and (address in free or not free):
                    best, overlap = address, common
            if best is not None:
                self._claimed[run_id] = best
        return best

    def _publish(self, run_id: str, item: dict, names: dict[tuple[str, str], str]) -> None:
        for file in item.get("files") or ():
            names[(file["type"], file["name"])] = self._store(file)
        data = item["data"]
        if "ui" in data:
            data = {**data, "ui": _renamed({"n": data["ui"]}, names)["n"]}
        self.events.publish(Event(item["type"], run_id, item["node_id"], data))

    def _store(self, file: dict) -> str:
        """Write a file a worker sent into the server's folder of its type (confined to it), under a free name."""
        settings = self.local.settings
        root = Path(settings.output_dir if file["type"] == "output" else settings.temp_dir)
        name = file["name"]
        while True:
            path = safe_join(root, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "xb") as out:  # never over a file the server already has
                    out.write(file["data"])
                return name
            except FileExistsError:
                name = _next_name(name)

    def _forget(self, run_id: str, events) -> None:
        """Release what the scheduler keeps for a finished run: its event queue and cancel flag."""
        from distributed import Event as DaskEvent

        try:
            events.close()
            DaskEvent(_cancel_name(run_id), client=self.client).clear()
        except Exception:
            log.debug("could not clear the cancel event of %s", run_id, exc_info=True)


def models_by_node(plan: Plan) -> dict[str, set[str]]:
    """Each node of ``plan`` that reads model files -> those files: the values of its folder choices (a checkpoint,
    LoRAs, ...), as ``folder:name``."""
    from .spec import Combo

    found: dict[str, set[str]] = {}
    for node in plan.order:
        for name, value in node.literals.items():
            spec = node.type.inputs.get(name)
            if isinstance(spec, Combo) and hasattr(spec.options, "identity") and isinstance(value, str) and value:
                found.setdefault(node.id, set()).add(f"{getattr(spec.options, 'name', name)}:{value}")
    return found


def models_of(plan: Plan) -> set[str]:
    """The model files a plan reads (what a worker's cache holds after running it)."""
    return set().union(*models_by_node(plan).values())


def _renamed(ui: dict, names: dict[tuple[str, str], str]) -> dict:
    """UI results with the file names the server gave the files."""
    if not names:
        return ui
    out = {}
    for node_id, node_ui in ui.items():
        out[node_id] = {}
        for key, items in node_ui.items():
            if isinstance(items, list):
                items = [_renamed_item(i, names) for i in items]
            out[node_id][key] = items
    return out


def _renamed_item(item: Any, names: dict[tuple[str, str], str]) -> Any:
    if not isinstance(item, dict) or "filename" not in item:
        return item
    old = "/".join(p for p in (item.get("subfolder") or "", item["filename"]) if p)
    new = names.get((item.get("type"), old))
    if new is None or new == old:
        return item
    subfolder, _, filename = new.rpartition("/")
    return {**item, "filename": filename, "subfolder": subfolder}


def _next_name(name: str) -> str:
    """``image_00001.png`` -> ``image_00002.png``; ``a.png`` -> ``a_00001.png``."""
    head, dot, suffix = name.rpartition(".")
    if not dot or "/" in suffix:
        head, suffix = name, ""
    match = re.search(r"_(\d+)$", head)
    if match:
        head = f"{head[:match.start()]}_{int(match.group(1)) + 1:0{len(match.group(1))}d}"
    else:
        head = f"{head}_00001"
    return f"{head}.{suffix}" if suffix else head


def _queue_name(run_id: str) -> str:
    return f"nodegraph-events-{run_id}"


def _cancel_name(run_id: str) -> str:
    return f"nodegraph-cancel-{run_id}"
