"""The HTTP API and websocket, driven by aiohttp's test client over toy nodes (no torch)."""

from __future__ import annotations

import asyncio
import io
import os

import pytest
from PIL import Image

import nodegraph as ng
from nodegraph.history import History
from nodegraph.server import ServerConfig, create_app

from ..engine import toy


class Folders:
    """The test's folders, as paths (the server reads them from its settings)."""

    def __init__(self, root):
        self.input, self.output, self.temp, self.models = (root / n for n in ("input", "output", "temp", "models"))
        self.settings = ng.Settings(models_dir=self.models, input_dir=self.input, output_dir=self.output,
                                    temp_dir=self.temp)


@pytest.fixture
def folders(tmp_path):
    f = Folders(tmp_path)
    for d in (f.input, f.output, f.temp, f.models / "loras"):
        d.mkdir(parents=True)
    return f


def make_app(folders, tmp_path, **config):
    executor = ng.Executor(toy.registry(), settings=folders.settings)
    return create_app(executor, ServerConfig(**config), History(tmp_path / "data" / "history.sqlite3"))


@pytest.fixture
async def client(aiohttp_client, folders, tmp_path):
    toy.RUNS.clear()
    toy.Steps.hooks = []
    return await aiohttp_client(make_app(folders, tmp_path))


def workflow(value=2, steps=None) -> dict:
    wf = ng.Workflow()
    wf.add(1, "Const", value=value)
    if steps:
        wf.add(2, "Steps", x=ng.Link("1", "value"), steps=steps)
        wf.add(3, "Show", value=ng.Link("2", "x"))
    else:
        wf.add(2, "Add", a=ng.Link("1", "value"), b=3)
        wf.add(3, "Show", value=ng.Link("2", "sum"))
    return wf.to_json()


async def receive_until(ws, kind, prompt_id=None, limit=200):
    seen = []
    for _ in range(limit):
        msg = await asyncio.wait_for(ws.receive_json(), 10)
        seen.append(msg)
        if msg["type"] == kind and (prompt_id is None or msg["data"].get("prompt_id") == prompt_id):
            return seen
    raise AssertionError(f"no {kind} in {seen}")


async def test_a_prompt_runs_and_its_events_reach_the_client_that_queued_it(client):
    ws = await client.ws_connect("/ws?clientId=me")
    hello = await ws.receive_json()
    assert hello["type"] == "status" and hello["data"]["sid"] == "me"
    other = await client.ws_connect("/ws?clientId=someone-else")
    await other.receive_json()
    resp = await client.post("/prompt", json={"prompt": workflow(), "client_id": "me"})
    assert resp.status == 200
    body = await resp.json()
    assert body["node_errors"] == {} and body["number"] == 1
    seen = await receive_until(ws, "execution_success", body["prompt_id"])
    kinds = [m["type"] for m in seen if m["type"] != "status"]
    assert kinds[0] == "execution_start"
    assert kinds.count("executing") == 4  # three nodes, then null at the end
    executed = next(m for m in seen if m["type"] == "executed")
    assert executed["data"] == {"node": "3", "display_node": "3", "output": {"text": ["5"]},
                                "prompt_id": body["prompt_id"]}
    # the other client hears only status changes
    others = []
    while True:
        try:
            others.append(await asyncio.wait_for(other.receive_json(), 0.2))
        except asyncio.TimeoutError:
            break
    assert others and {m["type"] for m in others} == {"status"}
    history = await (await client.get(f"/history/{body['prompt_id']}")).json()
    entry = history[body["prompt_id"]]
    assert entry["outputs"]["3"] == {"text": ["5"]} and entry["status"]["status_str"] == "success"


async def test_queue_remaining_is_right_at_every_change(client):
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive_json()
    resp = await client.post("/prompt", json={"prompt": workflow(), "client_id": "me"})
    prompt_id = (await resp.json())["prompt_id"]
    seen = await receive_until(ws, "execution_success", prompt_id)
    seen += [await asyncio.wait_for(ws.receive_json(), 5)]  # the status after the run
    remaining = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in seen if m["type"] == "status"]
    assert remaining[0] == 1 and remaining[-1] == 0
    assert (await (await client.get("/prompt")).json()) == {"exec_info": {"queue_remaining": 0}}


async def test_an_invalid_prompt_is_refused_with_errors_per_node(client):
    bad = workflow()
    bad["nodes"]["1"]["inputs"]["value"] = "lots"
    bad["nodes"]["2"]["inputs"]["b"] = 10**9
    resp = await client.post("/prompt", json={"prompt": bad})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "value"
    assert body["node_errors"]["2"]["errors"][0]["type"] == "out_of_range"
    assert body["node_errors"]["2"]["class_type"] == "Add"


