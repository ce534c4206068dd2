"""Injected faults, driven through the server: a node that raises, a node that runs out of memory, a model file
deleted or replaced between runs, a client whose websocket closes mid-run, a cancel in the middle of a sampler step.
Whatever happens, the run ends with a clear error in its history entry, ``/queue`` is left empty and the next prompt
runs."""

from __future__ import annotations

import threading

import pytest

import nodegraph as ng
from nodegraph import Combo, Folder, Node, Output, Registry, Socket
from nodegraph.history import History
from nodegraph.server import ServerConfig, create_app

from ..engine import toy
from . import test_api
from .test_api import receive_until, workflow

folders = test_api.folders  # the toy server's folders (a fixture)

MODELS = Folder("checkpoints", what="checkpoints", suffixes=(".safetensors",))


class Hungry(Node):
    """Raises ``Hungry.error`` (a test sets it): a node that runs out of memory."""
    category = "toy"
    x = Socket("INT")
    outputs = (Output("x", "INT"),)
    error: BaseException = MemoryError()

    def run(self, ctx, x):
        raise self.error


class ReadModel(Node):
    """The content of a file of the checkpoints folder, as text: a loader whose file can change between runs."""
    category = "toy"
    ckpt = Combo(options=MODELS)
    outputs = (Output("text", "STRING"),)

    def run(self, ctx, ckpt):
        return MODELS.locate(ctx.settings, ckpt).read_text()


def make_app(folders, tmp_path, registry=None):
    executor = ng.Executor(registry or Registry([*toy.ALL, Hungry, ReadModel]), settings=folders.settings)
    return create_app(executor, ServerConfig(), History(tmp_path / "data" / "history.sqlite3"))


@pytest.fixture
async def client(aiohttp_client, folders, tmp_path):
    toy.RUNS.clear()
    toy.Steps.hooks = []
    yield await aiohttp_client(make_app(folders, tmp_path))
    toy.Steps.hooks = []


async def run_prompt(client, document: dict, client_id: str = "me") -> tuple[str, dict]:
    """Queue ``document``, wait until its history entry is written; its id and the entry."""
    ws = await client.ws_connect(f"/ws?clientId={client_id}")
    await ws.receive_json()
    resp = await client.post("/prompt", json={"prompt": document, "client_id": client_id})
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    seen = await receive_until(ws, "executing", prompt_id, limit=400)
    while seen[-1]["data"]["node"] is not None:  # the run's end: executing with node null
        seen += await receive_until(ws, "executing", prompt_id, limit=400)
    await until_idle(ws)
    await ws.close()
    return prompt_id, await history_of(client, prompt_id)


async def until_idle(ws) -> None:
    """Wait for the queue's status saying nothing is left (sent to every client once a run is over)."""
    for _ in range(50):
        seen = await receive_until(ws, "status")
        if seen[-1]["data"]["status"]["exec_info"]["queue_remaining"] == 0:
            return
    raise AssertionError("the queue never emptied")


async def history_of(client, prompt_id: str) -> dict:
    return (await (await client.get(f"/history/{prompt_id}")).json())[prompt_id]


async def assert_idle_and_working(client) -> None:
    """Nothing queued or running, and a new prompt runs to success."""
    assert await (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    _, entry = await run_prompt(client, workflow(value=40))
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["3"] == {"text": ["43"]}


def error_of(entry: dict) -> dict:
    return next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")


async def test_a_client_that_hears_a_failed_run_end_finds_the_queue_empty(client):
    wf = ng.Workflow()
    wf.add(1, "Const", value=2)
    wf.add(2, "Fail", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "x"))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive_json()
    for _ in range(20):  # the end and the queue's state raced: a few runs make a lost race likely
        resp = await client.post("/prompt", json={"prompt": wf.to_json(), "client_id": "me"})
        prompt_id = (await resp.json())["prompt_id"]
        await receive_until(ws, "execution_error", prompt_id)
        seen = await receive_until(ws, "executing", prompt_id)
        assert seen[-1]["data"]["node"] is None
        assert await (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
        assert prompt_id in await (await client.get(f"/history/{prompt_id}")).json()


async def test_a_node_that_raises_fails_its_run_with_the_node_and_message_and_the_server_goes_on(client):
    wf = ng.Workflow()
    wf.add(1, "Const", value=2)
    wf.add(2, "Fail", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "x"))
    _, entry = await run_prompt(client, wf.to_json())
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    error = error_of(entry)
    assert error["node_id"] == "2" and error["node_type"] == "Fail"
    assert error["exception_message"] == "boom on 2" and error["exception_type"] == "RuntimeError"
    # nothing of the failed node was kept: run again, it runs again; what finished before it is reused
    _, again = await run_prompt(client, wf.to_json())
    assert again["status"]["status_str"] == "error" and toy.RUNS["Fail"] == 2 and toy.RUNS["Const"] == 1
    await assert_idle_and_working(client)


