"""The ``nodegraph`` command with ComfyUI's files: ``run`` and ``validate`` take either ComfyUI format (JSON, or a
PNG ComfyUI saved), ``import`` writes ours (layout, titles, groups and notes kept), ``export --comfy-api`` writes
ComfyUI's API format back."""

from __future__ import annotations

import json

import pytest
from PIL import Image, PngImagePlugin

import nodegraph as ng
from nodegraph import cli

from . import prompts
from .conftest import decoded, is_square


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default folders are relative: keep them in the test's folder
    (tmp_path / "models").mkdir()
    return ["--models", str(tmp_path / "models"), "--device", "cpu"]


def write(path, document) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def test_validate_and_run_take_a_comfyui_api_prompt(tmp_path, folders, capsys):
    path = write(tmp_path / "api.json", prompts.text_to_image("cli-api"))
    assert cli.main(["validate", path, *folders]) == 0
    assert "node(s) would run" in capsys.readouterr().out
    out = tmp_path / "out"
    assert cli.main(["run", path, "--no-progress", "--output", str(out), "--set", "3.seed=11", *folders]) == 0
    [image] = out.glob("cli-api*.png")
    assert is_square(decoded(image.read_bytes()))


def test_run_takes_a_png_comfyui_saved(tmp_path, folders, capsys):
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(prompts.text_to_image("cli-png")))
    info.add_text("workflow", json.dumps(prompts.comfy_ui_workflow()))
    path = tmp_path / "ComfyUI_00001_.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--no-progress", "--output", str(out), *folders]) == 0
    assert list(out.glob("cli-png*.png"))  # the API prompt ran: it is what ComfyUI ran


def test_import_writes_our_format_keeping_layout_titles_groups_and_notes(tmp_path, folders, capsys):
    path = write(tmp_path / "comfy-small.json", prompts.comfy_ui_workflow())
    assert cli.main(["import", path, *folders]) == 0
    target = tmp_path / "comfy-small.nodegraph.json"
    assert f"wrote {target}" in capsys.readouterr().out
    wf = ng.load(target)
    assert {"3", "4", "5", "6", "7", "8", "9"} <= set(wf.nodes)
    assert wf.nodes["6"].ui["title"] == "Positive" and wf.nodes["6"].ui["pos"] == [400, 60]
    assert [g["title"] for g in wf.groups] == ["Sampling"]
    assert "drawn by hand" in json.dumps(wf.notes)
    # what it wrote runs as our own format
    assert cli.main(["validate", str(target), *folders]) == 0


def test_import_of_an_api_prompt_lays_it_out_and_takes_o(tmp_path, folders, capsys):
    path = write(tmp_path / "api.json", prompts.text_to_image())
    target = tmp_path / "elsewhere.json"
    assert cli.main(["import", path, "-o", str(target), *folders]) == 0
    wf = ng.load(target)
    assert all(isinstance(n.ui.get("pos"), list) for n in wf.nodes.values())
    assert wf.nodes["4"].ui["pos"][0] < wf.nodes["9"].ui["pos"][0]


def test_export_writes_comfyui_s_api_format_that_imports_back(tmp_path, folders, capsys):
    ours = tmp_path / "ours.nodegraph.json"
    assert cli.main(["import", write(tmp_path / "api.json", prompts.text_to_image("round-trip")), "-o", str(ours),
                     *folders]) == 0
    assert cli.main(["export", str(ours), "--comfy-api", *folders]) == 0
    exported = json.loads((tmp_path / "ours.comfy-api.json").read_text())
    assert all({"class_type", "inputs"} <= set(node) for node in exported.values())
    types = {node["class_type"] for node in exported.values()}
    assert {"CheckpointLoaderSimple", "SaveImage"} <= types
    assert cli.main(["validate", str(tmp_path / "ours.comfy-api.json"), *folders]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(ours), "--comfy-api", "-o", "-", *folders]) == 0
    assert json.loads(capsys.readouterr().out) == exported


def test_unsupported_nodes_are_listed_and_exit_2(tmp_path, folders, capsys):
    prompt = prompts.text_to_image()
    prompt["20"] = {"class_type": "SomeCustomUpscaler", "inputs": {"image": ["8", 0]}}
    prompt["21"] = {"class_type": "AnotherCustomNode", "inputs": {}}
    path = write(tmp_path / "custom.json", prompt)
    for command in ("validate", "run", "import"):
        assert cli.main([command, path, *folders]) == 2
        err = capsys.readouterr().err
        assert "SomeCustomUpscaler" in err and "AnotherCustomNode" in err, command
    assert not (tmp_path / "custom.nodegraph.json").exists()
