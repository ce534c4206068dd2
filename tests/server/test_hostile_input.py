"""Hostile requests against the real node library (validation only: nothing here runs a model): absurd nesting,
numbers no JSON parser should hand on, file names that try to leave their folder, graphs built to exhaust the
stack. Each is a 4xx naming what was wrong, never a 500; and every answer carries the browser protections."""

from __future__ import annotations

import json

import pytest

import nodegraph as ng
from nodegraph.history import History
from nodegraph.library import load_library
from nodegraph.server import ServerConfig, create_app

from . import test_api
from .test_api import image_form, png_bytes

folders = test_api.folders  # the test's folders (a fixture)

JSON_ROUTES = ["/prompt", "/api/prompt", "/nodegraph/import", "/queue", "/history", "/free"]

# Every spelling of "leave the output folder" a client, a proxy or another file system might turn into one.
TRAVERSALS = [
    "../escape", "../../etc/passwd", "a/../../b", "portraits/..", "/etc/passwd", "/tmp/x", "C:/Windows/x",
    "C:x", "..\\escape", "\\\\server\\share\\x", "a\\b", "%2e%2e%2fescape", "%2E%2E/escape", "..%2fescape",
    "%252e%252e%252fescape", "\u2025/escape", "\uff0e\uff0e/escape", "..\uff0fescape", "a\uff0f..\uff0fb",
    "\uff0fetc\uff0fpasswd", "a\x00b", "a\nb", "x\u202e", "... /escape", ".. /escape", "x" * 300,
]
ALLOWED = ["nodegraph", "portraits/cat", "a..b", "日本/猫", "50% off", ".hidden", "", "run 2/"]


@pytest.fixture
async def real(aiohttp_client, folders, tmp_path):
    """A server over the real node library, which validates without running anything."""
    library = load_library("nodes")
    executor = ng.Executor(ng.build_registry(), settings=folders.settings)
    app = create_app(executor, ServerConfig(), History(tmp_path / "data" / "history.sqlite3"), library)
    (folders.input / "cat.png").write_bytes(png_bytes())
    return await aiohttp_client(app)


def saving(prefix: str, node: str = "SaveImage") -> dict:
    return {"format": "nodegraph/workflow", "version": 1, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"type": node, "inputs": {"images": {"link": ["1", "image"]}, "filename_prefix": prefix}}}}


async def post(client, path: str, body: str | bytes):
    resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    return resp.status, await resp.json()


async def test_a_hundred_thousand_nested_brackets_are_a_400_naming_the_limit_on_every_json_route(real):
    depth = 100_000
    bodies = ["[" * depth + "]" * depth, "{\"prompt\": " + "[" * depth + "]" * depth + "}", "[" * depth,
              "{\"prompt\": " + "{\"a\": " * depth + "1" + "}" * depth + "}"]
    for path in JSON_ROUTES:
        for body in bodies:
            status, answer = await post(real, path, body)
            assert status == 400, (path, answer)
            assert "nested deeper than" in json.dumps(answer) and "levels" in json.dumps(answer), answer


async def test_nesting_just_past_the_workflow_limit_is_refused_inside_the_prompt(real):
    deep = "[" * 64 + "]" * 64  # 66 levels in the workflow: within the body's allowance, past the workflow's
    doc = json.dumps(saving("ok"))[:-1] + ", \"meta\": {\"x\": " + deep + "}}"
    for path, body in (("/prompt", "{\"prompt\": " + doc + "}"), ("/nodegraph/import", doc)):
        status, answer = await post(real, path, body)
        assert status == 400 and "nested deeper than 64 levels" in json.dumps(answer), answer


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "9" * 5000])
async def test_numbers_json_cannot_carry_back_are_a_400(real, number):
    doc = json.dumps(saving("ok")).replace("\"cat.png\"}", "\"cat.png\", \"x\": " + number + "}")
    for path, body in (("/prompt", "{\"prompt\": " + doc + "}"), ("/nodegraph/import", doc)):
        status, answer = await post(real, path, body)
        assert status == 400, (number, answer)


@pytest.mark.parametrize("node", ["SaveImage", "SaveAnimation"])
async def test_a_file_prefix_that_leaves_the_output_folder_is_refused_at_validation(real, folders, node):
    for prefix in TRAVERSALS:
        resp = await real.post("/prompt", json={"prompt": saving(prefix, node)})
        body = await resp.json()
        assert resp.status == 400, (prefix, body)
        (error,) = body["node_errors"]["2"]["errors"]
        assert error["extra_info"]["input_name"] == "filename_prefix", error
        assert error["type"] == "unsafe_path" and error["message"], error
    assert not list(folders.output.iterdir()) and not (folders.output.parent / "escape").exists()