def wrapped(error: BaseException) -> BaseException:
    """``error`` as a loader reports it: its own error, raised from the library's."""
    try:
        raise ValueError("/models/checkpoints/big.safetensors: cannot load the UNet") from error
    except ValueError as exc:
        return exc


def out_of_memory_errors():
    errors = [pytest.param(MemoryError(), id="MemoryError"),
              pytest.param(wrapped(MemoryError()), id="MemoryError-wrapped-by-a-loader")]
    try:
        import torch
    except ImportError:  # the engine's tests run without torch; its error is matched by name
        return errors
    return errors + [pytest.param(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                  id="torch.OutOfMemoryError")]


@pytest.mark.parametrize("error", out_of_memory_errors())
async def test_running_out_of_memory_ends_the_run_says_what_to_do_and_releases_its_cached_results(client, error):
    executor = client.app["executor"]
    _, before = await run_prompt(client, workflow(value=1))  # results of an earlier run: they stay cached
    assert before["status"]["status_str"] == "success"
    kept = len(executor.cache)
    Hungry.error = error
    wf = ng.Workflow()
    wf.add(1, "Const", value=7)
    wf.add(2, "Add", a=ng.Link("1", "value"), b=1)  # runs, and is cached, before the node that runs out
    wf.add(3, "Hungry", x=ng.Link("2", "sum"))
    wf.add(4, "Show", value=ng.Link("3", "x"))
    wf.add(5, "Const", value=9)  # an independent branch: skipped if after node 3, else released with the rest
    wf.add(6, "Show", value=ng.Link("5", "value"))
    _, entry = await run_prompt(client, wf.to_json())
    assert entry["status"]["status_str"] == "error"
    error = error_of(entry)
    assert error["node_id"] == "3" and error["exception_type"] == type(Hungry.error).__name__
    message = error["exception_message"]
    assert "Hungry (node 3) ran out of memory" in message
    assert "smaller image size or batch" in message and "--cache-gb" in message and "/free" in message
    assert len(executor.cache) == kept  # Const 7 and Add 7+1 were released; the earlier run's results were not
    await assert_idle_and_working(client)


async def test_a_model_file_replaced_between_runs_is_read_again(client, folders):
    folder = folders.models / "checkpoints"
    folder.mkdir()
    (folder / "m.safetensors").write_text("first")
    wf = ng.Workflow()
    wf.add(1, "ReadModel", ckpt="m.safetensors")
    wf.add(2, "Show", value=ng.Link("1", "text"))
    _, entry = await run_prompt(client, wf.to_json())
    assert entry["outputs"]["2"] == {"text": ["'first'"]}
    replacement = folder / "new.tmp"
    replacement.write_text("second, longer")
    replacement.replace(folder / "m.safetensors")  # as a download tool replaces a file
    _, entry = await run_prompt(client, wf.to_json())
    assert entry["outputs"]["2"] == {"text": ["'second, longer'"]}


