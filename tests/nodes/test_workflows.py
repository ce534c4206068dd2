"""The shipped example workflows run, and the image nodes behave as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L
from nodegraph.assets import shipped_workflows, workflows_dir
from nodes.images import read_workflow_from_png

# What the example workflows name (real SD1.5 files, the embedded demo model), and what the tests use instead.
TINY_LORAS = {"lcm-lora-sdv1-5.safetensors": "wf/lcm-lora.safetensors",
              "lcm-lora-sdxl.safetensors": "wf/lcm-lora-sdxl.safetensors"}
TINY_STYLE_LORA = "wf/style.safetensors"


@pytest.fixture(scope="module", autouse=True)
def workflow_models(models_root):
    """Tiny stand-ins for the adapters the example workflows name, in the test models folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from nodes.testing.tiny_adapters import (
        build_tiny_controlnet,
        build_tiny_image_encoder,
        build_tiny_motion_adapter,
        build_tiny_t2i_adapter,
        write_tiny_ip_adapter,
        write_tiny_lora,
    )
    from nodes.testing.tiny_families import (
        build_tiny_consistency,
        build_tiny_ldm_super_resolution,
        build_tiny_ldm_text2im,
    )

    sd = models_root / "checkpoints" / "tiny-sd"
    if not (models_root / "loras" / TINY_STYLE_LORA).exists():
        pipe = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
        write_tiny_lora(pipe.unet, pipe.text_encoder, models_root / "loras" / TINY_LORAS["lcm-lora-sdv1-5.safetensors"],
                        fmt="kohya", rank=8, alpha=8.0, seed=16, text=False, everywhere=True, std=0.1)
        write_tiny_lora(pipe.unet, pipe.text_encoder, models_root / "loras" / TINY_STYLE_LORA, fmt="peft", rank=4,
                        seed=17)
        xl = StableDiffusionXLPipeline.from_pretrained(models_root / "checkpoints" / "tiny-sdxl", local_files_only=True)
        write_tiny_lora(xl.unet, xl.text_encoder, models_root / "loras" / TINY_LORAS["lcm-lora-sdxl.safetensors"],
                        fmt="peft", rank=4, seed=22, text=False, everywhere=True, std=0.1)
        build_tiny_controlnet(sd, models_root / "controlnet" / "wf-cn", seed=18)
        build_tiny_t2i_adapter(models_root / "controlnet" / "wf-t2i", seed=19)
        build_tiny_image_encoder(models_root / "clip_vision" / "wf-vision", seed=20)
        write_tiny_ip_adapter(sd / "unet", models_root / "ipadapter" / "wf-ip.safetensors", seed=21)
        build_tiny_motion_adapter(sd / "unet", models_root / "animatediff_models" / "wf-motion", seed=23)
        build_tiny_consistency(models_root / "consistency_models" / "wf-cm", num_classes=1000, seed=24)
        build_tiny_ldm_text2im(models_root / "latent_diffusion" / "wf-ldm-text2im", seed=25)
        build_tiny_ldm_super_resolution(models_root / "latent_diffusion" / "wf-ldm-sr", seed=26)
    return models_root


def on_tiny_model(name: str) -> ng.Workflow:
    """A shipped workflow with every model it names replaced by a tiny one (LCM checkpoints by the tiny LCM, SDXL
    ones by the tiny SDXL model, others by the tiny SD1 model), input pictures by the test picture and image sizes
    by 64x64."""
    wf = ng.load(workflows_dir() / f"{name}.json")
    for entry in wf.nodes.values():
        inputs = entry.inputs
        if entry.type == "LoadCheckpoint":
            name = inputs["ckpt"].lower()
            inputs["ckpt"] = "tiny-lcm" if "lcm" in name else "tiny-sdxl" if "xl" in name else "tiny-sd"
        elif entry.type == "LoRAStack":
            inputs["loras"] = [{**row, "lora": TINY_LORAS.get(row["lora"], TINY_STYLE_LORA)} for row in inputs["loras"]]
        elif entry.type == "LoadControlNet":
            inputs["control_net"] = "wf-cn"
        elif entry.type == "LoadT2IAdapter":
            inputs["adapter"] = "wf-t2i"
        elif entry.type == "LoadIPAdapter":
            inputs.update(ip_adapter="wf-ip.safetensors", image_encoder="wf-vision")
        elif entry.type == "LoadImage" and inputs["image"] not in ("picture.png", "mask.png", "with-alpha.png"):
            inputs["image"] = "picture.png"
        elif entry.type == "LoadMotionModule":
            inputs["motion_module"] = "wf-motion"
        elif entry.type == "LoadConsistencyModel":
            inputs["model"] = "wf-cm"
        elif entry.type == "LoadLatentDiffusion":
            inputs["model"] = "wf-ldm-text2im"
        elif entry.type == "LoadLDMUpscaler":
            inputs["model"] = "wf-ldm-sr"
        elif entry.type == "LDMUpscale":
            inputs["steps"] = 4
        elif entry.type in ("EmptyLatent", "EmptyLatentVideo"):
            inputs.update(width=64, height=64)
            if entry.type == "EmptyLatentVideo":
                inputs["frames"] = 4
    return wf


