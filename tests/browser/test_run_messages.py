"""How the canvas shows what the server says about a run: skipped nodes and preview frames that name their node.

The messages are fed to the page's websocket client (``app.api.receive``) exactly as they come off the socket
(JSON text, binary frames built here the way the server packs them), so these tests check the canvas's handling
of the protocol whatever the server in the test session sends."""

from __future__ import annotations

import base64
import io
import json
import struct

import pytest
from PIL import Image

from .helpers import load, node

pytestmark = pytest.mark.browser

PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
PNG = 2

THREE_NODES = {"format": "nodegraph/workflow", "version": 1, "nodes": {
    "1": {"type": "TestPattern", "inputs": {"width": 16, "height": 16, "seed": 0, "steps": 1}, "ui": {"pos": [0, 0]}},
    "2": {"type": "TestFail", "inputs": {"images": {"link": ["1", "image"]}}, "ui": {"pos": [300, 0]}},
    "3": {"type": "SaveImage", "inputs": {"images": {"link": ["2", "images"]}, "filename_prefix": "never"},
          "ui": {"pos": [560, 0]}},
}}


def send(page, kind: str, data: dict) -> None:
    page.evaluate("(text) => window.nodegraph.app.api.receive(text)", json.dumps({"type": kind, "data": data}))


def send_frame(page, frame: bytes) -> None:
    page.evaluate("""(data) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        window.nodegraph.app.api.receive(bytes.buffer);
    }""", base64.b64encode(frame).decode())


def png(color: tuple[int, int, int], size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def frame_with_metadata(node_id: str, prompt_id: str, image: bytes) -> bytes:
    meta = json.dumps({"node_id": node_id, "display_node_id": node_id, "prompt_id": prompt_id,
                       "image_type": "image/png"}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image


def preview_of(page, node_id):
    return node(page, node_id).locator("img.ng-preview")


def preview_width(page, node_id) -> int:
    """The decoded width of a node's preview: the frame's image bytes were cut out of it correctly."""
    image = preview_of(page, node_id)
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return image.evaluate("img => img.naturalWidth")


def test_the_canvas_asks_for_previews_with_metadata_when_its_socket_opens(page):
    page.context.add_init_script("""(() => {
        window.__sent = [];
        const send = WebSocket.prototype.send;
        WebSocket.prototype.send = function (data) {
            window.__sent.push(data);
            return send.call(this, data);
        };
    })()""")
    page.reload()
    page.wait_for_function(
        "() => window.nodegraph && document.body.classList.contains('ready') && window.__sent.length")
    first = json.loads(page.evaluate("window.__sent[0]"))
    assert first == {"type": "feature_flags", "data": {"supports_preview_metadata": True}}


def test_a_preview_with_metadata_shows_on_the_node_it_names_and_only_for_the_running_prompt(page):
    load(page, THREE_NODES)
    send(page, "execution_start", {"prompt_id": "p1"})
    send(page, "executing", {"node": "1", "display_node": "1", "prompt_id": "p1"})
    before = page.evaluate("window.nodegraph.app.counters.previews")

    # node 1 is the one running, but the frame names node 2: it goes to node 2
    send_frame(page, frame_with_metadata("2", "p1", png((250, 20, 20), size=6)))
    assert preview_width(page, "2") == 6
    assert preview_of(page, "1").count() == 0

    # a frame of another prompt is not ours
    send_frame(page, frame_with_metadata("3", "another-prompt", png((20, 250, 20))))
    assert preview_of(page, "3").count() == 0
    assert page.evaluate("window.nodegraph.app.counters.previews") == before + 1

    # a plain PREVIEW_IMAGE frame still goes to the node that is running
    send_frame(page, struct.pack(">II", PREVIEW_IMAGE, PNG) + png((20, 20, 250), size=9))
    assert preview_width(page, "1") == 9
    assert page.evaluate("window.nodegraph.app.counters.previews") == before + 2

    # previews are live: a node's goes when it is done
    send(page, "executing", {"node": "2", "display_node": "2", "prompt_id": "p1"})
    assert preview_of(page, "1").count() == 0

    # once the run is over, frames naming a node are dropped
    send(page, "executing", {"node": None, "prompt_id": "p1"})
    send(page, "execution_success", {"prompt_id": "p1"})
    send_frame(page, frame_with_metadata("3", "p1", png((20, 250, 20))))
    assert preview_of(page, "3").count() == 0


def test_a_node_skipped_because_its_input_failed_is_greyed_and_says_why(page):
    load(page, THREE_NODES)
    send(page, "execution_start", {"prompt_id": "p1"})
    send(page, "executing", {"node": "1", "display_node": "1", "prompt_id": "p1"})
    send(page, "executing", {"node": "2", "display_node": "2", "prompt_id": "p1"})
    send(page, "execution_error", {"prompt_id": "p1", "node_id": "2", "node_type": "TestFail",
                                   "exception_message": "this node fails on purpose", "exception_type": "ValueError"})
    send(page, "node_skipped", {"node": "3", "because_of": "2", "prompt_id": "p1"})

    skipped = node(page, "3")
    classes = skipped.get_attribute("class").split()
    assert "skipped" in classes and "has-error" not in classes and "running" not in classes
    assert skipped.get_attribute("title") == "skipped: input from node 2 failed"
    assert skipped.locator(".ng-badge").inner_text() == "skipped"
    assert skipped.evaluate("el => getComputedStyle(el).filter") != "none"  # drawn greyed
    assert "has-error" in node(page, "2").get_attribute("class")
    assert "skipped" not in node(page, "2").get_attribute("class")
    assert "done" in node(page, "1").get_attribute("class")
    # the server's own messages (status, its feature flags) may arrive in between: look for the injected one
    assert page.evaluate("window.nodegraph.app.events.filter(e => e.type === 'node_skipped').at(-1)") == {
        "type": "node_skipped", "data": {"node": "3", "because_of": "2", "prompt_id": "p1"}}

    # the next run starts clean
    send(page, "execution_start", {"prompt_id": "p2"})
    assert "skipped" not in node(page, "3").get_attribute("class")
    assert node(page, "3").get_attribute("title") is None
    assert "has-error" not in node(page, "2").get_attribute("class")
