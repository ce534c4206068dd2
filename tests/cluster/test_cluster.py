"""Prompts run on a Dask cluster: a LocalCluster of two worker processes, each holding the engine with the demo
model (embedded: no files), driven through ``DaskRunner`` and through the server."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

distributed = pytest.importorskip("distributed")

import nodegraph as ng  # noqa: E402
from nodegraph import cluster, comfy_protocol, events as ev  # noqa: E402
from nodegraph.assets import find_workflow  # noqa: E402
from nodegraph.cluster import GPU, DaskRunner, NodegraphWorker  # noqa: E402
from nodegraph.history import History  # noqa: E402
from nodegraph.library import BUILTIN, load_library  # noqa: E402
from nodegraph.prompt_queue import PromptQueue  # noqa: E402
from nodegraph.registry import build_registry  # noqa: E402
from nodegraph.server import ServerConfig, create_app  # noqa: E402


def settings_in(root) -> ng.Settings:
    return ng.Settings(device="cpu", models_dir=root / "models", input_dir=root / "input",
                       output_dir=root / "output", temp_dir=root / "temp")


@pytest.fixture(scope="module")
def registry():
    library = load_library(BUILTIN)
    return build_registry([], library)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={GPU: 1},
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        client.register_plugin(NodegraphWorker(settings_in(root)))
        yield client


@pytest.fixture
def server_side(tmp_path, registry, client):
    """The server's executor (validation, its folders) and a runner sending its prompts to the cluster."""
    for name in ("models", "input", "output", "temp"):
        (tmp_path / name).mkdir()
    executor = ng.Executor(registry, settings=settings_in(tmp_path))
    return executor, DaskRunner(client, executor)


def text_to_image(seed=42, steps=4) -> ng.Workflow:
    workflow = ng.workflow.load(find_workflow("text-to-image"))
    workflow.set("5", "seed", seed)
    workflow.set("3", "steps", steps)
    return workflow


def saved(executor: ng.Executor, result) -> bytes:
    (image,) = result.ui["7"]["images"]
    return (executor.output_dir / image["subfolder"] / image["filename"]).read_bytes()


def test_a_remote_run_writes_the_same_image_as_a_local_run_into_the_servers_output_folder(server_side, registry,
                                                                                          tmp_path):
    executor, runner = server_side
    remote = runner.run(executor.compile(text_to_image(seed=7)), run_id="same-image")
    assert remote.status == "success"
    local = ng.Executor(registry, settings=settings_in(tmp_path).replace(output_dir=tmp_path / "local"))
    here = local.run(text_to_image(seed=7))
    assert saved(executor, remote) == saved(local, here)


def test_events_arrive_in_order_for_their_prompt_and_file_names_never_collide(server_side):
    executor, runner = server_side
    seen: list[ev.Event] = []
    runner.events.subscribe(seen.append)
    first = runner.run(executor.compile(text_to_image(seed=1)), run_id="first")
    second = runner.run(executor.compile(text_to_image(seed=2)), run_id="second")
    assert {e.run_id for e in seen} == {"first", "second"}
    for run_id, result in (("first", first), ("second", second)):
        kinds = [(e.type, e.node_id) for e in seen if e.run_id == run_id]
        assert kinds[0] == (ev.RUN_STARTED, None) and kinds[-1] == (ev.RUN_FINISHED, None)
        progress = [i for i, k in enumerate(kinds) if k == (ev.NODE_PROGRESS, "5")]
        assert len(progress) == 4 and progress[-1] < kinds.index((ev.NODE_FINISHED, "7"))
        finished = next(e for e in seen if e.run_id == run_id and e.type == ev.NODE_FINISHED and e.node_id == "7")
        assert finished.data["ui"] == result.ui["7"]  # the name the file got on the server
    assert saved(executor, first) != saved(executor, second)
    assert first.ui["7"]["images"][0]["filename"] != second.ui["7"]["images"][0]["filename"]


def test_a_prompt_for_a_loaded_checkpoint_goes_to_the_worker_that_loaded_it(server_side):
    executor, runner = server_side
    for seed in range(3):
        result = runner.run(executor.compile(text_to_image(seed=100 + seed)), run_id=f"affinity-{seed}")
        assert result.status == "success"
    assert len({runner.placed[f"affinity-{seed}"] for seed in range(3)}) == 1
    worker = runner.placed["affinity-0"]
    assert "ckpt:demo-lcm" in runner.workers()[worker]["models"]


