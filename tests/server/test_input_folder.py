"""The input folder comes from the settings, which come from the environment: with ``NODEGRAPH_INPUT`` set and no
``--input``, an uploaded image is where LoadImage lists it and where a run reads it."""

from __future__ import annotations

import io
import os

import pytest
from aiohttp import FormData
from PIL import Image

import nodegraph as ng
from nodegraph.cli import make_parser, settings_from_args
from nodegraph.history import History
from nodegraph.server import ServerConfig, create_app

from . import toy_nodes

COLOR = (0, 128, 255)


def png(size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOR).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def serve_settings(tmp_path, monkeypatch):
    """The settings ``nodegraph serve`` builds with no folder options, under ``NODEGRAPH_INPUT`` alone."""
    for variable in [v for v in os.environ if v.startswith("NODEGRAPH_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("NODEGRAPH_INPUT", str(tmp_path / "from-the-environment"))
    monkeypatch.chdir(tmp_path)  # the folders left to their defaults are relative: keep them in the test's folder
    settings = settings_from_args(make_parser().parse_args(["serve"]))
    assert settings.input_dir == tmp_path / "from-the-environment"
    return settings


async def upload_list_and_run(aiohttp_client, tmp_path, settings, load_image):
    executor = ng.Executor(toy_nodes.registry(load_image), settings=settings)
    client = await aiohttp_client(create_app(executor, ServerConfig(), History(tmp_path / "history.sqlite3")))
    form = FormData()
    form.add_field("image", png(), filename="cat.png", content_type="image/png")
    uploaded = await (await client.post("/upload/image", data=form)).json()
    assert uploaded == {"name": "cat.png", "subfolder": "", "type": "input"}
    assert (settings.input_dir / "cat.png").read_bytes() == png()

    info = await (await client.get("/object_info/LoadImage")).json()
    options, declared = info["LoadImage"]["input"]["required"]["image"]
    assert options == ["cat.png"] and declared.get("upload") == "image"

    wf = ng.Workflow()
    wf.add(1, "LoadImage", image="cat.png")
    wf.add(2, "Show", value=ng.Link("1", load_image.outputs[0].name))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive_json()
    resp = await client.post("/prompt", json={"prompt": wf.to_json(), "client_id": "me"})
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    while True:
        message = await ws.receive_json(timeout=30)
        if message["type"] == "executing" and message["data"]["node"] is None:
            break
    entry = (await (await client.get(f"/history/{prompt_id}")).json())[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    return entry["outputs"]["2"]["text"][0]


async def test_an_upload_to_the_input_folder_of_the_environment_is_listed_and_read_by_a_run(
        aiohttp_client, tmp_path, serve_settings):
    shown = await upload_list_and_run(aiohttp_client, tmp_path, serve_settings, toy_nodes.LoadImage)
    assert shown == repr(f"8x6 {COLOR}")


async def test_the_node_librarys_load_image_reads_that_upload_too(aiohttp_client, tmp_path, serve_settings):
    pytest.importorskip("torch")
    from nodes.images import LoadImage

    shown = await upload_list_and_run(aiohttp_client, tmp_path, serve_settings, LoadImage)
    assert shown.startswith("tensor(") and "[0.0000, 0.5020, 1.0000]" in shown  # the pixels, as uint8 / 255
