"""What a client hears on its websocket about a run: skipped nodes, and preview frames framed as it asked once it
sent its feature flags (ComfyUI's type 1, or type 4 naming the node and the prompt), none before; what it says that
we do not understand is ignored."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import pytest
from aiohttp import WSMsgType
from PIL import Image

import nodegraph as ng
from nodegraph.history import History
from nodegraph.server import ServerConfig, create_app

from . import toy_nodes
from ..engine import toy

FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    toy.RUNS.clear()
    settings = ng.Settings(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                           output_dir=tmp_path / "output", temp_dir=tmp_path / "temp")
    executor = ng.Executor(toy_nodes.registry(), settings=settings)
    return await aiohttp_client(create_app(executor, ServerConfig(), History(tmp_path / "history.sqlite3")))


async def connect(client, client_id, flags=None):
    """A socket past its greeting (and, with ``flags``, past the server's answer to them)."""
    ws = await client.ws_connect(f"/ws?clientId={client_id}")
    assert (await ws.receive_json())["type"] == "status"
    if flags is not None:
        await ws.send_json(flags)
        answer = await next_message(ws)
        assert answer["type"] == "feature_flags" and answer["data"]["supports_preview_metadata"] is True
    return ws


async def next_message(ws):
    """The next message: JSON text as a dict, a binary frame as bytes."""
    msg = await asyncio.wait_for(ws.receive(), 10)
    if msg.type == WSMsgType.BINARY:
        return msg.data
    assert msg.type == WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def until_the_end(ws, prompt_id, last="execution_success"):
    """Everything up to the message ``last`` of the prompt (``executing`` with ``node: null`` ends a failed run)."""
    seen = []
    for _ in range(200):
        message = await next_message(ws)
        seen.append(message)
        if (isinstance(message, dict) and message["type"] == last and message["data"]["prompt_id"] == prompt_id
                and message["data"].get("node") is None):
            return seen
    raise AssertionError(f"the run did not end: {seen}")


async def queue(client, workflow, client_id=None):
    body = {"prompt": workflow.to_json()}
    if client_id is not None:
        body["client_id"] = client_id
    resp = await client.post("/prompt", json=body)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["prompt_id"]


def previewing(steps=2):
    wf = ng.Workflow()
    wf.add(1, "Const", value=4)
    wf.add(2, "Glimpse", x=ng.Link("1", "value"), steps=steps)
    wf.add(3, "Show", value=ng.Link("2", "x"))
    return wf


def frames(messages):
    return [m for m in messages if isinstance(m, bytes)]


def first_pixel(png: bytes):
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.convert("RGB").getpixel((0, 0))


async def test_skipped_nodes_reach_the_client_that_queued_the_prompt(client):
    wf = ng.Workflow()
    wf.add(1, "Const", value=1)
    wf.add(2, "Fail", x=ng.Link("1", "value"))
    wf.add(3, "Add", a=ng.Link("2", "x"), b=1)
    wf.add(4, "Show", value=ng.Link("3", "sum"))
    mine = await connect(client, "me")
    other = await connect(client, "someone-else")
    prompt_id = await queue(client, wf, "me")
    seen = await until_the_end(mine, prompt_id, last="executing")
    skipped = [m for m in seen if m["type"] == "node_skipped"]
    assert skipped == [{"type": "node_skipped", "data": {"node": "3", "because_of": "2", "prompt_id": prompt_id}},
                       {"type": "node_skipped", "data": {"node": "4", "because_of": "3", "prompt_id": prompt_id}}]
    kinds = [m["type"] for m in seen]
    assert kinds.index("execution_error") < kinds.index("node_skipped")
    entry = (await (await client.get(f"/history/{prompt_id}")).json())[prompt_id]
    assert ["node_skipped", skipped[0]["data"]] in entry["status"]["messages"]
    # the other client hears the queue's status only, up to the one that says the queue is empty
    heard: list = []
    while not heard or heard[-1]["type"] != "status" or heard[-1]["data"]["status"]["exec_info"]["queue_remaining"]:
        heard.append(await next_message(other))
    assert {m["type"] for m in heard} == {"status"}


async def test_previews_name_their_node_and_prompt_for_a_client_that_asks(client):
    ws = await connect(client, "me", FLAGS)
    prompt_id = await queue(client, previewing(steps=2), "me")
    seen = await until_the_end(ws, prompt_id)
    got = frames(seen)
    assert len(got) == 2
    for step, frame in enumerate(got):
        kind, length = struct.unpack(">II", frame[:8])
        assert kind == 4
        meta = json.loads(frame[8:8 + length].decode("utf-8"))
        assert meta == {"node_id": "2", "display_node_id": "2", "prompt_id": prompt_id, "image_type": "image/png"}
        assert first_pixel(frame[8 + length:]) == toy_nodes.shade(step)
    # each preview follows the progress message of its step
    progress = [i for i, m in enumerate(seen) if isinstance(m, dict) and m["type"] == "progress"]
    assert [seen[i + 1] for i in progress] == got


PLAIN = {"type": "feature_flags", "data": {}}


async def test_a_client_whose_flags_do_not_ask_for_metadata_gets_plain_png_previews(client):
    ws = await connect(client, "me", PLAIN)
    prompt_id = await queue(client, previewing(steps=2), "me")
    got = frames(await until_the_end(ws, prompt_id))
    assert len(got) == 2
    for step, frame in enumerate(got):
        assert struct.unpack(">II", frame[:8]) == (1, 2)  # PREVIEW_IMAGE, PNG
        assert first_pixel(frame[8:]) == toy_nodes.shade(step)


async def test_a_script_that_sent_no_flags_gets_no_binary_frames(client):
    """API clients take every binary frame for an output image (SaveImageWebsocket's): like a ComfyUI started
    without --preview-method, the server sends them none."""
    ws = await connect(client, "me")
    prompt_id = await queue(client, previewing(steps=2), "me")
    seen = await until_the_end(ws, prompt_id)
    assert frames(seen) == [] and [m["type"] for m in seen].count("progress") == 2


async def test_each_socket_gets_the_preview_frames_it_asked_for(client):
    """A prompt queued without a client id is heard by every socket, each in its own framing."""
    asking = await connect(client, "asks", FLAGS)
    plain = await connect(client, "plain", PLAIN)
    prompt_id = await queue(client, previewing(steps=1))
    [with_meta] = frames(await until_the_end(asking, prompt_id))
    [without] = frames(await until_the_end(plain, prompt_id))
    assert struct.unpack(">I", with_meta[:4]) == (4,) and struct.unpack(">II", without[:8]) == (1, 2)
    length = struct.unpack(">I", with_meta[4:8])[0]
    assert with_meta[8 + length:] == without[8:]


@pytest.mark.parametrize("junk", [
    "not json", "", "[1, 2]", "null", "42", '{"type": 5}', '{"data": {}}', '{"type": "hello", "data": {}}',
    '{"type": "feature_flags"}', '{"type": "feature_flags", "data": "yes"}', '{"type": "feature_flags", "data": [1]}',
    '{"type": "feature_flags", "data": {"supports_preview_metadata": true}',  # cut short
    pytest.param("[" * 100_000 + "]" * 100_000, id="nested-past-the-parser's-recursion-limit"),
    b"\x00\x01\x02",
])
async def test_a_message_the_server_does_not_understand_is_ignored(client, junk):
    ws = await connect(client, "me")
    if isinstance(junk, bytes):
        await ws.send_bytes(junk)
    else:
        await ws.send_str(junk)
    # the socket is still open, reads on, and still serves a run
    await ws.send_json(FLAGS)
    answer = await next_message(ws)
    assert answer["type"] == "feature_flags"
    prompt_id = await queue(client, previewing(steps=1), "me")
    seen = await until_the_end(ws, prompt_id)
    assert not ws.closed
    assert [struct.unpack(">I", f[:4])[0] for f in frames(seen)] == [4]
