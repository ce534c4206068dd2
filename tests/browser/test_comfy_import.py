"""The canvas opens ComfyUI's files: its editor's (UI) JSON dropped on the canvas, a PNG ComfyUI saved (its
``workflow`` and ``prompt`` text chunks) through the Open menu, and an API prompt; the server converts them
(``POST /nodegraph/import``). Unsupported nodes are named in the error, and nothing is replaced."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image, PngImagePlugin

from ..clients.prompts import comfy_ui_node, comfy_ui_workflow
from .helpers import graph, node

pytestmark = pytest.mark.browser


def drop(page, data: bytes, name: str, kind: str) -> None:
    page.evaluate("""async ([data, name, kind]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: kind}));
        const canvas = document.querySelector("#canvas");
        canvas.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        canvas.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(data).decode(), name, kind])


def wait_for_graph_with(page, node_id: str) -> dict:
    page.wait_for_function("(id) => id in window.nodegraph.app.graph.toJSON().nodes", arg=node_id)
    return graph(page)


def test_a_comfyui_editor_file_dropped_on_the_canvas_opens_and_runs(page):
    page.click("#btn-new")
    drop(page, json.dumps(comfy_ui_workflow()).encode(), "comfy-small.json", "application/json")
    doc = wait_for_graph_with(page, "3")
    # ComfyUI's node ids are ours; titles, the group and the note come along
    assert {"3", "4", "5", "6", "7", "8", "9"} <= set(doc["nodes"])
    assert doc["nodes"]["6"]["ui"]["title"] == "Positive"
    assert [g["title"] for g in doc.get("groups", [])] == ["Sampling"]
    assert any("drawn by hand" in json.dumps(n) for n in doc.get("notes", []))
    assert page.locator("#wf-name").inner_text() == "comfy-small"
    for node_id in ("3", "4", "9"):
        assert node(page, node_id).is_visible()
    # it runs as it is, on the embedded demo model
    page.locator("#canvas").click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+Enter")
    image = node(page, "9").locator("img.ng-image:not(.ng-preview)").first
    image.wait_for(timeout=90_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())


def test_a_png_saved_by_comfyui_opens_from_the_menu(page, tmp_path):
    ui = comfy_ui_workflow()
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps({"1": {"class_type": "CheckpointLoaderSimple",
                                              "inputs": {"ckpt_name": "demo-lcm"}}}))
    info.add_text("workflow", json.dumps(ui))
    path = tmp_path / "ComfyUI_00001_.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, pnginfo=info)
    page.click("#btn-new")
    page.set_input_files("#file-open", str(path))
    doc = wait_for_graph_with(page, "9")
    # the editor's document was taken (it keeps the layout), not the API prompt
    assert doc["nodes"]["6"]["ui"]["title"] == "Positive"
    assert page.locator("#wf-name").inner_text() == "ComfyUI_00001_"


def test_an_api_prompt_opens_laid_out(page, tmp_path):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "demo-lcm"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 4, "cfg": 1.0,
                                                   "sampler_name": "lcm", "scheduler": "sgm_uniform",
                                                   "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "api"}},
    }
    path = tmp_path / "api-prompt.json"
    path.write_text(json.dumps(prompt))
    page.click("#btn-new")
    page.set_input_files("#file-open", str(path))
    doc = wait_for_graph_with(page, "6")
    assert {"1", "2", "3", "4", "5", "6"} <= set(doc["nodes"])
    lefts = {nid: node(page, nid).bounding_box()["x"] for nid in ("1", "5")}
    assert lefts["1"] < lefts["5"]  # laid out left to right along the links


def test_an_unsupported_comfyui_file_is_refused_naming_what_is_missing(page):
    before = graph(page)
    ui = comfy_ui_workflow()
    ui["nodes"].append(comfy_ui_node(11, "SomeCustomUpscaler", (20, 800), [2.0], order=8))
    ui["nodes"].append(comfy_ui_node(12, "AnotherCustomNode", (20, 1000), [], order=9))
    drop(page, json.dumps(ui).encode(), "custom.json", "application/json")
    toast = page.locator("#toasts .toast.error").filter(has_text="SomeCustomUpscaler")
    toast.first.wait_for()
    assert "AnotherCustomNode" in toast.first.inner_text()
    assert graph(page) == before
