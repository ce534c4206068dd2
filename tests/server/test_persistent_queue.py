"""The persistent queue: every prompt a client got an id for ends with a history entry, across clean stops, crashes
(``kill -9``) and restarts. The store's own guarantees and the restore are tested in-process over toy nodes; the
stops and kills on a real server in a subprocess, with a node (``queue_nodes/gate_nodes.py``) that runs until the
test opens its gate."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import nodegraph as ng
from nodegraph.history import History

from ..engine import toy
from ..serving import running_server
from . import test_api
from .test_api import make_app, workflow

HERE = Path(__file__).resolve().parent
folders = test_api.folders  # the toy server's folders (a fixture)


def until(condition, what: str, timeout: float = 30):
    """Poll ``condition`` until it returns something true (a subprocess or a worker thread is getting there)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- the store -------------------------------------------------------------------------------------------------------

def record(document: dict, extra: dict | None = None) -> dict:
    return {"prompt": document, "client_id": "me", "extra": extra or {}, "targets": None, "outputs": ["3"]}


def test_a_history_entry_takes_its_prompt_out_of_the_queue(tmp_path):
    store = History(tmp_path / "history.sqlite3")
    store.enqueue("p1", 1, 1, record(workflow()))
    store.enqueue("p2", 2, 2, record(workflow()))
    store.mark_running("p1")
    store.add("p1", 1, {"status": {"status_str": "success"}})
    assert [r.prompt_id for r in store.queued()] == ["p2"]
    assert store.get("p1")["status"]["status_str"] == "success"


