"""nodes.comfy.to_workflow: ComfyUI's core nodes as ours, ComfyUI node ids kept, and everything unsupported refused in
one error before anything runs."""

from __future__ import annotations

import json
import logging

import pytest

import nodegraph as ng
import nodes
from nodegraph import Link as L
from nodegraph import comfy_format as cf

from .docs import api, names, ui

to_workflow = nodes.comfy.to_workflow


def inputs(wf: ng.Workflow, nid: str) -> dict:
    return wf.nodes[nid].inputs


def test_text_to_image_maps_node_for_node():
    wf = to_workflow(api("txt2img"))
    assert {nid: n.type for nid, n in wf.nodes.items()} == {
        "3": "Sampler", "4": "LoadCheckpoint", "5": "EmptyLatent", "6": "CLIPEncode", "7": "CLIPEncode",
        "8": "VAEDecode", "9": "SaveImage"}
    assert inputs(wf, "3") == {"model": L("4", "model"), "positive": L("6", "conditioning"),
                               "negative": L("7", "conditioning"), "latent": L("5", "latent"), "seed": 42, "steps": 4,
                               "guidance": 3.0, "strength": 1.0, "sampler": "euler", "schedule": "default"}
    assert inputs(wf, "4") == {"ckpt": "demo-teacher"}
    assert inputs(wf, "5") == {"width": 128, "height": 128, "batch": 1}
    assert inputs(wf, "6") == {"clip": L("4", "clip"), "text": "a red circle on a blue background", "clip_skip": 0}
    assert inputs(wf, "8") == {"vae": L("4", "vae"), "latent": L("3", "latent")}
    assert inputs(wf, "9") == {"images": L("8", "image"), "filename_prefix": "comfy-t2i"}
    assert wf.nodes["6"].ui["title"] == "Positive"  # titles from _meta
    assert all("pos" in n.ui for n in wf.nodes.values())  # an API prompt has no layout: one is made


def test_denoise_becomes_strength_with_a_warning_on_the_step_count(caplog):
    with caplog.at_level(logging.WARNING, logger="nodes.comfy"):
        wf = to_workflow(api("img2img"))
    assert inputs(wf, "6")["strength"] == 0.6
    assert (inputs(wf, "6")["sampler"], inputs(wf, "6")["schedule"]) == ("dpmpp_2m", "karras")
    assert inputs(wf, "3") == {"vae": L("1", "vae"), "image": L("2", "image")}
    assert "5 steps of a 8-step schedule" in caplog.text and "3 of 5 steps" in caplog.text
    assert "upload" not in caplog.text  # the editor's upload button is no undeclared input


def test_vae_encode_for_inpaint_grows_the_mask_then_encodes():
    wf = to_workflow(api("inpaint_grow"))
    assert wf.nodes["3:mask"].type == "GrowMask" and inputs(wf, "3:mask") == {"mask": L("2", "mask"), "pixels": 8}
    assert wf.nodes["3"].type == "InpaintEncode"
    assert inputs(wf, "3") == {"vae": L("1", "vae"), "image": L("2", "image"), "mask": L("3:mask", "mask")}
    assert inputs(wf, "2") == {"image": "uploads/with-alpha.png"}  # a subfolder; ComfyUI's "[input]" mark dropped
    assert (inputs(wf, "6")["sampler"], inputs(wf, "6")["schedule"]) == ("ddim", "default")  # ddim_uniform


def test_set_latent_noise_mask_after_vae_encode_inpaints_that_image():
    wf = to_workflow(api("inpaint_noise_mask"))
    assert wf.nodes["5"].type == "InpaintEncode"
    assert inputs(wf, "5") == {"vae": L("1", "vae"), "image": L("2", "image"), "mask": L("3", "mask")}
    assert inputs(wf, "8")["latent"] == L("5", "latent") and inputs(wf, "8")["strength"] == 0.8
    assert (inputs(wf, "8")["sampler"], inputs(wf, "8")["schedule"]) == ("euler_ancestral", "default")  # simple