@pytest.mark.parametrize("payload, fragment", [
    ({"nothing": 1}, "needs a \"prompt\""),
    ({"prompt": {"format": "nodegraph/workflow", "version": 7, "nodes": {}}}, "newer nodegraph"),
    ({"prompt": [1, 2]}, "JSON object"),
])
async def test_malformed_prompts_get_a_clear_400(client, payload, fragment):
    resp = await client.post("/prompt", json=payload)
    assert resp.status == 400
    assert fragment in (await resp.json())["error"]["message"]


async def test_bodies_that_are_not_json_are_refused(client):
    resp = await client.post("/prompt", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    resp = await client.post("/prompt", data=b"x=1", headers={"Content-Type": "text/plain"})
    assert resp.status == 400
    same = f"http://{client.host}:{client.port}"
    resp = await client.post("/prompt", data=b"x=1", headers={"Content-Type": "text/plain", "Origin": same})
    assert resp.status == 415


async def test_a_failing_prompt_does_not_stop_the_queue(client):
    wf = ng.Workflow()
    wf.add(1, "Const", value=1)
    wf.add(2, "Fail", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "x"))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive_json()
    failing = (await (await client.post("/prompt", json={"prompt": wf.to_json(), "client_id": "me"})).json())
    good = (await (await client.post("/prompt", json={"prompt": workflow(), "client_id": "me"})).json())
    seen = await receive_until(ws, "execution_success", good["prompt_id"])
    error = next(m for m in seen if m["type"] == "execution_error")
    assert error["data"]["node_id"] == "2" and error["data"]["exception_message"] == "boom on 1"
    history = await (await client.get("/history")).json()
    assert history[failing["prompt_id"]]["status"]["status_str"] == "error"
    assert history[good["prompt_id"]]["status"]["status_str"] == "success"


async def test_pending_prompts_can_be_deleted_and_the_running_one_interrupted(client):
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def block(ctx, i):
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)

    toy.Steps.hooks = [block]
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive_json()
    first = (await (await client.post("/prompt", json={"prompt": workflow(steps=2), "client_id": "me"})).json())
    second = (await (await client.post("/prompt", json={"prompt": workflow(5), "client_id": "me"})).json())
    await receive_until(ws, "executing")
    queue = await (await client.get("/queue")).json()
    assert [r[1] for r in queue["queue_running"]] == [first["prompt_id"]]
    assert [r[1] for r in queue["queue_pending"]] == [second["prompt_id"]]
    await client.post("/queue", json={"delete": [second["prompt_id"]]})
    assert (await (await client.get("/queue")).json())["queue_pending"] == []
    resp = await client.post("/interrupt", json={"prompt_id": first["prompt_id"]})
    assert (await resp.json()) == {"interrupted": True}
    release.set()
    await receive_until(ws, "execution_interrupted", first["prompt_id"])
    # the queue goes on with a new prompt
    third = (await (await client.post("/prompt", json={"prompt": workflow(9), "client_id": "me"})).json())
    toy.Steps.hooks = []
    await receive_until(ws, "execution_success", third["prompt_id"])


async def test_object_info_has_comfyui_shape_and_our_declaration(client):
    info = await (await client.get("/object_info")).json()
    scale = info["Scale"]
    assert scale["input"]["required"]["factor"] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0,
                                                              "step": 0.25}]
    assert scale["output"] == ["FLOAT"] and scale["output_name"] == ["result"]
    assert info["Words"]["input"]["required"]["mode"][0] == ["upper", "lower"]
    assert info["Words"]["input"]["optional"]["extra"][0] == "INT"
    assert scale["nodegraph"]["inputs"][1]["name"] == "factor"
    one = await (await client.get("/api/object_info/Scale")).json()
    assert one == {"Scale": scale}


async def test_history_survives_a_restart_and_is_paginated(aiohttp_client, folders, tmp_path):
    client = await aiohttp_client(make_app(folders, tmp_path))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive_json()
    ids = []
    for value in range(3):
        ids.append((await (await client.post("/prompt", json={"prompt": workflow(value), "client_id": "me"})
                    ).json())["prompt_id"])
    await receive_until(ws, "execution_success", ids[-1])
    await client.close()
    restarted = await aiohttp_client(make_app(folders, tmp_path))
    page = await (await restarted.get("/history?max_items=2")).json()
    assert list(page) == ids[1:]
    page = await (await restarted.get("/history?max_items=2&offset=2")).json()
    assert list(page) == ids[:1]
    await restarted.post("/history", json={"delete": [ids[0]]})
    assert ids[0] not in await (await restarted.get("/history")).json()


