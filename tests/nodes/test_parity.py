"""Our graphs give the images diffusers' own pipelines give, on the same tiny models and seeds (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L

from .conftest import generator, max_diff

TOLERANCE = 1e-5


def graph(ckpt: str, prompt: str, *, steps=4, seed=0, guidance=8.5, width=64, height=64, batch=1, timesteps="",
          original_steps=0, negative=None, clip_skip=0, strength=1.0, image=None, mask=None,
          wrap_conditioning=None) -> ng.Workflow:
    """LoadCheckpoint -> CLIPEncode -> LCMScheduler -> (EmptyLatent | LoadImage -> VAEEncode | InpaintEncode)
    -> LCMSampler -> VAEDecode. ``wrap_conditioning(wf, link)`` may add nodes between the prompt and the sampler
    and returns the link the sampler reads."""
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt=ckpt)
    wf.add("pos", "CLIPEncode", clip=L("ckpt", "clip"), text=prompt, clip_skip=clip_skip)
    wf.add("sched", "LCMScheduler", model=L("ckpt", "model"), steps=steps, original_inference_steps=original_steps,
           timesteps=timesteps)
    add_latent(wf, image=image, mask=mask, width=width, height=height, batch=batch)
    positive = L("pos", "conditioning")
    if wrap_conditioning is not None:
        positive = wrap_conditioning(wf, positive)
    sampler = dict(model=L("ckpt", "model"), positive=positive, latent=L("latent", "latent"),
                   schedule=L("sched", "schedule"), seed=seed, guidance=guidance, strength=strength)
    if negative is not None:
        wf.add("neg", "CLIPEncode", clip=L("ckpt", "clip"), text=negative)
        sampler["negative"] = L("neg", "conditioning")
    wf.add("sample", "LCMSampler", **sampler)
    wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample", "latent"))
    wf.outputs = ["decode"]
    return wf


def add_latent(wf: ng.Workflow, *, image=None, mask=None, width=64, height=64, batch=1) -> None:
    """Node "latent": EmptyLatent, or LoadImage -> VAEEncode, or LoadImage + mask -> InpaintEncode, all over the
    checkpoint node "ckpt"."""
    if image is None:
        wf.add("latent", "EmptyLatent", width=width, height=height, batch=batch, vae=L("ckpt", "vae"))
        return
    wf.add("img", "LoadImage", image=image)
    if mask is None:
        wf.add("latent", "VAEEncode", vae=L("ckpt", "vae"), image=L("img", "image"))
    else:
        wf.add("maskimg", "LoadImage", image=mask)
        wf.add("mask", "ImageToMask", image=L("maskimg", "image"))
        wf.add("latent", "InpaintEncode", vae=L("ckpt", "vae"), image=L("img", "image"), mask=L("mask", "mask"))


def ours(executor, wf) -> np.ndarray:
    result = executor.run(wf)
    assert result.status == "success", result.errors
    return result.output("decode", "image").numpy()


@pytest.mark.parametrize("case", [
    dict(steps=1), dict(steps=2), dict(steps=4), dict(steps=8, guidance=1.0),
    dict(steps=4, timesteps="999, 759, 499, 259", guidance=4.0),
    dict(steps=2, original_steps=20, guidance=6.0),
    dict(steps=3, batch=2),
    dict(steps=3, clip_skip=1),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_text_to_image_matches_the_lcm_pipeline(executor, pipelines, case):
    kwargs = dict(num_inference_steps=case.get("steps", 4), guidance_scale=case.get("guidance", 8.5),
                  num_images_per_prompt=case.get("batch", 1), height=64, width=64, output_type="np")
    if case.get("timesteps"):
        kwargs["timesteps"] = [int(t) for t in case["timesteps"].split(",")]
        kwargs.pop("num_inference_steps")
    if case.get("original_steps"):
        kwargs["original_inference_steps"] = case["original_steps"]
    if case.get("clip_skip"):
        kwargs["clip_skip"] = case["clip_skip"]
        te = pipelines["lcm"].text_encoder
        if not hasattr(te, "text_model"):  # diffusers' clip_skip path predates transformers 5's flat CLIPTextModel
            te.__dict__["text_model"] = te  # an alias, not a registered submodule
    expected = pipelines["lcm"]("a red circle", generator=generator(7), **kwargs).images
    got = ours(executor, graph("tiny-lcm", "a red circle", seed=7, **case))
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("strength, steps, guidance", [(0.6, 4, 8.5), (0.8, 2, 8.5), (1.0, 4, 3.0), (0.3, 3, 5.0)])
def test_image_to_image_matches_the_lcm_img2img_pipeline(executor, pipelines, input_dir, strength, steps, guidance):
    image = Image.open(input_dir / "picture.png").convert("RGB")
    expected = pipelines["lcm_img2img"]("a blue square", image=image, strength=strength, num_inference_steps=steps,
                                        guidance_scale=guidance, generator=generator(3), output_type="np").images
    got = ours(executor, graph("tiny-lcm", "a blue square", seed=3, steps=steps, guidance=guidance,
                               strength=strength, image="picture.png"))
    assert max_diff(got, expected) <= TOLERANCE


def test_image_to_image_with_custom_timesteps_and_strength(executor, pipelines, input_dir):
    image = Image.open(input_dir / "picture.png").convert("RGB")
    expected = pipelines["lcm_img2img"]("a cat", image=image, strength=0.5, timesteps=[999, 759, 499, 259],
                                        guidance_scale=4.0, generator=generator(1), output_type="np").images
    got = ours(executor, graph("tiny-lcm", "a cat", seed=1, timesteps="999,759,499,259", guidance=4.0, strength=0.5,
                               image="picture.png"))
    assert max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("guidance, negative", [(1.0, None), (1.5, None), (2.0, "blurry")])
def test_lcm_lora_style_sampling_matches_stable_diffusion_with_lcm_scheduler(executor, pipelines, guidance,
                                                                            negative):
    expected = pipelines["sd"]("a green triangle", negative_prompt=negative, num_inference_steps=4,
                               guidance_scale=guidance, generator=generator(11), height=64, width=64,
                               output_type="np").images
    got = ours(executor, graph("tiny-sd", "a green triangle", seed=11, guidance=guidance, negative=negative))
    assert max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("pipe, ckpt, guidance, strength, negative", [
    ("sd_inpaint", "tiny-sd", 1.0, 1.0, None),
    ("sd_inpaint", "tiny-sd", 2.0, 1.0, "ugly"),
    ("sd_inpaint", "tiny-sd", 1.0, 0.75, None),
    ("lcm_inpaint", "tiny-lcm", 8.5, 1.0, None),
])
def test_inpainting_matches_the_stable_diffusion_inpaint_pipeline(executor, pipelines, input_dir, pipe, ckpt,
                                                                  guidance, strength, negative):
    got, expected = inpainting_pair(executor, pipelines[pipe], ckpt, input_dir, seed=5, guidance=guidance,
                                    strength=strength, negative=negative)
    assert max_diff(got, expected) <= TOLERANCE


def inpainting_pair(executor, pipe, ckpt, input_dir, *, seed, guidance, strength, negative=None):
    """(our image, the inpainting pipeline's) for "a yellow star" over picture.png with mask.png, 4 steps."""
    image = Image.open(input_dir / "picture.png").convert("RGB")
    mask = Image.open(input_dir / "mask.png")
    expected = pipe("a yellow star", image=image, mask_image=mask, height=64, width=64, strength=strength,
                    num_inference_steps=4, guidance_scale=guidance, negative_prompt=negative,
                    generator=generator(seed), output_type="np").images
    got = ours(executor, graph(ckpt, "a yellow star", seed=seed, guidance=guidance, strength=strength,
                               negative=negative, image="picture.png", mask="mask.png"))
    return got, expected


def test_inpainting_keeps_the_unmasked_latents_exactly(executor):
    wf = graph("tiny-sd", "a yellow star", seed=5, guidance=1.0, image="picture.png", mask="mask.png")
    result = executor.run(wf, outputs=["sample"])
    encoded, sampled = result.output("latent", "latent"), result.output("sample", "latent").samples
    # the first draw of the seed is the image's posterior sample; the mask covers the right half (latent columns 4+)
    kept = encoded.posterior.sample(torch.randn(encoded.posterior.mean.shape, generator=generator(5)))
    assert torch.equal(sampled[..., :4], kept[..., :4])
    assert not torch.allclose(sampled[..., 4:], kept[..., 4:])


def test_single_file_checkpoint_loads_the_same_weights_as_its_folder(executor):
    wf = ng.Workflow()
    wf.add("a", "LoadCheckpoint", ckpt="tiny-sd")
    wf.add("b", "LoadCheckpoint", ckpt="tiny-sd.safetensors")
    result = executor.run(wf, outputs=["a", "b"])
    assert result.status == "success", result.errors
    for output, attr in (("model", "unet"), ("clip", "text_encoder"), ("vae", "vae")):
        folder = getattr(result.output("a", output), attr).state_dict()
        single = getattr(result.output("b", output), attr).state_dict()
        assert folder.keys() == single.keys()
        assert all(torch.equal(folder[k], single[k]) for k in folder), output


@pytest.fixture(scope="module")
def inpainting_model(models_root):
    """tiny-sd with a 9-channel UNet (latents + mask + masked-image latents), like SD's inpainting models."""
    import shutil

    from diffusers import UNet2DConditionModel

    source = models_root / "checkpoints" / "tiny-sd"
    target = models_root / "checkpoints" / "tiny-sd-inpainting"
    if not target.exists():
        shutil.copytree(source, target)
        config = dict(UNet2DConditionModel.load_config(source / "unet"))
        config["in_channels"] = 9
        torch.manual_seed(2)
        UNet2DConditionModel.from_config(config).save_pretrained(target / "unet")
    return target


@pytest.mark.parametrize("guidance, strength", [(1.0, 1.0), (2.0, 0.75)])
def test_inpainting_with_a_9_channel_unet_matches_diffusers(executor, inpainting_model, input_dir, guidance,
                                                            strength):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(inpainting_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    got, expected = inpainting_pair(executor, pipe, "tiny-sd-inpainting", input_dir, seed=6, guidance=guidance,
                                    strength=strength)
    assert max_diff(got, expected) <= TOLERANCE