def test_lora_loaders_become_one_row_lora_stacks():
    wf = to_workflow(api("lora"))
    assert inputs(wf, "1") == {"ckpt": "sd15/dreamshaper.safetensors"}  # Windows separators become ours
    assert inputs(wf, "2") == {"model": L("1", "model"), "clip": L("1", "clip"), "loras": [
        {"lora": "styles/ink.safetensors", "strength_model": 0.8, "strength_clip": 0.6}]}
    # model only: LoRAStack also takes a CLIP, the one beside the model; strength_clip 0 leaves it as it was
    assert inputs(wf, "3") == {"model": L("2", "model"), "clip": L("2", "clip"), "loras": [
        {"lora": "detail.safetensors", "strength_model": 0.5, "strength_clip": 0.0}]}
    assert inputs(wf, "4")["clip"] == L("2", "clip") and inputs(wf, "7")["model"] == L("3", "model")
    assert inputs(wf, "7")["sampler"] == "dpmpp_2m_sde" and inputs(wf, "6")["batch"] == 2


def test_controlnet_apply_and_canny():
    wf = to_workflow(api("controlnet"))
    assert wf.nodes["6"].type == "LoadControlNet"
    assert inputs(wf, "6") == {"control_net": "control_v11p_sd15_canny.safetensors"}
    assert inputs(wf, "7") == {"conditioning": L("2", "conditioning"), "control_net": L("6", "control_net"),
                               "image": L("5", "image"), "strength": 0.9, "start_percent": 0.0, "end_percent": 1.0}
    assert inputs(wf, "5") == {"image": L("4", "image"), "low_threshold": 102, "high_threshold": 204}  # x 255
    assert inputs(wf, "9")["sampler"] == "unipc"


def test_controlnet_apply_advanced_controls_the_positive_and_passes_the_negative():
    wf = to_workflow(api("controlnet_advanced"))
    assert inputs(wf, "5") == {"control_net": "openpose/diff_control_sd15_openpose.safetensors"}
    assert wf.nodes["6"].type == "ControlNetApply"
    assert inputs(wf, "6") == {"conditioning": L("2", "conditioning"), "control_net": L("5", "control_net"),
                               "image": L("4", "image"), "strength": 0.75, "start_percent": 0.1, "end_percent": 0.8}
    assert inputs(wf, "8")["positive"] == L("6", "conditioning")
    assert inputs(wf, "8")["negative"] == L("3", "conditioning")  # output 1: the negative it was given
    assert (inputs(wf, "8")["sampler"], inputs(wf, "8")["schedule"]) == ("heun", "exponential")


def test_a_t2i_adapter_in_the_controlnet_folder_loads_as_one(tmp_path):
    folder = tmp_path / "controlnet" / "t2i-canny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter"}))
    settings = ng.Settings(models_dir=tmp_path)
    prompt = api("controlnet")
    prompt["6"]["inputs"]["control_net_name"] = "t2i-canny"
    prompt["20"] = {"class_type": "T2IAdapterLoader", "inputs": {"t2i_adapter_name": "t2i-canny"}}
    prompt["21"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["7", 0], "control_net": ["20", 0],
                                                                "image": ["5", 0], "strength": 0.5}}
    prompt["9"]["inputs"]["positive"] = ["21", 0]
    wf = to_workflow(prompt, settings=settings)
    assert wf.nodes["6"].type == wf.nodes["20"].type == "LoadT2IAdapter"
    assert inputs(wf, "6") == {"adapter": "t2i-canny"}
    assert wf.nodes["7"].type == wf.nodes["21"].type == "T2IAdapterApply"
    assert inputs(wf, "7") == {"conditioning": L("2", "conditioning"), "adapter": L("6", "adapter"),
                               "image": L("5", "image"), "strength": 0.9}
    # an adapter acts at every step: a window is refused
    prompt = api("controlnet_advanced")
    prompt["5"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "t2i-canny"}}
    with pytest.raises(cf.UnsupportedWorkflow, match="T2I-Adapter applies at every step"):
        to_workflow(prompt, settings=settings)


def test_lcm_sampler_with_model_sampling_lcm():
    wf = to_workflow(api("lcm"))
    assert "3" not in wf.nodes  # ModelSamplingDiscrete lcm: what our LCM sampler does anyway
    assert wf.nodes["7"].type == "LCMSampler" and wf.nodes["7:schedule"].type == "LCMScheduler"
    assert inputs(wf, "7:schedule") == {"model": L("2", "model"), "steps": 4}
    assert inputs(wf, "7") == {"model": L("2", "model"), "positive": L("4", "conditioning"),
                               "negative": L("5", "conditioning"), "latent": L("6", "latent"),
                               "schedule": L("7:schedule", "schedule"), "seed": 11, "guidance": 1.5, "strength": 1.0}