# --- files -----------------------------------------------------------------------------------------------------------

def png_bytes(color=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_view_serves_files_from_their_folder(client, folders):
    (folders.output / "sub").mkdir()
    (folders.output / "sub" / "a.png").write_bytes(png_bytes())
    resp = await client.get("/view", params={"filename": "a.png", "subfolder": "sub", "type": "output"})
    assert resp.status == 200 and resp.content_type == "image/png"
    assert await resp.read() == png_bytes()


@pytest.mark.parametrize("params", [
    {"filename": "../secret.txt"},
    {"filename": "secret.txt", "subfolder": ".."},
    {"filename": "/etc/passwd"},
    {"filename": "..\\secret.txt"},
    {"filename": "a\x00.png"},
    {"filename": "link/secret.txt"},
    {"filename": "a.png", "type": "models"},
])
async def test_view_refuses_to_leave_its_folder(client, folders, tmp_path, params):
    (tmp_path / "secret.txt").write_text("TOP-SECRET-CONTENT")
    os.symlink(tmp_path, folders.output / "link")
    resp = await client.get("/view", params=params)
    assert resp.status in (400, 404)
    assert b"TOP-SECRET-CONTENT" not in await resp.read()


def image_form(data, name="x.png", content_type="image/png", **fields):
    from aiohttp import FormData

    form = FormData()
    form.add_field("image", data, filename=name, content_type=content_type)
    for key, value in fields.items():
        form.add_field(key, value)
    return form


async def test_upload_stores_an_image_without_overwriting(client, folders):
    names = []
    for _ in range(2):
        resp = await client.post("/upload/image", data=image_form(png_bytes(), "cat.png"))
        assert resp.status == 200
        names.append(await resp.json())
    assert names == [{"name": "cat.png", "subfolder": "", "type": "input"},
                     {"name": "cat (1).png", "subfolder": "", "type": "input"}]
    resp = await client.post("/upload/image", data=image_form(png_bytes((0, 0, 255)), "cat.png", overwrite="true"))
    assert (await resp.json())["name"] == "cat.png"
    assert (folders.input / "cat.png").read_bytes() == png_bytes((0, 0, 255))


async def test_upload_refuses_non_images_traversal_and_oversized_files(aiohttp_client, folders, tmp_path):
    client = await aiohttp_client(make_app(folders, tmp_path, max_upload=64 * 1024))
    assert (await client.post("/upload/image", data=image_form(b"not an image"))).status == 415
    assert (await client.post("/upload/image", data=image_form(png_bytes(), subfolder="../.."))).status == 400
    assert (await client.post("/upload/image", data=image_form(os.urandom(100 * 1024)))).status == 413
    ok = await client.post("/upload/image", data=image_form(png_bytes(), name="../../evil.png"))
    name = (await ok.json())["name"]
    assert ok.status == 200 and "/" not in name and (folders.input / name).is_file()
    assert not list(tmp_path.glob("*evil.png"))


async def test_models_route_is_confined(client, folders):
    (folders.models / "loras" / "style.safetensors").write_bytes(b"x")
    assert await (await client.get("/models/loras")).json() == ["style.safetensors"]
    assert "loras" in await (await client.get("/models")).json()
    assert (await client.get("/models/..%2F..")).status in (400, 404)


# --- security ------------------------------------------------------------------------------------------------------

async def test_cross_site_requests_are_refused(client):
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        resp = await client.post("/prompt", json={"prompt": workflow()}, headers=headers)
        assert resp.status == 403, headers
    same = await client.post("/prompt", json={"prompt": workflow()},
                             headers={"Origin": f"http://{client.host}:{client.port}", "Sec-Fetch-Site": "same-origin"})
    assert same.status == 200


async def test_a_cross_site_websocket_is_refused(client):
    from aiohttp import WSServerHandshakeError

    with pytest.raises(WSServerHandshakeError):
        await client.ws_connect("/ws", headers={"Origin": "http://evil.example"})


async def test_a_foreign_host_header_is_refused(client):
    resp = await client.get("/object_info", headers={"Host": "attacker.example:8188"})
    assert resp.status == 403


async def test_a_token_is_required_off_loopback(aiohttp_client, folders, tmp_path):
    client = await aiohttp_client(make_app(folders, tmp_path, host="0.0.0.0", token="s3cret"))
    assert (await client.get("/queue")).status == 401
    assert (await client.get("/queue", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/queue", headers={"Authorization": "Bearer s3cret"})).status == 200


async def test_system_stats_and_free(client):
    stats = await (await client.get("/system_stats")).json()
    assert stats["system"]["python_version"] and "entries" in stats["cache"]
    assert (await client.post("/free", json={"unload_models": True})).status == 200