def test_the_examples_cover_the_lcm_tasks_and_adapters():
    assert {"text-to-image", "image-to-image", "inpainting", "lcm-lora", "lcm-lora-sdxl", "lcm-lora-style",
            "controlnet-canny", "controlnet-canny-lcm-lora", "t2i-adapter", "ip-adapter",
            "teacher-ddim", "animatediff-lcm-lora", "consistency-imagenet64", "ldm-text-to-image",
            "ldm-upscale-4x"} <= set(shipped_workflows())


@pytest.mark.parametrize("name, node, name_of_input, neutral", [
    ("lcm-lora", "2", "loras", []),
    ("lcm-lora-sdxl", "2", "loras", []),
    ("lcm-lora-style", "2", "loras", "first row only"),
    ("controlnet-canny", "14", "strength", 0.0),
    ("controlnet-canny-lcm-lora", "14", "strength", 0.0),
    ("t2i-adapter", "14", "strength", 0.0),
    ("ip-adapter", "14", "scale", 0.0),
])
def test_each_adapter_in_the_examples_changes_the_image(executor, name, node, name_of_input, neutral):
    wf = on_tiny_model(name)
    with_adapter = executor.run(wf)
    assert with_adapter.status == "success", with_adapter.errors
    if neutral == "first row only":
        neutral = wf.nodes[node].inputs["loras"][:1]
    wf.set(node, name_of_input, neutral)
    without = executor.run(wf)
    assert without.status == "success", without.errors
    assert not torch.equal(with_adapter.output("7", "image"), without.output("7", "image"))


@pytest.mark.parametrize("name", shipped_workflows())
def test_each_shipped_workflow_runs_and_saves_pngs_that_carry_it(executor, name):
    wf = on_tiny_model(name)
    result = executor.run(wf)
    assert result.status == "success", result.errors
    saved = [item for ui in result.ui.values() for item in ui.get("images", []) if item.get("type") == "output"]
    assert saved, "the workflow saved no image"
    path = executor.output_dir / saved[0]["subfolder"] / saved[0]["filename"]
    types = {e.type for e in wf.nodes.values()}
    # the tiny consistency model makes 32-pixel images, the tiny upscaler doubles the 64-pixel test picture
    tiny_size = 32 if "LoadConsistencyModel" in types else 128 if "LDMUpscale" in types else 64
    with Image.open(path) as image:
        assert image.size == (tiny_size, tiny_size)
    if saved[0].get("animated"):  # an animation: every frame is there (it does not carry the workflow yet)
        with Image.open(path) as image:
            assert image.n_frames == saved[0]["frames"] > 1
        return
    assert read_workflow_from_png(path) == wf.to_json()
    assert ng.load(path).to_json() == wf.to_json()  # a saved image is a workflow file too


def text_to_image(seed=1) -> ng.Workflow:
    wf = on_tiny_model("text-to-image")
    wf.set("5", "seed", seed)
    return wf


def test_changing_the_seed_reruns_only_the_sampler_decoder_and_saver(executor):
    executor.run(text_to_image(1))
    result = executor.run(text_to_image(2))
    ran = sorted(nid for nid, r in result.nodes.items() if r.status == "ran")
    assert [result.nodes[n].type for n in ran] == ["LCMSampler", "VAEDecode", "SaveImage"]


def test_saved_images_are_numbered_and_never_overwritten(executor):
    first = executor.run(text_to_image(1)).ui["7"]["images"][0]["filename"]
    executor.cache.clear()
    second = executor.run(text_to_image(1)).ui["7"]["images"][0]["filename"]
    assert (first, second) == ("text-to-image_00001.png", "text-to-image_00002.png")


def test_a_filename_prefix_cannot_leave_the_output_folder(executor, settings):
    # Refused at validation, before any node runs: nothing is sampled or written.
    wf = text_to_image()
    wf.set("7", "filename_prefix", "../../escape")
    with pytest.raises(ng.ValidationFailed) as caught:
        executor.run(wf)
    message = str(caught.value)
    assert "node 7 (SaveImage)" in message and "'filename_prefix'" in message and "'..' is not allowed" in message
    written = list(settings.output_dir.rglob("*")) if settings.output_dir.exists() else []
    assert written == [] and not (settings.output_dir.parent.parent / "escape_00001_.png").exists()