def test_clip_set_last_layer_becomes_the_encoders_clip_skip():
    wf = to_workflow(api("clip_skip"))
    assert "2" not in wf.nodes and inputs(wf, "1") == {"ckpt": "anime.safetensors"}  # CheckpointLoader
    assert inputs(wf, "3")["clip"] == inputs(wf, "4")["clip"] == L("1", "clip")
    assert inputs(wf, "3")["clip_skip"] == inputs(wf, "4")["clip_skip"] == 1  # stop_at_clip_layer -2
    assert inputs(wf, "5")["clip_skip"] == 0  # not through it: the last layer


def test_the_clip_layer_holds_through_a_lora_loader():
    prompt = api("clip_skip")
    prompt["2"]["inputs"]["stop_at_clip_layer"] = -3
    prompt["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["2", 0], "lora_name": "x",
                                                           "strength_model": 1.0, "strength_clip": 1.0}}
    prompt["3"]["inputs"]["clip"] = ["10", 1]
    wf = to_workflow(prompt)
    assert inputs(wf, "3") == {"clip": L("10", "clip"), "text": "a cat in a garden", "clip_skip": 2}
    assert inputs(wf, "10")["clip"] == L("1", "clip")


def test_hires_fix_upscales_the_latent_between_two_samplers():
    wf = to_workflow(api("hires_fix"))
    assert wf.nodes["6"].type == "LatentUpscale"
    assert inputs(wf, "6") == {"latent": L("5", "latent"), "method": "bislerp", "width": 192, "height": 192,
                               "crop": "disabled"}
    assert inputs(wf, "7")["latent"] == L("6", "latent") and inputs(wf, "7")["strength"] == 0.5


