"""nodes.comfy.to_api: our workflows in ComfyUI's API format, and round trips through the importer."""

from __future__ import annotations

import pytest

import nodegraph as ng
import nodes
from nodegraph import Link as L
from nodegraph import comfy_format as cf
from nodegraph.assets import workflows_dir

from .docs import api, graph

to_api, to_workflow = nodes.comfy.to_api, nodes.comfy.to_workflow


#: ComfyUI names that import as the same thing of ours, and the one of them that is written back
SAME = {"simple": "normal", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde", "uni_pc_bh2": "uni_pc"}


def as_imported(prompt: dict) -> dict:
    """A prompt's graph with file names as the importer writes them ('/' separators, no "[input]" mark), the names
    that import alike as the one written back, without the editor's upload button."""
    out = {}
    for nid, (class_type, inputs) in graph(prompt).items():
        clean = {k: (SAME.get(v, v.replace("\\", "/").removesuffix(" [input]")) if isinstance(v, str) else v)
                 for k, v in inputs.items() if k != "upload"}
        out[nid] = (class_type, clean)
    return out


@pytest.mark.parametrize("name", ["txt2img", "img2img", "inpaint_grow", "inpaint_noise_mask", "lora", "controlnet",
                                  "controlnet_advanced", "hires_fix"])
def test_a_round_trip_gives_back_the_same_graph(name):
    expected = as_imported(api(name))
    if name == "controlnet_advanced":  # ComfyUI's ControlNetLoader reads what its DiffControlNetLoader read
        expected["5"] = ("ControlNetLoader", {"control_net_name": expected["5"][1]["control_net_name"]})
    assert graph(to_api(to_workflow(api(name)))) == expected


def test_round_trip_of_the_nodes_that_vanish_on_import():
    # ModelSamplingDiscrete lcm: the KSampler takes the model it was given
    back = to_api(to_workflow(api("lcm")))
    assert "3" not in back and "7:schedule" not in back
    assert back["7"]["inputs"] == {**api("lcm")["7"]["inputs"], "model": ["2", 0]}
    # CLIPSetLastLayer: one per CLIP and layer, named after the first encoder through it
    back = to_api(to_workflow(api("clip_skip")))
    assert back["3:clip"]["inputs"] == {"stop_at_clip_layer": -2, "clip": ["1", 1]}
    assert back["3"]["inputs"]["clip"] == back["4"]["inputs"]["clip"] == ["3:clip", 0]
    assert back["5"]["inputs"]["clip"] == ["1", 1] and back["1"]["class_type"] == "CheckpointLoaderSimple"
    # KSamplerAdvanced as it is supported is a KSampler; FreeU, ImagePadForOutpaint, GrowMask... map back as they are
    back = to_api(to_workflow(api("outpaint")))
    original = as_imported(api("outpaint"))
    assert back["10"]["class_type"] == "KSampler"
    assert back["10"]["inputs"] == {"seed": 77, "steps": 20, "cfg": 5.0, "sampler_name": "lms", "scheduler": "beta",
                                    "denoise": 1.0, "model": ["9", 0], "positive": ["7", 0], "negative": ["8", 0],
                                    "latent_image": ["6", 0]}
    assert {k: v for k, v in graph(back).items() if k != "10"} == {k: v for k, v in original.items() if k != "10"}


def test_our_example_workflows_export():
    for name in ("text-to-image", "teacher-ddim", "image-to-image", "lcm-lora", "controlnet-canny", "t2i-adapter"):
        wf = ng.load(workflows_dir() / f"{name}.json")
        prompt = to_api(wf)
        assert cf.detect(prompt) == "comfy_api"
        again = to_workflow(prompt)  # and back: what ComfyUI would run, we read
        assert set(again.nodes) >= {nid for nid, n in wf.nodes.items()
                                    if n.type not in ("LCMScheduler", "Integer", "Number", "Text")}, name
    prompt = to_api(ng.load(workflows_dir() / "text-to-image.json"))
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert (sampler["inputs"]["sampler_name"], sampler["inputs"]["scheduler"], sampler["inputs"]["steps"]) == \
        ("lcm", "sgm_uniform", 4)


def test_the_types_that_do_not_map_back_are_named():
    wf = to_workflow(api("txt2img"))
    wf.add("20", "LoadIPAdapter", ip_adapter="ip.safetensors")
    wf.add("21", "EmptyLatentVideo")
    wf.nodes["4"].inputs["base"] = "demo-lcm"
    with pytest.raises(cf.UnsupportedWorkflow) as err:
        to_api(wf)
    assert [(p.node_id, p.class_type) for p in err.value.problems] == [("20", "LoadIPAdapter"),
                                                                       ("21", "EmptyLatentVideo")]
    assert "cannot be written in ComfyUI's API format" in str(err.value)
    del wf.nodes["20"], wf.nodes["21"]
    wf.nodes["3"].inputs.update(sampler="tcd", eta=0.3)
    with pytest.raises(cf.UnsupportedWorkflow) as err:
        to_api(wf)
    assert {(p.node_id, p.input) for p in err.value.problems} == {("4", "base"), ("3", "sampler"), ("3", "eta")}


def test_a_sampler_without_negative_gets_an_empty_prompt():
    wf = to_workflow(api("txt2img"))
    del wf.nodes["3"].inputs["negative"], wf.nodes["7"]
    wf.nodes["6"].inputs["clip_skip"] = 1
    prompt = to_api(wf)
    assert prompt["3"]["inputs"]["negative"] == ["3:negative", 0]
    assert prompt["3:negative"]["inputs"] == {"text": "", "clip": ["6:clip", 0]}  # the positive's CLIP and layer


def test_windowed_controlnets_chain_their_negatives():
    wf = to_workflow(api("controlnet_advanced"))
    wf.add("20", "ControlNetApply", conditioning=L("6", "conditioning"), control_net=L("5", "control_net"),
           image=L("4", "image"), strength=0.5, start_percent=0.0, end_percent=0.5)
    wf.nodes["8"].inputs["positive"] = L("20", "conditioning")
    prompt = to_api(wf)
    assert prompt["6"]["inputs"]["negative"] == ["3", 0]
    assert prompt["20"]["inputs"]["positive"] == ["6", 0] and prompt["20"]["inputs"]["negative"] == ["6", 1]
    assert prompt["8"]["inputs"]["negative"] == ["20", 1]
    wf.nodes["8"].inputs["positive"] = L("2", "conditioning")  # the windowed ones now feed no sampler
    with pytest.raises(cf.UnsupportedWorkflow, match="feeds no sampler's positive"):
        to_api(wf)


def test_primitives_are_written_into_their_users_and_stacks_into_chains():
    wf = to_workflow(api("lora"))
    wf.add("30", "Integer", value=99)
    wf.nodes["7"].inputs["seed"] = L("30", "value")
    wf.nodes["2"].inputs["loras"].append({"lora": "b.safetensors", "strength_model": 0.3, "strength_clip": 0.2})
    wf.add("31", "LoRAStack", model=L("1", "model"), clip=L("1", "clip"), loras=[])
    wf.nodes["5"].inputs["clip"] = L("31", "clip")
    prompt = to_api(wf)
    assert "30" not in prompt and prompt["7"]["inputs"]["seed"] == 99
    assert prompt["2:1"]["inputs"] == {"model": ["2", 0], "clip": ["2", 1], "lora_name": "b.safetensors",
                                       "strength_model": 0.3, "strength_clip": 0.2}
    assert prompt["4"]["inputs"]["clip"] == ["2:1", 1] and prompt["3"]["inputs"]["model"] == ["2:1", 0]
    assert "31" not in prompt and prompt["5"]["inputs"]["clip"] == ["1", 1]  # an empty stack passes through
    assert prompt["3"]["class_type"] == "LoraLoaderModelOnly"
