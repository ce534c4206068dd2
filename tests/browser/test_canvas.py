"""The browser canvas against a real server: running, building graphs with the mouse, saving and loading, errors."""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.request

import pytest
from PIL import Image

from .helpers import (add_from_palette, center, connect, drag, graph, load, move_node, node, nodes_of_type, row,
                      socket)

pytestmark = pytest.mark.browser


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


def wait_for_image(page, node_id, timeout=90_000) -> str:
    image = node(page, node_id).locator("img.ng-image:not(.ng-preview)").first
    image.wait_for(timeout=timeout)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return image.get_attribute("src")


def test_the_default_workflow_runs_and_its_png_gives_the_graph_back(page):
    doc = graph(page)
    if not nodes_of_type(doc, "LoadCheckpoint"):
        pytest.skip("the text-to-image example is not shipped yet")
    assert page.locator("#wf-name").inner_text() == "text-to-image"
    (loader,) = nodes_of_type(doc, "LoadCheckpoint")
    (saver,) = nodes_of_type(doc, "SaveImage")
    # the example runs as shipped, on the embedded demo model, so the screenshot shows a recognisable picture
    assert doc["nodes"][loader]["inputs"]["ckpt"] == "demo-lcm"
    page.locator("#canvas").click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+Enter")
    src = wait_for_image(page, saver)
    status, body = fetch(page.base_url + src)
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    from nodes.demo.shapes import judge

    (prompt,) = [e["inputs"]["text"] for e in doc["nodes"].values() if e["type"] == "CLIPEncode"]
    assert judge(Image.open(io.BytesIO(body)).convert("RGB"), prompt)["correct"]  # shape and both colours
    assert page.locator("#gallery-count").inner_text() == "1"
    kinds = page.evaluate("window.nodegraph.app.events.map(e => e.type)")
    assert {"execution_start", "executing", "progress", "executed", "execution_success"} <= set(kinds)
    assert page.evaluate("window.nodegraph.app.counters.previews") > 0  # binary preview frames reached a node
    ran = graph(page)

    # the PNG carries the workflow: dropping it on an empty canvas brings the graph back
    page.click("#btn-new")
    assert graph(page)["nodes"] == {}
    data = base64.b64encode(body).decode()
    page.evaluate("""async (data) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "result.png", {type: "image/png"}));
        const canvas = document.querySelector("#canvas");
        canvas.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        canvas.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", data)
    page.wait_for_function("() => Object.keys(window.nodegraph.app.graph.toJSON().nodes).length > 0")
    restored = graph(page)
    assert restored["nodes"].keys() == ran["nodes"].keys()
    for nid, entry in ran["nodes"].items():
        assert restored["nodes"][nid]["type"] == entry["type"]
        assert restored["nodes"][nid]["inputs"] == entry["inputs"]


def test_a_graph_built_with_the_mouse_runs(page, artifacts):
    page.click("#btn-new")
    assert page.locator(".ng-node").count() == 0
    source = add_from_palette(page, "TestPattern")
    move_node(page, source, -260, -120)
    saver = add_from_palette(page, "SaveImage")
    move_node(page, saver, 120, -60)
    number = add_from_palette(page, "Integer")
    move_node(page, number, -300, 150)

    # a mismatched link is refused: IMAGE into the STRING filename_prefix
    connect(page, source, "image", saver, "filename_prefix")
    assert not [l for l in _links(page)]
    assert page.locator(".toast.error").filter(has_text="Cannot connect").count() == 1
    # while dragging, compatible sockets are hinted
    start = center(socket(page, source, "out", "image"))
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(start[0] + 80, start[1] + 40, steps=4)
    assert "compatible" in socket(page, saver, "in", "images").get_attribute("class")
    assert "compatible" not in socket(page, saver, "in", "filename_prefix").get_attribute("class")
    page.screenshot(path=str(artifacts / "linking-hint.png"))
    page.mouse.up()
    assert not _links(page)  # dropped on empty space: a node search opened instead
    page.keyboard.press("Escape")

    connect(page, source, "image", saver, "images")
    connect(page, number, "value", source, "seed")  # an INT widget takes an INT link
    doc = graph(page)
    assert doc["nodes"][saver]["inputs"]["images"] == {"link": [source, "image"]}
    assert doc["nodes"][source]["inputs"]["seed"] == {"link": [number, "value"]}
    assert "linked" in row(page, source, "seed").get_attribute("class")

    # set values in widgets
    width = row(page, source, "width").locator("input")
    width.fill("32")
    width.press("Tab")
    prefix = row(page, saver, "filename_prefix").locator("input")
    prefix.fill("built")
    prefix.press("Tab")
    value = row(page, number, "value").locator("input")
    value.fill("7")
    value.press("Tab")
    doc = graph(page)
    assert doc["nodes"][source]["inputs"]["width"] == 32
    assert doc["nodes"][saver]["inputs"]["filename_prefix"] == "built"
    assert doc["nodes"][number]["inputs"]["value"] == 7

    page.click("#btn-run")
    src = wait_for_image(page, saver)
    assert "built_" in src
    status, body = fetch(page.base_url + src)
    assert status == 200 and body[:4] == b"\x89PNG"
    assert page.evaluate("window.nodegraph.app.counters.previews") > 0


def _links(page) -> list:
    return page.evaluate("window.nodegraph.app.graph.links()")


def test_editing_delete_copy_paste_undo_redo_pan_zoom_fit(page):
    page.click("#btn-new")
    a = add_from_palette(page, "TestPattern")
    move_node(page, a, -200, 0)
    b = add_from_palette(page, "SaveImage")
    move_node(page, b, 150, 0)
    connect(page, a, "image", b, "images")
    assert len(_links(page)) == 1

    # box select both (shift-drag on the background), copy, paste at the pointer
    box_a = node(page, a).bounding_box()
    box_b = node(page, b).bounding_box()
    x0 = min(box_a["x"], box_b["x"]) - 30
    y0 = min(box_a["y"], box_b["y"]) - 30
    x1 = max(box_a["x"] + box_a["width"], box_b["x"] + box_b["width"]) + 30
    y1 = max(box_a["y"] + box_a["height"], box_b["y"] + box_b["height"]) + 30
    drag(page, (x0, y0), (x1, y1), modifiers=("Shift",))
    assert page.locator(".ng-node.selected").count() == 2
    page.keyboard.press("Control+c")
    page.mouse.move(x0 + 40, y1 + 20)
    page.keyboard.press("Control+v")
    doc = graph(page)
    assert len(doc["nodes"]) == 4
    assert len(_links(page)) == 2  # the link inside the copied nodes came along
    pasted = sorted(set(doc["nodes"]) - {a, b}, key=int)
    assert {n["type"] for n in (doc["nodes"][p] for p in pasted)} == {"TestPattern", "SaveImage"}

    # delete the pasted pair, then undo and redo
    page.keyboard.press("Delete")
    assert len(graph(page)["nodes"]) == 2
    page.keyboard.press("Control+z")
    assert len(graph(page)["nodes"]) == 4
    page.keyboard.press("Control+Shift+z")
    assert len(graph(page)["nodes"]) == 2
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+y")
    assert len(graph(page)["nodes"]) == 2

    # shift-click toggles a node in the selection
    page.mouse.click(*center(node(page, a).locator(".ng-title-text")))
    page.keyboard.down("Shift")
    page.mouse.click(*center(node(page, b).locator(".ng-title-text")))
    page.keyboard.up("Shift")
    assert page.locator(".ng-node.selected").count() == 2

    # disconnect by dragging the link off its input
    end = center(socket(page, b, "in", "images"))
    drag(page, end, (end[0] + 10, end[1] + 200))
    page.keyboard.press("Escape")
    assert _links(page) == []
    page.keyboard.press("Control+z")
    assert len(_links(page)) == 1
    # ... and by clicking the link, then its remove button
    # a link's curve passes through the midpoint of its two sockets
    (ax, ay), (bx, by) = center(socket(page, a, "out", "image")), center(socket(page, b, "in", "images"))
    pos = ((ax + bx) / 2, (ay + by) / 2)
    page.mouse.click(*pos)
    page.click(".ng-link-delete")
    assert _links(page) == []

    # pan (drag the background), zoom (wheel), fit (".")
    view = page.evaluate("({...window.nodegraph.app.canvas.view})")
    canvas_box = page.locator("#canvas").bounding_box()
    empty = (canvas_box["x"] + 20, canvas_box["y"] + canvas_box["height"] - 20)
    drag(page, empty, (empty[0] + 100, empty[1] - 50))
    moved = page.evaluate("({...window.nodegraph.app.canvas.view})")
    assert moved["x"] == pytest.approx(view["x"] + 100) and moved["y"] == pytest.approx(view["y"] - 50)
    page.mouse.move(*empty)
    page.mouse.wheel(0, -300)
    page.wait_for_function(f"() => window.nodegraph.app.canvas.view.scale > {moved['scale'] + 0.01}")
    page.keyboard.press("Escape")
    page.mouse.click(*empty)
    page.keyboard.press(".")
    for nid in (a, b):
        box = node(page, nid).bounding_box()
        assert canvas_box["x"] <= box["x"] and box["x"] + box["width"] <= canvas_box["x"] + canvas_box["width"]
        assert canvas_box["y"] <= box["y"] and box["y"] + box["height"] <= canvas_box["y"] + canvas_box["height"]


def test_save_then_open_gives_the_same_graph(page, tmp_path):
    doc = graph(page)
    assert doc["nodes"], "the default example should be loaded"
    with page.expect_download() as download:
        page.click("#btn-save")
    path = tmp_path / "saved.json"
    download.value.save_as(path)
    saved = json.loads(path.read_text())
    assert saved == doc
    assert download.value.suggested_filename.endswith(".json")

    page.click("#btn-new")
    assert graph(page)["nodes"] == {}
    page.set_input_files("#file-open", str(path))
    page.wait_for_function("() => Object.keys(window.nodegraph.app.graph.toJSON().nodes).length > 0")
    assert graph(page) == saved
    assert page.locator("#wf-name").inner_text() == "saved"

    # the autosave brings the same graph back after a reload
    page.reload()
    page.wait_for_function("() => window.nodegraph && document.body.classList.contains('ready')")
    assert graph(page) == saved


def test_validation_errors_show_on_the_node_and_the_input(page):
    load(page, {"format": "nodegraph/workflow", "version": 1, "nodes": {
        "1": {"type": "TestPattern", "inputs": {"width": 13, "height": 64, "seed": 0, "steps": 2},
              "ui": {"pos": [0, 0]}},
        "2": {"type": "SaveImage", "inputs": {"filename_prefix": "x"}, "ui": {"pos": [320, 0]}},
        "3": {"type": "Integer", "inputs": {"value": 1}, "ui": {"pos": [0, 260]}},
    }})
    page.keyboard.press("Control+Enter")
    page.locator(".ng-node.has-error").first.wait_for()
    assert node(page, "1").get_attribute("class").count("has-error") == 1
    assert "has-error" in row(page, "1", "width").get_attribute("class")
    assert "step" in row(page, "1", "width").locator(".ng-input-error").inner_text()
    assert "width" in node(page, "1").locator(".ng-errors").inner_text()
    assert "has-error" not in row(page, "1", "height").get_attribute("class")
    assert "has-error" in node(page, "2").get_attribute("class")
    assert "has-error" in row(page, "2", "images").get_attribute("class")
    assert "has-error" not in node(page, "3").get_attribute("class")
    assert page.locator(".toast.error").count() >= 1

    # fixing the value clears its error
    width = row(page, "1", "width").locator("input")
    width.fill("64")
    width.press("Tab")
    assert "has-error" not in row(page, "1", "width").get_attribute("class")


def test_a_failing_node_shows_its_error(page):
    load(page, {"format": "nodegraph/workflow", "version": 1, "nodes": {
        "1": {"type": "TestPattern", "inputs": {"width": 16, "height": 16, "seed": 0, "steps": 1},
              "ui": {"pos": [0, 0]}},
        "2": {"type": "TestFail", "inputs": {"images": {"link": ["1", "image"]}}, "ui": {"pos": [300, 0]}},
        "3": {"type": "SaveImage", "inputs": {"images": {"link": ["2", "images"]}, "filename_prefix": "never"},
              "ui": {"pos": [560, 0]}},
    }})
    # a seed set to "random" gets a new value once the run is queued
    row(page, "1", "seed").locator("input.w-seed-random").check()
    assert graph(page)["nodes"]["1"]["ui"]["random_seed"] is True
    page.click("#btn-run")
    page.wait_for_function("() => window.nodegraph.app.graph.toJSON().nodes['1'].inputs.seed !== 0")
    assert row(page, "1", "seed").locator("input.w-number").input_value() == str(graph(page)["nodes"]["1"]["inputs"]["seed"])
    error = node(page, "2").locator(".ng-error")
    error.wait_for(timeout=30_000)
    assert "fails on purpose" in error.inner_text()
    assert "has-error" in node(page, "2").get_attribute("class")
    assert "has-error" not in node(page, "1").get_attribute("class")
    # the server says the SaveImage after it was skipped, and why
    page.locator('.ng-node.skipped[data-id="3"]').wait_for(timeout=10_000)
    assert node(page, "3").get_attribute("title") == "skipped: input from node 2 failed"


def test_widgets_for_each_input_kind(page, server_dirs):
    page.click("#btn-new")
    nid = add_from_palette(page, "TestOptions")
    # the node's help text is shown when it is selected
    assert "Every widget kind" in page.locator("#panel-info").inner_text()
    n = node(page, nid)
    n.locator('[data-input="count"] input').fill("99")  # above max: brought back within range
    n.locator('[data-input="count"] input').press("Tab")
    n.locator('[data-input="ratio"] input').fill("0.33")  # onto the 0.05 step
    n.locator('[data-input="ratio"] input').press("Tab")
    n.locator('[data-input="notes"] textarea').fill("two\nlines")
    n.locator('[data-input="notes"] textarea').press("Tab")
    n.locator('[data-input="enabled"] input[type=checkbox]').uncheck()
    n.locator('[data-input="mode"] select').select_option("slow")
    n.locator(".w-list-add").click()
    n.locator(".w-list-add").click()
    n.locator('tr[data-row="1"] td[data-field="name"] select').select_option("b.bin")
    weight = n.locator('tr[data-row="1"] td[data-field="weight"] input')
    weight.fill("-1.5")
    weight.press("Tab")
    n.locator('tr[data-row="0"] .w-list-remove').click()
    inputs = graph(page)["nodes"][nid]["inputs"]
    assert inputs["count"] == 10 and inputs["ratio"] == 0.35
    assert inputs["notes"] == "two\nlines" and inputs["enabled"] is False and inputs["mode"] == "slow"
    assert inputs["rows"] == [{"name": "b.bin", "weight": -1.5}]

    # an image picker with upload for LoadImage's image
    loader = add_from_palette(page, "LoadImage")
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 40, 40)).save(buffer, format="PNG")
    png = buffer.getvalue()
    upload = server_dirs["data"] / "cat.png"
    upload.write_bytes(png)
    node(page, loader).locator("input.w-image-file").set_input_files(str(upload))
    page.wait_for_function(f"() => window.nodegraph.app.graph.toJSON().nodes['{loader}'].inputs.image === 'cat.png'")
    thumb = node(page, loader).locator("img.w-image-thumb")
    page.wait_for_function("img => img.complete && img.naturalWidth === 2", arg=thumb.element_handle())
    assert (server_dirs["input"] / "cat.png").read_bytes() == png
    assert re.search(r"filename=cat\.png.*type=input", thumb.get_attribute("src"))


def test_examples_menu_quick_add_and_stop(page):
    examples = page.evaluate("window.nodegraph.app.examples")
    assert "text-to-image" in examples
    page.click("#btn-new")
    page.select_option("#examples", examples[0])
    page.wait_for_function(f"() => document.querySelector('#wf-name').textContent === {json.dumps(examples[0])}")
    assert graph(page)["nodes"]

    # double-click the background: search, pick with the keyboard
    page.click("#btn-new")
    box = page.locator("#canvas").bounding_box()
    page.mouse.dblclick(box["x"] + 300, box["y"] + 200)
    page.keyboard.type("testpat")
    page.keyboard.press("Enter")
    (source,) = graph(page)["nodes"]
    # drop a link from its output on empty space: the search lists only nodes that take an IMAGE
    start = center(socket(page, source, "out", "image"))
    drag(page, start, (start[0] + 150, start[1] + 120))
    listed = page.locator(".quick-add-item").evaluate_all("els => els.map(e => e.dataset.type)")
    assert "SaveImage" in listed and "Integer" not in listed
    page.keyboard.type("saveimage")
    page.keyboard.press("Enter")
    doc = graph(page)
    (saver,) = nodes_of_type(doc, "SaveImage")
    assert doc["nodes"][saver]["inputs"]["images"] == {"link": [source, "image"]}

    # a slow run can be stopped
    for name, value in (("steps", "20"), ("delay", "0.25")):
        field = row(page, source, name).locator("input")
        field.fill(value)
        field.press("Tab")
    page.click("#btn-run")
    page.wait_for_function(
        f"() => window.nodegraph.app.events.some(e => e.type === 'progress' && e.data.node === '{source}')")
    assert "running" in node(page, source).get_attribute("class")
    assert node(page, source).locator(".ng-progress.visible").count() == 1
    assert page.locator("#queue").get_attribute("data-remaining") == "1"
    page.click("#btn-stop")
    page.wait_for_function("() => window.nodegraph.app.events.some(e => e.type === 'execution_interrupted')")
    page.wait_for_function("() => document.querySelector('#queue').dataset.remaining === '0'")
    assert page.locator("#run-status").inner_text() == "Stopped"
    assert "running" not in node(page, source).get_attribute("class")


def test_link_type_rules_number_rules_and_png_text_chunks(page):
    rules = page.evaluate("""async () => {
        const g = await import("/web/graph.js");
        const w = await import("/web/widgets.js");
        const accepts = (spec) => g.inputAccepts(spec);
        const socket = {kind: "socket", type: "IMAGE/MASK"};
        return {
            image: g.typesMatch("IMAGE", accepts(socket)), mask: g.typesMatch("MASK", accepts(socket)),
            latent: g.typesMatch("LATENT", accepts(socket)), any_out: g.typesMatch("*", accepts(socket)),
            any_in: g.typesMatch("LATENT", accepts({kind: "socket", type: "*"})),
            int_widget: g.typesMatch("INT", accepts({kind: "INT", type: "INT"})),
            float_into_int: g.typesMatch("FLOAT", accepts({kind: "INT", type: "INT"})),
            string_into_combo: g.typesMatch("STRING", accepts({kind: "COMBO", type: "COMBO"})),
            combo_into_combo: g.typesMatch("COMBO", accepts({kind: "COMBO", type: "COMBO"})),
            int_into_combo: g.typesMatch("INT", accepts({kind: "COMBO", type: "COMBO"})),
            snapped: w.normaliseNumber({kind: "INT", min: 8, max: 512, step: 8}, 500),
            clamped: w.normaliseNumber({kind: "INT", min: 0, max: 2 ** 64 - 1}, 1e30),
            stepped: w.normaliseNumber({kind: "FLOAT", min: 0, max: 30, step: 0.01}, 7.777),
        };
    }""")
    assert rules == {"image": True, "mask": True, "latent": False, "any_out": True, "any_in": True,
                     "int_widget": True, "float_into_int": False, "string_into_combo": True,
                     "combo_into_combo": True, "int_into_combo": False, "snapped": 504,
                     "clamped": 2**53 - 1, "stepped": 7.78}

    from PIL import PngImagePlugin

    doc = {"format": "nodegraph/workflow", "version": 1, "nodes": {"1": {"type": "Text", "inputs": {"value": "é ✓"}}}}
    text = json.dumps(doc, ensure_ascii=False)
    for how in ("tEXt", "zTXt", "iTXt", "iTXt-zip"):
        info = PngImagePlugin.PngInfo()
        info.add_text("other", "x")
        if how == "tEXt":
            info.add_text("nodegraph_workflow", json.dumps(doc))
        elif how == "zTXt":
            info.add_text("nodegraph_workflow", json.dumps(doc), zip=True)
        else:
            info.add_itxt("nodegraph_workflow", text, zip=how == "iTXt-zip")
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
        found = page.evaluate("""async (data) => {
            const png = await import("/web/png.js");
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            return await png.workflowFromPng(bytes.buffer);
        }""", base64.b64encode(buffer.getvalue()).decode())
        assert found == doc, how
