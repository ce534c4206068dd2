"""ComfyUI's own documents over the HTTP API, on the node library and its embedded demo model: an API-format prompt
posted to ``/prompt`` as it is, told and recorded under the client's node ids; one that uses what we lack refused
with every problem in ComfyUI's error shape; ``POST /nodegraph/import`` turning either ComfyUI format into ours."""

from __future__ import annotations

import asyncio
import copy

import pytest

import nodegraph as ng
from nodegraph.history import History
from nodegraph.library import BUILTIN, load_library
from nodegraph.server import ServerConfig, create_app

from ..clients import prompts
from ..clients.prompts import comfy_ui_workflow


@pytest.fixture(scope="module")
def library():
    return load_library(BUILTIN)


@pytest.fixture
async def client(aiohttp_client, tmp_path, library):
    settings = ng.Settings(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                           output_dir=tmp_path / "output", temp_dir=tmp_path / "temp", device="cpu")
    executor = ng.Executor(ng.build_registry([], library), settings=settings)
    app = create_app(executor, ServerConfig(), History(tmp_path / "history.sqlite3"), library)
    return await aiohttp_client(app)


async def run_to_the_end(client, body, client_id="me"):
    ws = await client.ws_connect(f"/ws?clientId={client_id}")
    await ws.receive_json()
    resp = await client.post("/prompt", json={**body, "client_id": client_id})
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    seen = []
    while True:
        message = await asyncio.wait_for(ws.receive_json(), 120)
        seen.append(message)
        if message["type"] == "executing" and message["data"]["node"] is None:
            break
    await ws.close()
    entry = (await (await client.get(f"/history/{prompt_id}")).json())[prompt_id]
    return prompt_id, seen, entry


def node_ids_told(messages) -> set:
    ids = set()
    for m in messages:
        data = m["data"]
        if m["type"] in ("executing", "progress", "executed", "node_skipped", "execution_error") and data.get("node"):
            ids.add(data["node"])
        if m["type"] == "execution_error":
            ids.add(data["node_id"])
        if m["type"] == "execution_cached":
            ids.update(data["nodes"])
    return ids


async def test_an_api_prompt_runs_as_it_is_and_is_told_under_the_client_s_ids(client):
    prompt = prompts.text_to_image("api")
    _, seen, entry = await run_to_the_end(client, {"prompt": prompt})
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    told = node_ids_told(seen)
    assert told <= set(prompt) and {"3", "9"} <= told
    assert list(entry["outputs"]) == ["9"]
    [image] = entry["outputs"]["9"]["images"]
    assert image["filename"].startswith("api") and image["type"] == "output"
    view = await client.get("/view", params=image)
    assert view.status == 200 and view.content_type == "image/png"
    assert entry["prompt"][2] == prompt  # the prompt as the client sent it
    # run again: every node is cached, and the cached ones are named by the client's ids too
    _, seen, _ = await run_to_the_end(client, {"prompt": prompt})
    cached = [n for m in seen if m["type"] == "execution_cached" for n in m["data"]["nodes"]]
    assert cached and set(cached) <= set(prompt)


async def test_partial_execution_targets_name_the_client_s_nodes(client):
    prompt = prompts.text_to_image("partial")
    prompt["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    _, _, entry = await run_to_the_end(client, {"prompt": prompt, "partial_execution_targets": ["12"]})
    assert list(entry["outputs"]) == ["12"]
    assert entry["outputs"]["12"]["images"][0]["type"] == "temp"


async def test_a_prompt_using_what_we_lack_is_refused_listing_every_problem(client):
    prompt = prompts.text_to_image()
    prompt["20"] = {"class_type": "SomeCustomUpscaler", "inputs": {"image": ["8", 0], "scale": 2}}
    prompt["21"] = {"class_type": "AnotherCustomNode", "inputs": {}}
    prompt["3"]["inputs"]["sampler_name"] = "a_sampler_we_do_not_have"
    resp = await client.post("/prompt", json={"prompt": prompt})
    assert resp.status == 400
    body = await resp.json()
    assert set(body) == {"error", "node_errors"} and body["error"]["type"]
    assert {"20", "21", "3"} <= set(body["node_errors"])
    assert body["node_errors"]["20"]["class_type"] == "SomeCustomUpscaler"
    assert body["node_errors"]["3"]["class_type"] == "KSampler"
    for entry in body["node_errors"].values():
        assert entry["errors"] and all(e["message"] for e in entry["errors"])
    assert (await (await client.get("/queue")).json())["queue_pending"] == []  # nothing was queued


async def test_a_validation_error_names_the_client_s_node_and_type(client):
    prompt = prompts.text_to_image()
    prompt["4"]["inputs"]["ckpt_name"] = "no-such-model.safetensors"
    resp = await client.post("/prompt", json={"prompt": prompt})
    assert resp.status == 400
    errors = (await resp.json())["node_errors"]
    assert set(errors) == {"4"} and errors["4"]["class_type"] == "CheckpointLoaderSimple"
    assert "no-such-model.safetensors" in errors["4"]["errors"][0]["message"]


async def test_the_import_route_turns_either_comfyui_format_into_ours(client):
    for document in (comfy_ui_workflow(), prompts.text_to_image()):
        resp = await client.post("/nodegraph/import", json=document)
        assert resp.status == 200, await resp.text()
        ours = await resp.json()
        assert ours["format"] == "nodegraph/workflow"
        assert {"3", "4", "8", "9"} <= set(ours["nodes"])
        assert all("pos" in (n.get("ui") or {}) for n in ours["nodes"].values())
        # and it runs as converted
        _, _, entry = await run_to_the_end(client, {"prompt": ours})
        assert entry["status"]["status_str"] == "success"
    mine = copy.deepcopy(ours)
    resp = await client.post("/nodegraph/import", json=mine)
    assert resp.status == 200 and (await resp.json()) == mine  # ours passes through


async def test_the_import_route_refuses_what_we_lack_in_comfyui_s_shape(client):
    ui = comfy_ui_workflow()
    ui["nodes"].append({"id": 11, "type": "SomeCustomUpscaler", "pos": [0, 0], "size": [200, 100], "flags": {},
                        "order": 8, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                        "widgets_values": [2.0]})
    resp = await client.post("/nodegraph/import", json=ui)
    assert resp.status == 400
    body = await resp.json()
    assert "SomeCustomUpscaler" in body["error"]["message"] and "11" in body["node_errors"]
    resp = await client.post("/nodegraph/import", json={"something": "else"})
    assert resp.status == 400 and body["error"]["message"]
