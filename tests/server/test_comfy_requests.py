"""What ComfyUI's API clients rely on, over toy nodes (no torch): JSON bodies read whatever their declared type when
no browser sent them, uploads judged by their bytes, the history written before a run's end is told, and the
``/prompt`` body's ``extra_data``, ``front``, ``number``, ``partial_execution_targets`` and ``prompt_id``."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from aiohttp import FormData
from PIL import Image

import nodegraph as ng
from nodegraph.history import History
from nodegraph.server import ServerConfig, create_app

from . import toy_nodes
from ..engine import toy


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    toy.RUNS.clear()
    toy.Steps.hooks = []
    settings = ng.Settings(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                           output_dir=tmp_path / "output", temp_dir=tmp_path / "temp")
    executor = ng.Executor(toy_nodes.registry(), settings=settings)
    app = create_app(executor, ServerConfig(max_upload=64 * 1024), History(tmp_path / "history.sqlite3"))
    yield await aiohttp_client(app)
    toy.Steps.hooks = []


def adding(value=2) -> dict:
    wf = ng.Workflow()
    wf.add(1, "Const", value=value)
    wf.add(2, "Add", a=ng.Link("1", "value"), b=3)
    wf.add(3, "Show", value=ng.Link("2", "sum"))
    return wf.to_json()


def two_outputs() -> dict:
    wf = ng.Workflow()
    wf.add(1, "Const", value=1)
    wf.add(2, "Show", value=ng.Link("1", "value"))
    wf.add(3, "Add", a=ng.Link("1", "value"), b=1)
    wf.add(4, "Show", value=ng.Link("3", "sum"))
    return wf.to_json()


async def connect(client, client_id="me"):
    ws = await client.ws_connect(f"/ws?clientId={client_id}")
    assert (await ws.receive_json())["type"] == "status"
    return ws


async def messages_until(ws, done, limit=200):
    seen = []
    for _ in range(limit):
        message = await asyncio.wait_for(ws.receive_json(), 10)
        seen.append(message)
        if done(message):
            return seen
    raise AssertionError(f"never ended: {seen}")


def ended(prompt_id):
    return lambda m: m["type"] == "executing" and m["data"]["node"] is None and m["data"]["prompt_id"] == prompt_id


async def post(client, body, **kwargs):
    resp = await client.post("/prompt", json=body, **kwargs)
    return resp.status, await resp.json()


# --- bodies -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/octet-stream", "text/plain;charset=UTF-8"])
async def test_a_script_s_prompt_is_read_as_json_whatever_content_type_it_declares(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    data = json.dumps({"prompt": adding(), "client_id": "me"}).encode()
    if content_type is None:  # aiohttp would declare bytes application/octet-stream: send it with no header at all
        headers["Content-Type"] = ""
    resp = await client.post("/prompt", data=data, headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["node_errors"] == {}


async def test_a_browser_must_declare_json_and_other_sites_are_refused(client):
    data = json.dumps({"prompt": adding()}).encode()
    same = f"http://{client.host}:{client.port}"
    resp = await client.post("/prompt", data=data, headers={"Content-Type": "text/plain", "Origin": same})
    assert resp.status == 415
    for origin in ("http://evil.example", "null"):
        resp = await client.post("/prompt", data=data, headers={"Content-Type": "text/plain", "Origin": origin})
        assert resp.status == 403
    resp = await client.post("/prompt", data=data, headers={"Content-Type": "application/json", "Origin": same})
    assert resp.status == 200


async def test_a_body_that_is_not_json_is_a_400_whatever_its_type(client):
    for content_type in ("application/json", "text/plain"):
        resp = await client.post("/prompt", data=b"x=1", headers={"Content-Type": content_type})
        assert resp.status == 400
        assert "not valid JSON" in (await resp.json())["error"]


async def test_interrupt_and_other_posts_take_bodies_as_scripts_send_them(client):
    resp = await client.post("/interrupt", data=b"", headers={"Content-Type": ""})
    assert resp.status == 200 and (await resp.json()) == {"interrupted": False}
    resp = await client.post("/interrupt", data=b"not json", headers={"Content-Type": "text/plain"})
    assert resp.status == 200
    resp = await client.post("/queue", data=b'{"clear": true}', headers={"Content-Type": "text/plain"})
    assert resp.status == 200


# --- uploads --------------------------------------------------------------------------------------------------------

def image_bytes(fmt="PNG", color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format=fmt)
    return buffer.getvalue()


def upload_form(data, name, content_type=None, **fields):
    form = FormData()
    if content_type is None:
        form.add_field("image", data, filename=name)
    else:
        form.add_field("image", data, filename=name, content_type=content_type)
    for key, value in fields.items():
        form.add_field(key, value)
    return form


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain", "image/jpeg"])
async def test_an_upload_is_judged_by_its_bytes_not_its_declared_type(client, tmp_path, content_type):
    resp = await client.post("/upload/image", data=upload_form(image_bytes(), "cat.png", content_type,
                                                               subfolder="pets"))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"name": "cat.png", "subfolder": "pets", "type": "input"}
    assert (tmp_path / "input" / "pets" / "cat.png").read_bytes() == image_bytes()


async def test_an_upload_is_stored_under_a_suffix_of_its_real_format(client, tmp_path):
    for name, fmt, stored in (("page.html", "PNG", "page.html.png"), ("photo.jpeg", "JPEG", "photo.jpeg"),
                              ("noname", "WEBP", "noname.webp")):
        resp = await client.post("/upload/image", data=upload_form(image_bytes(fmt), name, "image/png"))
        assert (await resp.json())["name"] == stored
        view = await client.get("/view", params={"filename": stored, "type": "input"})
        assert view.status == 200 and view.content_type.startswith("image/")


async def test_what_is_not_an_image_or_too_big_is_refused_clearly(client):
    resp = await client.post("/upload/image", data=upload_form(b"<html>hello</html>", "x.png", "image/png"))
    assert resp.status == 415 and "not an image" in (await resp.json())["error"]
    truncated = image_bytes()[:40]
    assert (await client.post("/upload/image", data=upload_form(truncated, "x.png"))).status == 415
    big = upload_form(image_bytes() + b"\0" * (100 * 1024), "x.png")
    assert (await client.post("/upload/image", data=big)).status == 413
    resp = await client.post("/upload/image", data=b"raw", headers={"Content-Type": "image/png"})
    assert resp.status == 415


# --- the end of a run -------------------------------------------------------------------------------------------------

async def test_history_holds_the_outputs_when_the_run_s_end_is_told(client):
    """A client that reads /history/{id} the moment it hears executing(null), execution_success or an empty queue
    finds the outputs there."""
    ws = await connect(client)
    _, body = await post(client, {"prompt": adding(), "client_id": "me"})
    prompt_id = body["prompt_id"]
    checked = []
    for _ in range(100):
        message = await asyncio.wait_for(ws.receive_json(), 10)
        end = (message["type"] in ("executing", "execution_success") and message["data"].get("node") is None) or (
            message["type"] == "status" and message["data"]["status"]["exec_info"]["queue_remaining"] == 0)
        if end:
            history = await (await client.get(f"/history/{prompt_id}")).json()
            assert history[prompt_id]["outputs"]["3"] == {"text": ["5"]}, message
            checked.append(message["type"])
        if message["type"] == "status" and checked:
            break
    assert checked == ["executing", "execution_success", "status"]


async def test_a_failed_run_is_in_the_history_when_its_end_is_told(client):
    wf = ng.Workflow()
    wf.add(1, "Const", value=1)
    wf.add(2, "Fail", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "x"))
    ws = await connect(client)
    _, body = await post(client, {"prompt": wf.to_json(), "client_id": "me"})
    await messages_until(ws, ended(body["prompt_id"]))
    entry = (await (await client.get(f"/history/{body['prompt_id']}")).json())[body["prompt_id"]]
    assert entry["status"]["status_str"] == "error"


async def test_a_run_that_crashes_outside_any_node_still_ends_for_its_client(client, monkeypatch):
    executor = client.app["executor"]

    def crash(*args, **kwargs):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(executor, "run", crash)
    ws = await connect(client)
    _, body = await post(client, {"prompt": adding(), "client_id": "me"})
    seen = await messages_until(ws, ended(body["prompt_id"]))
    error = next(m for m in seen if m["type"] == "execution_error")
    assert error["data"]["exception_message"] == "the engine broke"
    entry = (await (await client.get(f"/history/{body['prompt_id']}")).json())[body["prompt_id"]]
    assert entry["status"]["status_str"] == "error"


# --- the /prompt body ------------------------------------------------------------------------------------------------

async def hold_the_worker(client):
    """Queue a prompt that blocks in its node until the returned event is set, and wait until it runs."""
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    toy.Steps.hooks = [lambda ctx, i: asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)]
    wf = ng.Workflow()
    wf.add(1, "Const", value=1)
    wf.add(2, "Steps", x=ng.Link("1", "value"), steps=1)
    wf.add(3, "Show", value=ng.Link("2", "x"))
    ws = await connect(client, "holder")
    _, body = await post(client, {"prompt": wf.to_json(), "client_id": "holder"})
    await messages_until(ws, lambda m: m["type"] == "executing" and m["data"]["node"] == "2")
    return release, ws, body["prompt_id"]


async def test_front_and_number_order_the_queue_as_comfyui_does(client):
    release, ws, held = await hold_the_worker(client)
    ids = {}
    for name, extra in (("a", {}), ("b", {}), ("first", {"front": True}), ("low", {"number": -100}),
                        ("between", {"number": 2.5}), ("last", {"front": False})):
        status, body = await post(client, {"prompt": adding(), **extra})
        assert status == 200, body
        ids[body["prompt_id"]] = name
        if "number" in extra:
            assert body["number"] == extra["number"]
    queue = await (await client.get("/queue")).json()
    assert [ids[row[1]] for row in queue["queue_pending"]] == ["low", "first", "a", "between", "b", "last"]
    release.set()
    toy.Steps.hooks = []
    await messages_until(ws, lambda m: m["type"] == "status" and not m["data"]["status"]["exec_info"]["queue_remaining"])
    history = await (await client.get("/history")).json()
    ran = [ids.get(pid, "held") for pid in history]
    assert ran == ["held", "low", "first", "a", "between", "b", "last"]


async def test_partial_execution_targets_run_only_those_outputs(client):
    ws = await connect(client)
    status, body = await post(client, {"prompt": two_outputs(), "client_id": "me",
                                       "partial_execution_targets": ["4"]})
    assert status == 200, body
    await messages_until(ws, ended(body["prompt_id"]))
    entry = (await (await client.get(f"/history/{body['prompt_id']}")).json())[body["prompt_id"]]
    assert entry["outputs"] == {"4": {"text": ["2"]}}
    assert entry["prompt"][4] == ["4"]
    status, body = await post(client, {"prompt": two_outputs(), "partial_execution_targets": ["9"]})
    assert status == 400 and "9" in json.dumps(body)


async def test_extra_data_is_kept_and_its_pnginfo_travels_with_the_workflow(client):
    ws = await connect(client)
    ui_document = {"last_node_id": 3, "nodes": [], "links": [], "version": 0.4}
    doc = ng.Workflow()
    doc.add(1, "Const", value=1)
    doc.add(2, "Provenance", value=ng.Link("1", "value"))
    extra = {"extra_pnginfo": {"workflow": ui_document}, "note": "mine"}
    status, body = await post(client, {"prompt": doc.to_json(), "client_id": "me", "extra_data": extra})
    assert status == 200, body
    await messages_until(ws, ended(body["prompt_id"]))
    entry = (await (await client.get(f"/history/{body['prompt_id']}")).json())[body["prompt_id"]]
    assert entry["outputs"]["2"] == {"extra_pnginfo": [{"workflow": ui_document}]}
    assert entry["prompt"][3] == {**extra, "client_id": "me"}
    assert entry["prompt"][2] == doc.to_json()  # the prompt as the client sent it


async def test_a_client_may_choose_its_prompt_id_once_while_it_waits(client):
    release, ws, held = await hold_the_worker(client)
    status, body = await post(client, {"prompt": adding(), "prompt_id": "my-own-id"})
    assert status == 200 and body["prompt_id"] == "my-own-id"
    status, body = await post(client, {"prompt": adding(), "prompt_id": "my-own-id"})
    assert status == 400 and "already queued" in body["error"]["message"]
    status, body = await post(client, {"prompt": adding(), "prompt_id": held})
    assert status == 400
    release.set()
    toy.Steps.hooks = []
    await messages_until(ws, lambda m: m["type"] == "status" and not m["data"]["status"]["exec_info"]["queue_remaining"])
    assert "my-own-id" in await (await client.get("/history/my-own-id")).json()


@pytest.mark.parametrize("extra, fragment", [
    ({"number": "soon"}, "number"),
    ({"number": True}, "number"),
    ({"partial_execution_targets": "4"}, "partial_execution_targets"),
    ({"partial_execution_targets": [None]}, "partial_execution_targets"),
    ({"prompt_id": 7}, "prompt_id"),
    ({"prompt_id": ""}, "prompt_id"),
])
async def test_malformed_prompt_fields_get_a_clear_400(client, extra, fragment):
    status, body = await post(client, {"prompt": adding(), **extra})
    assert status == 400
    assert body["error"]["type"] == "invalid_prompt" and fragment in body["error"]["message"]
    assert body["node_errors"] == {}


async def test_top_level_keys_the_server_does_not_know_are_ignored(client):
    status, body = await post(client, {"prompt": adding(), "client_id": "me", "api_key_comfy_org": "x",
                                       "auto_queue": True, "extra_data": "not an object", "front": 0})
    assert status == 200, body
