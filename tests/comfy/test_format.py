"""nodegraph.comfy_format: which format a document is, and ComfyUI's editor format turned into its API format as the
browser does before queueing (primitives, reroutes, muted and bypassed nodes, notes, groups, subgraphs)."""

from __future__ import annotations

import json

import pytest

import nodegraph as ng
import nodes
from nodegraph import comfy_format as cf
from nodegraph.assets import workflows_dir

from .docs import api, graph, ui

widget_names = nodes.comfy.widget_names


def to_api(doc: dict) -> tuple[dict, dict]:
    return cf.ui_to_api(doc, widget_names)


# --- detect ----------------------------------------------------------------------------------------------------------


def test_detect_tells_the_three_formats_apart():
    ours = json.loads((workflows_dir() / "text-to-image.json").read_text())
    assert cf.detect(ours) == "nodegraph"
    assert cf.detect(api("txt2img")) == "comfy_api"
    assert cf.detect(ui("txt2img")) == "comfy_ui"  # version 0.4, links as arrays
    assert cf.detect(ui("img2img")) == "comfy_ui"  # schema 1, links as objects


@pytest.mark.parametrize("doc", [[], {}, "text", {"prompt": {"3": {"class_type": "KSampler"}}}, {"nodes": {}},
                                 {"format": "other"}, {"3": {"inputs": {}}}])
def test_detect_refuses_other_documents_saying_what_was_expected(doc):
    with pytest.raises(ng.WorkflowError) as err:
        cf.detect(doc)
    message = str(err.value)
    assert "nodegraph/workflow" in message and "class_type" in message and "links" in message


# --- from the editor's format to the API format -----------------------------------------------------------------------


def test_editor_text_to_image_is_its_api_prompt():
    prompt, _ = to_api(ui("txt2img"))
    assert graph(prompt) == graph(api("txt2img"))
    assert prompt["6"]["_meta"]["title"] == "Positive"


def test_schema_1_links_as_objects_and_widgets_listed_as_inputs():
    prompt, _ = to_api(ui("img2img"))
    expected = graph(api("img2img"))
    del expected["2"][1]["upload"]  # the upload button is no input of LoadImage
    assert graph(prompt) == expected


def test_a_primitive_node_sets_the_seed_it_feeds():
    prompt, _ = to_api(ui("primitive_reroute"))
    assert prompt["3"]["inputs"]["seed"] == 1234  # the primitive's value, not the stale 42 of the sampler's widget
    assert "20" not in prompt and all(n["class_type"] != "PrimitiveNode" for n in prompt.values())


def test_reroute_chains_are_followed_to_the_real_output():
    prompt, _ = to_api(ui("primitive_reroute"))
    assert prompt["8"]["inputs"]["vae"] == ["4", 2]  # through two reroutes
    assert prompt["3"]["inputs"]["model"] == ["4", 0]
    assert not {"30", "31", "32"} & set(prompt)


def test_bypassed_nodes_pass_their_matching_input_through():
    prompt, _ = to_api(ui("muted_bypassed"))
    assert not {"11", "12"} & set(prompt)  # a bypassed LoRA loader, then a bypassed FreeU
    assert prompt["3"]["inputs"]["model"] == ["4", 0]  # MODEL through both
    assert prompt["6"]["inputs"]["clip"] == prompt["7"]["inputs"]["clip"] == ["4", 1]  # CLIP: the loader's 2nd input


def test_a_muted_node_goes_with_what_it_feeds_and_what_only_feeds_it():
    prompt, _ = to_api(ui("muted_bypassed"))
    # 13 is muted; 15 saves its output (cannot run); 14 only fed 13 (never runs in ComfyUI): all three go, and the
    # rest is an ordinary text-to-image that imports although 13 and 14 are types nodegraph does not have
    assert not {"13", "14", "15"} & set(prompt)
    assert set(prompt) == {"3", "4", "5", "6", "7", "8", "9"}
    nodes.comfy.to_workflow(prompt)


def test_notes_and_groups_are_kept_as_editor_data():
    prompt, data = to_api(ui("txt2img"))
    assert "10" not in prompt
    assert data["notes"] == [{"text": "Made for the demo teacher: 4 Euler steps at guidance 3.", "pos": [26, 200]}]
    assert data["groups"][0]["title"] == "Prompts" and data["groups"][0]["bounding"] == [400, 100, 380, 420]
    assert data["nodes"]["6"] == {"pos": [415, 186], "title": "Positive"}
    wf = nodes.comfy.to_workflow(prompt, data)
    assert wf.notes == data["notes"] and wf.groups == data["groups"]
    assert wf.nodes["6"].ui == {"pos": [415, 186], "title": "Positive"}
    assert wf.nodes["3"].ui == {"pos": [863, 186]}