def test_file_prefixes_inside_the_folder_validate(folders):
    registry = ng.build_registry()
    (folders.input / "cat.png").write_bytes(png_bytes())
    for prefix in ALLOWED:
        plan = ng.compile_workflow(ng.workflow.from_json(saving(prefix)), registry, settings=folders.settings)
        assert [n.id for n in plan.order] == ["1", "2"], prefix


def test_the_workflow_api_names_the_node_input_and_reason(folders):
    registry = ng.build_registry()
    (folders.input / "cat.png").write_bytes(png_bytes())
    with pytest.raises(ng.ValidationFailed) as failed:
        ng.compile_workflow(ng.workflow.from_json(saving("%2e%2e%2fescape")), registry, settings=folders.settings)
    (error,) = failed.value.errors
    assert (error.node_id, error.input, error.code) == ("2", "filename_prefix", "unsafe_path")
    assert "'..' is not allowed" in error.message and "decoded" in error.message


async def test_a_symlink_out_of_the_output_folder_is_refused_at_validation(real, folders, tmp_path):
    (folders.output / "elsewhere").symlink_to(tmp_path)
    resp = await real.post("/prompt", json={"prompt": saving("elsewhere/x")})
    body = await resp.json()
    assert resp.status == 400 and "symbolic link" in body["node_errors"]["2"]["errors"][0]["message"]


async def test_load_image_names_and_upload_subfolders_that_leave_the_input_folder_are_refused(real):
    for name in ("../cat.png", "/etc/passwd", "%2e%2e/cat.png", "\u2025/cat.png"):
        wf = saving("ok")
        wf["nodes"]["1"]["inputs"]["image"] = name
        resp = await real.post("/prompt", json={"prompt": wf})
        body = await resp.json()
        assert resp.status == 400 and body["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "image"
    for subfolder in ("../..", "%2e%2e", "\u2025", "a\\b", "/abs"):
        resp = await real.post("/upload/image", data=image_form(png_bytes(), subfolder=subfolder))
        assert resp.status == 400, subfolder


async def test_graphs_deep_enough_to_exhaust_a_recursive_walk_are_answered(real):
    # a chain of 3000 nodes, each linking to the next id (the importer's layout once walked this recursively)
    n = 3000
    api = {str(i): {"class_type": "LatentUpscaleBy", "inputs": {"samples": [str(i + 1), 0],
                                                                "upscale_method": "nearest-exact", "scale_by": 1.0}}
           for i in range(1, n)}
    api[str(n)] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    status, answer = await post(real, "/nodegraph/import", json.dumps(api))
    assert status == 200 and len(answer["nodes"]) == n
    status, answer = await post(real, "/prompt", json.dumps({"prompt": api}))
    assert status == 400 and answer["error"]["message"]  # no output node; but an answer, not a 500
    ids = {"\u00b2": "superscript digit", "9" * 5000: "thousands of digits"}
    for nid in ids:
        doc = {"format": "nodegraph/workflow", "version": 1, "nodes": {nid: {"type": "EmptyLatentImage"}}}
        status, answer = await post(real, "/prompt", json.dumps({"prompt": doc}))
        assert status == 400, (ids[nid], answer)


async def test_every_answer_carries_the_browser_protections(real):
    for method, path in (("GET", "/"), ("GET", "/web/main.js"), ("GET", "/web/style.css"), ("GET", "/prompt"),
                         ("GET", "/web/nothing.js"), ("GET", "/view?filename=../x"), ("POST", "/prompt")):
        resp = await real.request(method, path, data=b"[" * 100)
        headers = resp.headers
        csp = headers["Content-Security-Policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "object-src 'none'", "base-uri 'none'",
                          "frame-ancestors 'none'"):
            assert directive in csp, (path, csp)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer", path
    refused = await real.post("/prompt", data=b"{}", headers={"Origin": "http://evil.example",
                                                               "Content-Type": "application/json"})
    assert refused.status == 403 and refused.headers["X-Frame-Options"] == "DENY"


async def test_a_host_header_cannot_write_into_the_policy(real):
    resp = await real.get("/", headers={"Host": "localhost:1;script-src *"})
    assert "script-src *" not in resp.headers.get("Content-Security-Policy", "")