def test_a_history_write_that_fails_leaves_the_prompt_queued_and_no_entry(tmp_path):
    store = History(tmp_path / "history.sqlite3")
    store.enqueue("p1", 1, 1, record(workflow()))
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        # the history row is written first: a failure after it must take it back
        db.execute("CREATE TRIGGER refuse BEFORE DELETE ON queue BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        store.add("p1", 1, {"status": {"status_str": "success"}})
    assert store.get("p1") is None
    assert [r.prompt_id for r in store.queued()] == ["p1"]


def test_the_stored_queue_survives_closing_the_store_in_its_order(tmp_path):
    store = History(tmp_path / "history.sqlite3")
    store.enqueue("late", 5, 3, record(workflow()))
    store.enqueue("front", -2, 2, record(workflow()))
    store.enqueue("early", 5, 1, record(workflow(7)))
    store.enqueue("running", 9, 4, record(workflow()))
    store.mark_running("running")
    store.dequeue(["late"])
    store.close()
    rows = History(tmp_path / "history.sqlite3").queued()
    assert [(r.prompt_id, r.running) for r in rows] == [("running", True), ("front", False), ("early", False)]
    assert rows[2].record == record(workflow(7))


# --- restore, in-process ---------------------------------------------------------------------------------------------

async def entries(client, ids: list[str], timeout: float = 10) -> dict:
    """The history entries of ``ids``, once they all exist."""
    deadline = time.monotonic() + timeout
    while True:
        history = await (await client.get("/history", params={"max_items": 1000})).json()
        if all(i in history for i in ids):
            return {i: history[i] for i in ids}
        assert time.monotonic() < deadline, f"no history entry for {[i for i in ids if i not in history]}"
        await asyncio.sleep(0.02)


@pytest.fixture
def blocked():
    """Steps nodes wait until the event is set (and stop when their run is cancelled)."""
    gate = threading.Event()

    def block(ctx, i):
        while not gate.wait(0.01):
            ctx.check_cancelled()

    toy.RUNS.clear()
    toy.Steps.hooks = [block]
    yield gate
    gate.set()
    toy.Steps.hooks = []


async def test_a_prompt_is_stored_before_its_id_is_answered_and_deleting_it_forgets_it(aiohttp_client, folders,
                                                                                        tmp_path, blocked):
    client = await aiohttp_client(make_app(folders, tmp_path))
    first = (await (await client.post("/prompt", json={"prompt": workflow(steps=2)})).json())["prompt_id"]
    second = (await (await client.post("/prompt", json={"prompt": workflow(5)})).json())["prompt_id"]
    store = History(tmp_path / "data" / "history.sqlite3")  # another connection, as the next process would read it
    assert {r.prompt_id for r in store.queued()} == {first, second}
    until(lambda: [r.prompt_id for r in store.queued() if r.running] == [first], "the first prompt to start")
    await client.post("/queue", json={"delete": [second]})
    assert [r.prompt_id for r in store.queued()] == [first]
    third = (await (await client.post("/prompt", json={"prompt": workflow(6)})).json())["prompt_id"]
    await client.post("/queue", json={"clear": True})
    assert [r.prompt_id for r in store.queued()] == [first]
    blocked.set()
    await entries(client, [first])
    assert store.queued() == [] and store.get(third) is None


async def test_a_stopped_server_leaves_the_running_prompt_for_the_next_start_to_settle(aiohttp_client, folders,
                                                                                       tmp_path, blocked):
    client = await aiohttp_client(make_app(folders, tmp_path))
    running = (await (await client.post("/prompt", json={"prompt": workflow(steps=2)})).json())["prompt_id"]
    requeued = (await (await client.post("/prompt", json={"prompt": workflow(steps=3), "extra_data": {
        "requeue_on_restart": True}})).json())["prompt_id"]
    waiting = (await (await client.post("/prompt", json={"prompt": workflow(4)})).json())["prompt_id"]
    store = History(tmp_path / "data" / "history.sqlite3")
    until(lambda: any(r.running for r in store.queued()), "the first prompt to start")
    await client.close()  # a clean stop: the run is cancelled, its row stays
    assert store.get(running) is None and len(store.queued()) == 3

    blocked.set()
    client = await aiohttp_client(make_app(folders, tmp_path))
    done = await entries(client, [running, requeued, waiting])
    status = done[running]["status"]
    assert status["status_str"] == "interrupted" and status["completed"] is False
    assert "server stopped" in json.dumps(status["messages"])
    assert done[running]["prompt"][1] == running and done[running]["prompt"][4] == ["3"]
    assert done[requeued]["status"]["status_str"] == done[waiting]["status"]["status_str"] == "success"
    assert done[requeued]["meta"]["started"] < done[waiting]["meta"]["started"]
    assert store.queued() == []


async def test_stored_prompts_run_in_their_order_and_a_requeued_one_first(aiohttp_client, folders, tmp_path):
    store = History(tmp_path / "data" / "history.sqlite3")
    store.enqueue("second", 4, 2, record(workflow(2)))
    store.enqueue("third", 4, 3, record(workflow(3)))
    store.enqueue("first", -1, 5, record(workflow(1)))
    store.enqueue("again", 7, 1, record(workflow(9), {"requeue_on_restart": True}))
    store.mark_running("again")
    client = await aiohttp_client(make_app(folders, tmp_path))
    done = await entries(client, ["again", "first", "second", "third"])
    assert all(e["status"]["status_str"] == "success" for e in done.values())
    assert sorted(done, key=lambda i: done[i]["meta"]["started"]) == ["again", "first", "second", "third"]
    assert done["first"]["outputs"]["3"] == {"text": ["4"]}
    # new prompts go after the ones taken up, and get numbers above theirs
    body = await (await client.post("/prompt", json={"prompt": workflow()})).json()
    assert body["number"] > 4


async def test_a_stored_prompt_that_no_longer_validates_is_settled_with_an_error_and_the_queue_goes_on(
        aiohttp_client, folders, tmp_path):
    gone = workflow()
    gone["nodes"]["2"]["type"] = "RemovedSinceThen"
    store = History(tmp_path / "data" / "history.sqlite3")
    store.enqueue("gone", 1, 1, record(gone))
    store.enqueue("fine", 2, 2, record(workflow()))
    client = await aiohttp_client(make_app(folders, tmp_path))
    done = await entries(client, ["gone", "fine"])
    status = done["gone"]["status"]
    assert status["status_str"] == "error" and status["completed"] is False
    message = json.dumps(status["messages"])
    assert "no longer validates" in message and "RemovedSinceThen" in message
    assert done["fine"]["status"]["status_str"] == "success"


# --- a real server, stopped and killed ---------------------------------------------------------------------------------

def call(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


@pytest.fixture
def server_dirs(tmp_path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("models", "input", "output", "data", "temp", "gate")}
    for path in dirs.values():
        path.mkdir()
    return dirs


def serve(dirs):
    return running_server(dirs, "--no-builtin", "--node-path", str(HERE / "queue_nodes"))


def gate(dirs, label: str) -> dict:
    wf = ng.Workflow()
    wf.add(1, "Gate", label=label, folder=str(dirs["gate"]))
    return wf.to_json()


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def submit_three(url, dirs, requeue: bool) -> list[str]:
    """a (running when the test stops the server), then b and c waiting."""
    ids = [call(url, "/prompt", {"prompt": gate(dirs, "a"), "extra_data": {"requeue_on_restart": requeue}})]
    ids += [call(url, "/prompt", {"prompt": gate(dirs, label)}) for label in "bc"]
    until(lambda: lines(dirs["gate"] / "started") == ["a"], "a to start")
    return [i["prompt_id"] for i in ids]


def history_of(url, ids: list[str]) -> dict:
    def all_there():
        history = call(url, "/history")
        return history if all(i in history for i in ids) else None

    return until(all_there, "every prompt's history entry")


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
def test_after_a_restart_the_running_prompt_is_interrupted_and_the_waiting_ones_run_in_order(server_dirs, stop):
    with serve(server_dirs) as url:
        a, b, c = submit_three(url, server_dirs, requeue=False)
        if stop == "kill -9":
            url.process.kill()
        else:
            url.process.terminate()
        assert url.process.wait(15) is not None
    (server_dirs["gate"] / "open").touch()
    with serve(server_dirs) as url:
        history = history_of(url, [a, b, c])
        assert call(url, "/queue") == {"queue_running": [], "queue_pending": []}
    assert history[a]["status"]["status_str"] == "interrupted"
    assert "server stopped" in json.dumps(history[a]["status"]["messages"])
    assert history[b]["status"]["status_str"] == history[c]["status"]["status_str"] == "success"
    assert lines(server_dirs["gate"] / "finished") == ["b", "c"]


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
def test_a_prompt_queued_with_requeue_on_restart_runs_again_first(server_dirs, stop):
    with serve(server_dirs) as url:
        a, b, c = submit_three(url, server_dirs, requeue=True)
        if stop == "kill -9":
            url.process.kill()
        else:
            url.process.terminate()
        url.process.wait(15)
    (server_dirs["gate"] / "open").touch()
    with serve(server_dirs) as url:
        history = history_of(url, [a, b, c])
    assert {history[i]["status"]["status_str"] for i in (a, b, c)} == {"success"}
    assert history[a]["outputs"] == {"1": {"label": ["a"]}}
    assert lines(server_dirs["gate"] / "started") == ["a", "a", "b", "c"]
    assert lines(server_dirs["gate"] / "finished") == ["a", "b", "c"]