def test_cancelling_reaches_the_worker_and_stops_the_run_within_a_step(server_side):
    executor, runner = server_side
    steps = []

    def on_event(event):
        if event.type == ev.NODE_PROGRESS:
            steps.append(event.data["value"])
            if len(steps) == 1:
                threading.Thread(target=runner.cancel, args=("cancelled",)).start()

    runner.events.subscribe(on_event)
    result = runner.run(executor.compile(text_to_image(seed=3, steps=50)), run_id="cancelled")
    assert result.status == "cancelled"
    assert len(steps) < 50
    assert runner.cancel("cancelled") is False  # no longer running


async def test_a_server_with_a_cluster_answers_prompts_and_tells_its_client_as_a_local_one(
        aiohttp_client, server_side, client, tmp_path):
    executor, runner = server_side
    app = create_app(executor, ServerConfig(), History(tmp_path / "history.sqlite3"), runner=runner)
    http = await aiohttp_client(app)
    ws = await http.ws_connect("/ws?clientId=me")
    assert (await ws.receive_json())["type"] == "status"
    resp = await http.post("/prompt", json={"prompt": text_to_image(seed=5).to_json(), "client_id": "me"})
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    kinds = []
    while True:
        message = await asyncio.wait_for(ws.receive(), 60)
        if message.type != 1:  # a binary preview frame
            continue
        data = message.json()
        kinds.append(data["type"])
        if data["type"] == "execution_success":
            assert data["data"]["prompt_id"] == prompt_id
            break
        if data["type"] == "executed":
            image = data["data"]["output"]["images"][0]
    assert {"execution_start", "executing", "progress", "executed"} <= set(kinds)
    view = await http.get("/view", params={"filename": image["filename"], "type": "output"})
    assert view.status == 200 and (await view.read())[:4] == b"\x89PNG"
    history = await (await http.get(f"/history/{prompt_id}")).json()
    assert history[prompt_id]["status"]["status_str"] == "success"
    stats = await (await http.get("/system_stats")).json()
    workers = stats["workers"]
    assert len(workers) == 2 and all(w["ready"] and w["device"] == "cpu" for w in workers)
    assert any("ckpt:demo-lcm" in w["models"] for w in workers)
    assert {w["address"] for w in workers} == set(client.scheduler_info(n_workers=-1)["workers"])