def test_outpainting_with_the_image_and_latent_utilities():
    wf = to_workflow(api("outpaint"))
    types = {nid: n.type for nid, n in wf.nodes.items()}
    assert types == {"1": "LoadCheckpoint", "2": "LoadVAE", "3": "LoadImage", "4": "ImageScaleToTotalPixels",
                     "5": "ImagePadForOutpaint", "6:mask": "GrowMask", "6": "InpaintEncode", "7": "CLIPEncode",
                     "8": "ConditioningZeroOut", "9": "FreeU", "10": "Sampler", "11": "LatentUpscaleBy",
                     "12": "VAEDecode", "13": "ImageScale", "14": "GrowMask", "15": "PreviewImage"}
    assert inputs(wf, "2") == {"vae": "vae-ft-mse-840000-ema-pruned.safetensors"}
    assert inputs(wf, "4") == {"image": L("3", "image"), "method": "area", "megapixels": 0.25}
    assert inputs(wf, "5") == {"image": L("4", "image"), "left": 64, "top": 0, "right": 64, "bottom": 0,
                               "feathering": 24}
    assert inputs(wf, "6:mask") == {"mask": L("5", "mask"), "pixels": 6}
    assert inputs(wf, "6") == {"vae": L("2", "vae"), "image": L("5", "image"), "mask": L("6:mask", "mask")}
    assert inputs(wf, "8") == {"conditioning": L("7", "conditioning")}
    assert inputs(wf, "9") == {"model": L("1", "model"), "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}
    # KSamplerAdvanced, run from the first step to the last with fresh noise, is a plain sampler
    assert inputs(wf, "10") == {"model": L("9", "model"), "positive": L("7", "conditioning"),
                                "negative": L("8", "conditioning"), "latent": L("6", "latent"), "seed": 77,
                                "steps": 20, "guidance": 5.0, "strength": 1.0, "sampler": "lms", "schedule": "beta"}
    assert inputs(wf, "11") == {"latent": L("10", "latent"), "method": "bilinear", "scale": 1.5}
    assert inputs(wf, "13") == {"image": L("12", "image"), "method": "lanczos", "width": 1024, "height": 512,
                                "crop": "center"}
    assert inputs(wf, "14") == {"mask": L("5", "mask"), "pixels": 4}


def test_everything_unsupported_is_refused_at_once():
    with pytest.raises(cf.UnsupportedWorkflow) as err:
        to_workflow(api("unsupported"))
    found = [(p.node_id, p.class_type, p.input) for p in err.value.problems]
    assert found == [("4", "ConditioningSetArea", None), ("6", "KSampler", "sampler_name"),
                     ("6", "KSampler", "scheduler"), ("7", "KSamplerAdvanced", "end_at_step"),
                     ("7", "KSamplerAdvanced", "return_with_leftover_noise"), ("8", "UpscaleModelLoader", None),
                     ("10", "ImageUpscaleWithModel", None)]
    message = str(err.value)
    assert "nothing ran (7 problems)" in message
    for text in ("node 4 (ConditioningSetArea)", "'dpmpp_3m_sde'", "'kl_optimal'",
                 "return_with_leftover_noise 'enable'", "node 8 (UpscaleModelLoader)"):
        assert text in message


def test_unsupported_values_of_supported_nodes_are_all_named():
    prompt = api("txt2img")
    extra = {
        "20": ("ModelSamplingDiscrete", {"model": ["4", 0], "sampling": "v_prediction", "zsnr": True}),
        "21": ("KSamplerAdvanced", {"add_noise": "disable", "noise_seed": 1, "steps": 20, "cfg": 7.0,
                                    "sampler_name": "lcm", "scheduler": "karras", "start_at_step": 3,
                                    "end_at_step": 10000, "return_with_leftover_noise": "disable"}),
        "22": ("KSampler", {"seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "ddim_uniform",
                            "denoise": 1.0}),
        "23": ("KSampler", {"seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "karras",
                            "denoise": 1.0}),
        "24": ("KSampler", {"seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": ["30", 0], "scheduler": "normal",
                            "denoise": 1.0}),
        "25": ("LoadImage", {"image": "ComfyUI_00001_.png [output]"}),
        "26": ("CLIPSetLastLayer", {"clip": ["4", 1], "stop_at_clip_layer": 0}),
        "27": ("Canny", {"image": ["25", 0], "low_threshold": 40, "high_threshold": 0.8}),
        "28": ("GrowMask", {"mask": ["25", 1], "expand": 3, "tapered_corners": True}),
        "29": ("SetLatentNoiseMask", {"samples": ["5", 0], "mask": ["25", 1]}),
        "30": ("LoraLoaderModelOnly", {"model": ["40", 0], "lora_name": "a", "strength_model": 1.0}),
        "40": ("UNETLoader", {"unet_name": "flux.safetensors", "weight_dtype": "default"}),
    }
    for nid, (class_type, values) in extra.items():
        prompt[nid] = {"class_type": class_type, "inputs": values}
    with pytest.raises(cf.UnsupportedWorkflow) as err:
        to_workflow(prompt)
    found = {(p.node_id, p.input) for p in err.value.problems}
    assert found == {("20", "sampling"), ("20", "zsnr"), ("21", "scheduler"), ("21", "add_noise"),
                     ("21", "start_at_step"), ("22", "scheduler"), ("23", "scheduler"), ("24", "sampler_name"),
                     ("25", "image"), ("26", "stop_at_clip_layer"), ("27", "low_threshold"),
                     ("28", "tapered_corners"), ("29", "samples"), ("30", "model"), ("40", None)}
    message = str(err.value)
    assert "scheduler 'karras' is not available with sampler 'ddim'" in message
    assert "scheduler 'karras' with the lcm sampler" in message
    assert "comes from a link" in message


def test_inputs_a_comfy_node_does_not_declare_are_ignored_with_a_warning(caplog):
    prompt = api("txt2img")
    prompt["3"]["inputs"]["sharpness"] = 2
    with caplog.at_level(logging.WARNING, logger="nodes.comfy"):
        wf = to_workflow(prompt)
    assert "sharpness" not in inputs(wf, "3")
    assert "node 3 (KSampler) has no input 'sharpness': ignored" in caplog.text


def test_a_link_to_an_output_the_node_lacks_is_reported():
    prompt = api("txt2img")
    prompt["8"]["inputs"]["vae"] = ["4", 5]
    with pytest.raises(cf.UnsupportedWorkflow, match=r"links to output 5 of node 4 \(CheckpointLoaderSimple\), "
                                                     r"which has 3 outputs"):
        to_workflow(prompt)


def test_pass_through_nodes_without_their_input_or_in_a_loop_are_reported():
    prompt = api("clip_skip")
    del prompt["2"]["inputs"]["clip"]
    with pytest.raises(cf.UnsupportedWorkflow, match=r"node 2 \(CLIPSetLastLayer\), which passes on an input it "
                                                     r"was not given"):
        to_workflow(prompt)
    prompt["2"]["inputs"]["clip"] = ["20", 0]
    prompt["20"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["2", 0], "stop_at_clip_layer": -1}}
    with pytest.raises(cf.UnsupportedWorkflow, match="goes round in a loop"):
        to_workflow(prompt)