def test_cancelling_between_sampler_steps(executor):
    wf = text_to_image()
    seen = []

    def on_event(event):
        if event.type == "node_progress":
            seen.append(event.data["value"])
            executor.cancel(event.run_id)

    executor.events.subscribe(on_event)
    result = executor.run(wf)
    assert result.status == "cancelled" and result.nodes["5"].status == "cancelled" and seen == [1]


def test_load_image_gives_rgb_and_the_transparency_as_mask(executor, input_dir):
    wf = ng.Workflow()
    wf.add("img", "LoadImage", image="with-alpha.png")
    result = executor.run(wf, outputs=["img"])
    image, mask = result.output("img", "image"), result.output("img", "mask")
    assert image.shape == (1, 64, 64, 3) and mask.shape == (1, 64, 64)
    picture = np.asarray(Image.open(input_dir / "picture.png"), np.float32) / 255
    assert torch.equal(image[0], torch.from_numpy(picture))
    assert mask[0, :, :32].max() == 0 and mask[0, :, 32:].min() == 1  # transparent right half = redraw


@pytest.mark.parametrize("change, node, fragment", [
    (("4", "width", 60), "4", "not a multiple of the step 8"),
    (("4", "width", 8192), "4", "exceeds the size limit of 4096"),
    (("3", "steps", 60), "3", "above the maximum 50"),
    (("3", "timesteps", "999, 999"), "3", "strictly descending"),
    (("3", "timesteps", "nine"), "3", "whole numbers"),
    (("1", "ckpt", "missing-model"), "1", "is not one of the choices: 'demo-lcm', 'demo-teacher', 'tiny-lcm'"),
    (("1", "ckpt", "missing-model"), "1", "(checkpoints are read from "),
])
def test_bad_input_is_a_clear_error_on_its_node(executor, change, node, fragment):
    wf = text_to_image()
    wf.set(*change)
    try:
        result = executor.run(wf)
    except ng.ValidationFailed as exc:
        [error] = exc.errors
        assert error.node_id == node and fragment in error.message
        return
    assert result.nodes[node].status == "failed", result.nodes
    assert fragment in result.nodes[node].error["message"]


def test_a_mask_of_another_size_is_refused_on_the_encoder(executor):
    wf = on_tiny_model("inpainting")
    wf.set("7", "width", 32)
    result = executor.run(wf)
    assert result.nodes["8"].status == "failed"
    assert "the mask is 32x64 but the image is 64x64" in result.nodes["8"].error["message"]


def test_an_lcm_model_warns_that_it_ignores_a_negative_prompt(executor, caplog):
    wf = text_to_image()
    wf.add("neg", "CLIPEncode", clip=L("1", "clip"), text="blurry")
    wf.set("5", "negative", L("neg", "conditioning"))
    with caplog.at_level("WARNING"):
        assert executor.run(wf).status == "success"
    assert "takes no negative prompt" in caplog.text


def test_the_node_library_serialises_for_the_canvas():
    doc = ng.build_registry().to_json()
    assert {"LoadCheckpoint", "CLIPEncode", "LCMScheduler", "LCMSampler", "EmptyLatent", "VAEEncode", "VAEDecode",
            "InpaintEncode", "LoadImage", "SaveImage", "PreviewImage"} <= set(doc)
    assert all(entry["description"] for entry in doc.values())
    json.dumps(doc)


def test_the_readme_node_reference_is_current():
    import subprocess
    import sys

    from nodegraph.assets import workflows_dir as wd

    script = wd().parent / "scripts" / "node_reference.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_command_line_runs_a_shipped_workflow(models_root, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "nodegraph", "run", "text-to-image", "--models", str(models_root),
                           "--set", "1.ckpt=tiny-lcm", "--set", "5.seed=3", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr  # no library progress bar inside the run's own
    written = tmp_path / "text-to-image_00001.png"
    assert f"wrote {written}" in proc.stdout and written.is_file()
    assert proc.stdout.strip().splitlines()[-1].startswith("success: 7 ran")


def test_image_batch_joins_images_and_resizes_the_second_to_the_first(executor, input_dir):
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(input_dir / "grey-48x40.png")
    wf = ng.Workflow()
    wf.add("a", "LoadImage", image="picture.png")
    wf.add("b", "LoadImage", image="grey-48x40.png")
    wf.add("both", "ImageBatch", image1=L("a", "image"), image2=L("b", "image"))
    result = executor.run(wf, outputs=["both", "a"])
    both = result.output("both", "image")
    assert both.shape == (2, 64, 64, 3)
    assert torch.equal(both[0], result.output("a", "image")[0])
    assert torch.allclose(both[1], torch.full((64, 64, 3), 200 / 255))  # a flat image stays flat when resized