def until(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def queue_over(runner: DaskRunner, tmp_path) -> tuple[PromptQueue, list[int]]:
    """A server's queue over ``runner``, and how many prompts it has had running at once, sampled."""
    queue = PromptQueue(runner, History(tmp_path / "queue.sqlite3"), lambda *message: None, comfy_protocol)
    queue.POLL = 0.1
    most = [0]

    def watch():
        while not queue._stop:
            most[0] = max(most[0], len(queue.running))
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    return queue, most


def queue_prompts(queue: PromptQueue, executor: ng.Executor, clients, steps=8) -> list[str]:
    ids = []
    for i, client_id in enumerate(clients):
        workflow = text_to_image(seed=300 + i, steps=steps)
        queue.put(workflow, workflow.to_json(), executor.compile(workflow), client_id, {}, prompt_id=f"q-{i}")
        ids.append(f"q-{i}")
    return ids


def test_two_clients_prompts_run_at_once_one_per_worker(server_side, client, tmp_path):
    executor, runner = server_side
    assert runner.capacity() == 2
    queue, most = queue_over(runner, tmp_path)
    ids = queue_prompts(queue, executor, ["a", "b", "a", "b"])
    queue.start()
    try:
        until(lambda: all(queue.history.get(i) for i in ids), "every prompt's history entry")
    finally:
        queue.stop()
    assert [queue.history.get(i)["status"]["status_str"] for i in ids] == ["success"] * 4
    assert most[0] == 2 and len({runner.placed[i] for i in ids}) == 2
    # each client's prompts in its order: the second started after the first ended
    for first, second in ((ids[0], ids[2]), (ids[1], ids[3])):
        assert queue.history.get(first)["meta"]["finished"] <= queue.history.get(second)["meta"]["started"]


def test_workers_that_join_while_prompts_wait_take_them_up_side_by_side(tmp_path, registry):
    # a cluster with no worker yet: the first prompt waits at the scheduler, the others in the server's queue
    root = tmp_path / "workers"
    with distributed.LocalCluster(n_workers=0, threads_per_worker=1, processes=True, resources={GPU: 1},
                                  dashboard_address=None) as local, distributed.Client(local) as dask_client:
        dask_client.register_plugin(NodegraphWorker(settings_in(root)))  # workers that join get it too
        for name in ("models", "input", "output", "temp"):
            (tmp_path / name).mkdir()
        executor = ng.Executor(registry, settings=settings_in(tmp_path))
        runner = DaskRunner(dask_client, executor)
        queue, most = queue_over(runner, tmp_path)
        ids = queue_prompts(queue, executor, ["a", "b", "c", "d"], steps=30)
        queue.start()
        try:
            until(lambda: queue.running, "the first prompt to be sent to the cluster")
            time.sleep(0.3)
            assert len(queue.running) == 1 and runner.capacity() == 0  # no worker: one waits at the scheduler
            local.scale(2)
            until(lambda: all(queue.history.get(i) for i in ids), "every prompt's history entry")
        finally:
            queue.stop()
        assert [queue.history.get(i)["status"]["status_str"] for i in ids] == ["success"] * 4
        assert most[0] == 2 and len({runner.placed[i] for i in ids}) == 2


def test_a_prompt_waiting_for_a_free_worker_can_be_cancelled(server_side, client, monkeypatch):
    executor, runner = server_side
    monkeypatch.setattr(cluster, "GPU", "NO-SUCH-RESOURCE")  # no worker will ever take it
    seen, results = [], []
    runner.events.subscribe(seen.append)
    thread = threading.Thread(target=lambda: results.append(
        runner.run(executor.compile(text_to_image(seed=11)), run_id="waits")))
    thread.start()
    while runner._active.get("waits") is None and thread.is_alive():  # until it is submitted
        thread.join(0.05)
    assert runner.cancel("waits")
    thread.join(60)
    assert results[0].status == "cancelled"
    assert [(e.type, e.data["status"]) for e in seen if e.run_id == "waits"] == [(ev.RUN_FINISHED, "cancelled")]


def test_a_prompt_whose_worker_dies_runs_again_on_another_and_a_new_worker_joins(server_side, client):
    # last in the module: it kills a worker (its nanny starts a fresh one, which gets the plugin as it joins)
    executor, runner = server_side
    killed = []

    async def die():  # a coroutine: Client.run does not wait for it, so the worker can die mid-answer
        os._exit(1)

    def on_event(event):
        if event.type == ev.NODE_PROGRESS and not killed:
            running = {w for w, keys in client.processing().items() if "nodegraph-dies" in keys}
            killed.extend(running)
            client.run(die, workers=list(running), wait=False)

    runner.events.subscribe(on_event)
    result = runner.run(executor.compile(text_to_image(seed=9, steps=50)), run_id="dies")
    assert killed and result.status == "success"
    assert runner.placed["dies"] not in killed
    client.wait_for_workers(2, timeout=60)
    info = runner.workers()
    assert len(info) == 2 and all(w["ready"] for w in info.values())


def test_a_freed_worker_is_offered_the_first_waiting_prompt_whose_models_it_holds(monkeypatch):
    from types import SimpleNamespace

    busy = {"tcp://w1": ["task"], "tcp://w2": [], "tcp://w3": []}
    runner = DaskRunner(SimpleNamespace(processing=lambda: busy), local=None)
    monkeypatch.setattr(cluster, "models_of", lambda plan: plan.models)
    plans = [SimpleNamespace(models={"checkpoints:sd"}), SimpleNamespace(models={"checkpoints:xl"}),
             SimpleNamespace(models={"checkpoints:xl", "loras:a"})]
    assert runner.choose(plans) == 0  # no free worker ran anything yet: queue order
    runner.affinity = {"tcp://w1": {"checkpoints:sd"}, "tcp://w2": {"checkpoints:xl"}}
    assert runner.choose(plans) == 1  # w1 has sd but is busy; w2 is free and has xl
    runner._claimed["queued-xl"] = "tcp://w2"  # a prompt already asked for w2
    assert runner.choose(plans) == 0
    del runner._claimed["queued-xl"]
    assert runner.choose([None, *plans]) == 2  # a prompt without a compiled plan is no match, not an error


def test_a_worker_reports_the_models_its_cache_still_holds(monkeypatch):
    from types import SimpleNamespace

    from nodegraph.cluster import WorkerState

    state = WorkerState(SimpleNamespace(cache={"k-ckpt", "k-lora", "k-image"}))
    monkeypatch.setattr(cluster, "models_by_node", lambda plan: plan)
    state.remember({"1": {"ckpt:a"}, "2": {"loras:x"}}, SimpleNamespace(keys={"1": "k-ckpt", "2": "k-lora"}))
    assert state.models == {"ckpt:a", "loras:x"}
    state.executor.cache = {"k-lora", "k-ckpt-b"}  # the budget let checkpoint a go; b came in
    state.remember({"3": {"ckpt:b"}, "4": {"ckpt:c"}}, SimpleNamespace(keys={"3": "k-ckpt-b"}))  # 4 never ran
    assert state.models == {"loras:x", "ckpt:b"}