def test_editor_layout_is_kept_and_added_nodes_sit_by_theirs():
    prompt, data = cf.ui_to_api(ui("inpaint_grow"), nodes.comfy.widget_names)
    wf = to_workflow(prompt, data)
    assert wf.nodes["3"].ui == {"pos": [350, 300]}
    assert wf.nodes["3:mask"].ui == {"pos": [350, 140]}  # just above its VAEEncodeForInpaint


def test_every_editor_fixture_converts_as_its_api_twin():
    twins = {"txt2img": "txt2img", "img2img": "img2img", "lcm": "lcm", "inpaint_grow": "inpaint_grow",
             "primitive_reroute": None, "muted_bypassed": None, "subgraph": None, "object_widgets": None,
             "controlnet_clip_skip": None}
    assert set(twins) == set(names("ui"))
    for name, twin in twins.items():
        prompt, data = cf.ui_to_api(ui(name), nodes.comfy.widget_names)
        wf = to_workflow(prompt, data)
        if twin:
            expected = to_workflow(api(twin))
            assert {k: (n.type, n.inputs) for k, n in wf.nodes.items()} == \
                   {k: (n.type, n.inputs) for k, n in expected.nodes.items()}, name


def test_controlnet_and_clip_skip_from_the_editor():
    prompt, data = cf.ui_to_api(ui("controlnet_clip_skip"), nodes.comfy.widget_names)
    wf = to_workflow(prompt, data)
    assert inputs(wf, "3")["clip_skip"] == inputs(wf, "4")["clip_skip"] == 1
    assert inputs(wf, "7")["start_percent"] == 0.1 and inputs(wf, "9")["negative"] == L("4", "conditioning")


RUNNABLE = {"txt2img", "img2img", "inpaint_grow", "inpaint_noise_mask", "hires_fix", "primitive_reroute",
            "muted_bypassed", "subgraph", "object_widgets"}


@pytest.mark.parametrize("kind,name", [("api", n) for n in names("api") if n != "unsupported"]
                         + [("ui", n) for n in names("ui")])
def test_every_fixture_gives_a_workflow_the_registry_accepts(kind, name, settings):
    """What the mapping writes are real node types, inputs and outputs of ours: validation only misses the model
    files these fixtures name (which the tests do not have)."""
    wf, fmt = cf.load_document(api(name) if kind == "api" else ui(name), nodes, settings=settings)
    assert fmt == f"comfy_{kind}"
    if name in RUNNABLE:  # on the demo model, with the test pictures: nothing missing
        ng.compile_workflow(wf, ng.build_registry(), settings=settings)
        return
    try:
        ng.compile_workflow(wf, ng.build_registry(), settings=settings)
    except ng.ValidationFailed as failed:
        assert {e.code for e in failed.errors} <= {"not_an_option"}, failed.errors
        assert all(e.input in ("ckpt", "vae", "control_net", "loras", "image") for e in failed.errors), failed.errors


def test_the_readme_counts_the_fixtures_that_import():
    from pathlib import Path

    counts = {}
    for kind in ("api", "ui"):
        imported = 0
        for name in names(kind):
            try:
                cf.load_document(api(name) if kind == "api" else ui(name), nodes)
                imported += 1
            except cf.UnsupportedWorkflow:
                pass
        counts[kind] = (imported, len(names(kind)))
    total = tuple(map(sum, zip(*counts.values())))
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8").split())
    assert (f"{total[0]} of {total[1]} import ({counts['api'][0]} of {counts['api'][1]} API prompts, "
            f"{counts['ui'][0]} of {counts['ui'][1]} editor files)") in readme


def test_conditioning_combine_maps_to_ours_and_back():
    from nodes.comfy import to_api

    prompt = api("txt2img")
    positive = next(k for k, v in prompt.items() if v["class_type"] == "CLIPTextEncode")
    prompt["90"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "an oil painting", "clip": prompt[positive]
                                                               ["inputs"]["clip"]}}
    prompt["91"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": [positive, 0],
                                                                   "conditioning_2": ["90", 0]}}
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    prompt[sampler]["inputs"]["positive"] = ["91", 0]
    wf = to_workflow(prompt)
    assert wf.nodes["91"].type == "ConditioningCombine"
    assert inputs(wf, "91") == {"conditioning_1": L(positive, "conditioning"),
                                "conditioning_2": L("90", "conditioning")}
    exported = to_api(wf)["91"]
    assert (exported["class_type"], exported["inputs"]) == ("ConditioningCombine", {"conditioning_1": [positive, 0],
                                                                                    "conditioning_2": ["90", 0]})