async def test_a_model_file_deleted_between_runs_is_a_clear_error(client, folders):
    folder = folders.models / "checkpoints"
    folder.mkdir()
    (folder / "m.safetensors").write_text("weights")
    wf = ng.Workflow()
    wf.add(1, "ReadModel", ckpt="m.safetensors")
    wf.add(2, "Show", value=ng.Link("1", "text"))
    _, entry = await run_prompt(client, wf.to_json())
    assert entry["status"]["status_str"] == "success"
    (folder / "m.safetensors").unlink()
    # queued after the deletion: refused at once, naming the input
    resp = await client.post("/prompt", json={"prompt": wf.to_json()})
    assert resp.status == 400
    body = await resp.json()
    assert body["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "ckpt"
    # deleted while the prompt waited in the queue: its run fails naming the file and the folder
    (folder / "m.safetensors").write_text("weights")
    gate = threading.Event()
    toy.Steps.hooks = [lambda ctx, i: gate.wait(10)]
    watcher = await client.ws_connect("/ws?clientId=watcher")
    await watcher.receive_json()
    blocker = await client.post("/prompt", json={"prompt": workflow(value=5, steps=1)})
    waiting = await client.post("/prompt", json={"prompt": wf.to_json(), "client_id": "me"})
    assert blocker.status == waiting.status == 200
    (folder / "m.safetensors").unlink()
    toy.Steps.hooks = []
    gate.set()
    await until_idle(watcher)
    entry = await history_of(client, (await waiting.json())["prompt_id"])
    error = error_of(entry)
    assert error["node_id"] == "1" and "'m.safetensors' is not in" in error["exception_message"]
    assert str(folder) in error["exception_message"]
    await assert_idle_and_working(client)


async def test_a_client_closing_its_websocket_mid_run_neither_stops_the_run_nor_the_server(client):
    gate = threading.Event()
    toy.Steps.hooks = [lambda ctx, i: gate.wait(10) if i == 1 else None]
    watcher = await client.ws_connect("/ws?clientId=watcher")
    await watcher.receive_json()
    ws = await client.ws_connect("/ws?clientId=leaver")
    await ws.receive_json()
    resp = await client.post("/prompt", json={"prompt": workflow(value=3, steps=3), "client_id": "leaver"})
    prompt_id = (await resp.json())["prompt_id"]
    await receive_until(ws, "progress", prompt_id)  # the first step is done; the second waits for the gate
    await ws.close()
    gate.set()
    await until_idle(watcher)
    entry = await history_of(client, prompt_id)
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["3"] == {"text": ["3"]}
    await assert_idle_and_working(client)


# --- cancelling inside a sampler step, on a real tiny model ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    pytest.importorskip("diffusers")
    from nodes.testing.tiny import build_tiny_sd

    root = tmp_path_factory.mktemp("models")
    build_tiny_sd(root / "checkpoints" / "tiny-lcm", lcm=True, seed=0)
    return root


def text_to_image(steps: int) -> dict:
    from nodegraph.assets import workflows_dir

    wf = ng.load(workflows_dir() / "text-to-image.json")
    wf.set("1", "ckpt", "tiny-lcm")
    wf.set("3", "steps", steps)
    wf.set("4", "width", 64)
    wf.set("4", "height", 64)
    return wf.to_json()


async def test_cancelling_in_the_middle_of_a_sampler_step_stops_within_that_step(aiohttp_client, folders, tmp_path,
                                                                                 tiny_models, monkeypatch):
    from diffusers import UNet2DConditionModel

    settings = folders.settings.replace(models_dir=tiny_models, dtype="float32", device="cpu")
    executor = ng.Executor(ng.build_registry(), settings=settings)
    app = create_app(executor, ServerConfig(), History(tmp_path / "data" / "history.sqlite3"))
    client = await aiohttp_client(app)
    calls = []
    forward = UNet2DConditionModel.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the interrupt arrives while the second step's UNet runs
            app["queue"].interrupt()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting_forward)
    _, entry = await run_prompt(client, text_to_image(steps=4))
    assert entry["status"]["status_str"] == "interrupted"
    assert len(calls) == 2  # the step under way finished; no other began
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    assert await (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    calls.clear()
    _, entry = await run_prompt(client, text_to_image(steps=1))
    assert entry["status"]["status_str"] == "success" and len(calls) == 1


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()], ids=["SystemExit", "KeyboardInterrupt"])
async def test_a_node_that_exits_fails_its_run_and_the_worker_goes_on(client, error):
    Hungry.error = error  # what a careless custom node may do: sys.exit() or raise KeyboardInterrupt itself
    wf = ng.Workflow()
    wf.add(1, "Const", value=2)
    wf.add(2, "Hungry", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "x"))
    _, entry = await run_prompt(client, wf.to_json())
    assert entry["status"]["status_str"] == "error"
    message = error_of(entry)["exception_message"]
    assert f"Hungry (node 2) raised {type(error).__name__}" in message, message
    await assert_idle_and_working(client)