def test_a_subgraph_is_flattened_with_ids_prefixed_by_its_node():
    prompt, data = to_api(ui("subgraph"))
    assert set(prompt) == {"3", "4", "5", "8", "9", "10:1", "10:2"}
    assert prompt["10:1"]["inputs"] == {"text": "a purple square on a yellow background", "clip": ["4", 1]}
    assert prompt["10:2"]["inputs"] == {"text": "blurry", "clip": ["4", 1]}
    assert prompt["3"]["inputs"]["positive"] == ["10:1", 0] and prompt["3"]["inputs"]["negative"] == ["10:2", 0]
    # the inner nodes are placed where the subgraph's node was
    assert data["nodes"]["10:1"]["pos"] == [420, 200] and data["nodes"]["10:2"]["pos"] == [420, 450]


def _subgraph(sid: str, nodes_: list, links: list, inputs: list, outputs: list) -> dict:
    return {"id": sid, "name": sid, "nodes": nodes_, "inputs": inputs, "outputs": outputs,
            "links": [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
                      for link in links]}


def _node(nid, type_, inputs=(), outputs=(), widgets=None, pos=(0, 0), mode=0):
    node = {"id": nid, "type": type_, "pos": list(pos), "mode": mode,
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs]}
    if widgets is not None:
        node["widgets_values"] = widgets
    return node


def test_nested_subgraphs_and_inputs_passed_straight_to_outputs():
    inner = _subgraph("inner", [_node(1, "CLIPTextEncode", [("clip", "CLIP", 1)], [("C", "CONDITIONING", [2])],
                                      ["a nested prompt"])],
                      [[1, -10, 0, 1, 0, "CLIP"], [2, 1, 0, -20, 0, "CONDITIONING"]],
                      [{"name": "clip", "type": "CLIP"}], [{"name": "c", "type": "CONDITIONING"}])
    outer = _subgraph("outer", [_node(5, "inner", [("clip", "CLIP", 3)], [("c", "CONDITIONING", [4])])],
                      [[3, -10, 0, 5, 0, "CLIP"], [4, 5, 0, -20, 0, "CONDITIONING"], [5, -10, 0, -20, 1, "CLIP"]],
                      [{"name": "clip", "type": "CLIP"}],
                      [{"name": "c", "type": "CONDITIONING"}, {"name": "clip", "type": "CLIP"}])
    doc = {"version": 0.4, "definitions": {"subgraphs": [inner, outer]},
           "nodes": [_node(4, "CheckpointLoaderSimple", [], [("MODEL", "MODEL", None), ("CLIP", "CLIP", [1]),
                                                             ("VAE", "VAE", None)], ["demo-lcm"]),
                     _node(10, "outer", [("clip", "CLIP", 1)], [("c", "CONDITIONING", [2]), ("clip", "CLIP", [3])]),
                     _node(11, "CLIPTextEncode", [("clip", "CLIP", 3)], [("C", "CONDITIONING", None)], ["outside"]),
                     _node(12, "ConditioningZeroOut", [("conditioning", "CONDITIONING", 2)], [])],
           "links": [[1, 4, 1, 10, 0, "CLIP"], [2, 10, 0, 12, 0, "CONDITIONING"], [3, 10, 1, 11, 0, "CLIP"]]}
    prompt, _ = to_api(doc)
    assert prompt["10:5:1"]["inputs"] == {"text": "a nested prompt", "clip": ["4", 1]}
    assert prompt["12"]["inputs"] == {"conditioning": ["10:5:1", 0]}
    assert prompt["11"]["inputs"]["clip"] == ["4", 1]  # an input passed straight to an output


def test_a_subgraph_that_contains_itself_is_refused():
    loop = _subgraph("loop", [_node(1, "loop")], [], [], [])
    doc = {"version": 0.4, "links": [], "definitions": {"subgraphs": [loop]}, "nodes": [_node(1, "loop")]}
    with pytest.raises(ng.WorkflowError, match="contains itself"):
        to_api(doc)


def test_widgets_values_saved_as_an_object_are_taken_by_name():
    prompt, _ = to_api(ui("object_widgets"))
    assert prompt["3"]["inputs"]["seed"] == 5 and "control_after_generate" not in prompt["3"]["inputs"]
    assert prompt["5"]["inputs"] == {"width": 128, "height": 128, "batch_size": 1}
    assert prompt["6"]["inputs"]["text"] == "a white triangle on a red background"


def test_widgets_values_saved_without_the_editor_only_entries():
    doc = {"version": 0.4, "links": [], "nodes": [_node(3, "KSampler", widgets=[42, 4, 3.0, "euler", "normal", 1.0])]}
    prompt, _ = to_api(doc)
    assert prompt["3"]["inputs"] == {"seed": 42, "steps": 4, "cfg": 3.0, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1.0}


def test_types_the_library_does_not_know_keep_their_links_for_it_to_refuse():
    doc = {"version": 0.4, "links": [[1, 1, 0, 2, 0, "IMAGE"]],
           "nodes": [_node(1, "LoadImage", [], [("IMAGE", "IMAGE", [1])], ["picture.png", "image"]),
                     _node(2, "MyCustomUpscaler", [("image", "IMAGE", 1)], [], [4, "lanczos"])]}
    prompt, _ = to_api(doc)
    assert prompt["2"] == {"class_type": "MyCustomUpscaler", "inputs": {"image": ["1", 0]},
                           "_meta": {"title": "MyCustomUpscaler"}}
    with pytest.raises(cf.UnsupportedWorkflow) as err:
        nodes.comfy.to_workflow(prompt)
    assert [(p.node_id, p.class_type) for p in err.value.problems] == [("2", "MyCustomUpscaler")]


def test_the_engine_takes_widget_names_from_any_library():
    doc = {"version": 0.4, "links": [], "nodes": [_node(1, "Toy", widgets=[3, "fixed", 5])]}
    prompt, _ = cf.ui_to_api(doc, lambda t: ["a", "control_after_generate", "b"] if t == "Toy" else None)
    assert prompt["1"]["inputs"] == {"a": 3, "b": 5}


# --- loading any document ---------------------------------------------------------------------------------------------


def test_load_document_reads_all_three_formats():
    ours = json.loads((workflows_dir() / "text-to-image.json").read_text())
    wf, fmt = cf.load_document(ours, ng.NoLibrary())
    assert fmt == "nodegraph" and wf.nodes["1"].type == "LoadCheckpoint"
    wf, fmt = cf.load_document(api("txt2img"), nodes)
    assert fmt == "comfy_api" and wf.nodes["3"].type == "Sampler"
    wf, fmt = cf.load_document(json.dumps(ui("txt2img")), nodes)  # text is parsed first
    assert fmt == "comfy_ui" and wf.nodes["3"].type == "Sampler" and wf.notes


def test_a_library_without_comfy_support_says_so():
    assert ng.NoLibrary.comfy is None
    with pytest.raises(ng.WorkflowError, match="this node library cannot read ComfyUI workflows"):
        cf.load_document(api("txt2img"), ng.NoLibrary())


def test_untrusted_documents_are_bounded():
    deep: dict = {"x": 1}
    for _ in range(100):
        deep = {"x": deep}
    with pytest.raises(ng.WorkflowError, match="nested deeper"):
        cf.load_document({"1": {"class_type": "KSampler", "inputs": deep}}, nodes)
    with pytest.raises(ng.WorkflowError, match="over the limit"):
        cf.load_document(api("txt2img"), nodes, limits=ng.Limits(max_nodes=3))
    with pytest.raises(ng.WorkflowError, match="over 3 nodes"):
        cf.ui_to_api(ui("txt2img"), widget_names, ng.Limits(max_nodes=3))


def test_an_api_link_to_a_node_that_is_not_there_is_refused():
    prompt = api("txt2img")
    prompt["3"]["inputs"]["model"] = ["40", 0]
    with pytest.raises(ng.WorkflowError, match="links to node 40"):
        cf.load_document(prompt, nodes)


def test_links_saved_by_id_or_with_empty_entries_are_read():
    doc = ui("txt2img")
    doc["links"] = {str(link[0]): link for link in doc["links"]} | {"99": None}
    prompt, _ = to_api(doc)
    assert graph(prompt) == graph(api("txt2img"))


def test_a_widget_promoted_onto_a_subgraph_node_sets_the_inner_widget():
    sampler = _node(1, "KSampler", [("seed", "INT", 1)], [("LATENT", "LATENT", None)],
                    [42, "fixed", 4, 3.0, "euler", "normal", 1.0])
    sampler["inputs"][0]["widget"] = {"name": "seed"}
    inner = _subgraph("sampling", [sampler], [[1, -10, 0, 1, 0, "INT"]], [{"name": "seed", "type": "INT"}], [])
    outer = _node(7, "sampling", [("seed", "INT", None)], [], [777])
    outer["inputs"][0]["widget"] = {"name": "seed"}
    doc = {"version": 0.4, "links": [], "definitions": {"subgraphs": [inner]}, "nodes": [outer]}
    prompt, _ = to_api(doc)
    assert prompt["7:1"]["inputs"]["seed"] == 777 and prompt["7:1"]["inputs"]["steps"] == 4
    del outer["widgets_values"]  # no value on the subgraph's node: the inner widget keeps its own
    prompt, _ = to_api(doc)
    assert prompt["7:1"]["inputs"]["seed"] == 42
