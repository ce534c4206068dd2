"""Latent Diffusion: LoadLDMUpscaler -> LDMUpscale gives LDMSuperResolutionPipeline's images, and
LoadLatentDiffusion -> CLIPEncode -> Sampler (ddim) -> VAEDecode gives LDMTextToImagePipeline's.

Tiny models (diffusers' test configs; a real LDMBert with a BertTokenizer) are written as real pipeline folders into
the test models folder's latent_diffusion/; the reference is the pipeline loaded from the same folder. Both pipelines
hand the scheduler no generator, so with eta > 0 their step noise comes from torch's global generator: the tests put
it where our seeded generator is after the first draw, which makes the two draw the same numbers.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L
from nodes.testing.tiny_families import build_tiny_ldm_super_resolution, build_tiny_ldm_text2im

from .conftest import generator, in_maps_of, max_diff, spy_reads

SR, T2I = "tiny-ldm-sr", "tiny-ldm-text2im"
TOLERANCE = 1e-5
SMALL, ODD = "ldm-small.png", "ldm-odd.png"  # 32x32, and 45x38 (rounded down to 32x32 by the preprocessing)


@pytest.fixture(scope="session")
def ldm_models(models_root):
    folder = models_root / "latent_diffusion"
    build_tiny_ldm_super_resolution(folder / SR, seed=50)
    build_tiny_ldm_text2im(folder / "nested" / T2I, seed=51)
    return folder


@pytest.fixture(scope="session")
def small_images(input_dir):
    with Image.open(input_dir / "picture.png") as picture:
        picture.resize((32, 32), Image.LANCZOS).save(input_dir / SMALL)
        picture.resize((45, 38), Image.LANCZOS).save(input_dir / ODD)
    return input_dir


@pytest.fixture(scope="session")
def ldm_pipelines(ldm_models):
    from diffusers import LDMSuperResolutionPipeline, LDMTextToImagePipeline

    pipes = {"sr": LDMSuperResolutionPipeline.from_pretrained(ldm_models / SR, local_files_only=True),
             "t2i": LDMTextToImagePipeline.from_pretrained(ldm_models / "nested" / T2I, local_files_only=True)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@contextlib.contextmanager
def global_rng_after(seed: int, shape: tuple[int, ...]):
    """torch's global generator where a generator seeded with ``seed`` is after drawing ``shape`` normals (the
    pipelines' step noise then equals ours); restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.randn(shape)
        yield


def with_scheduler(pipe, sampler: str):
    """The same pipeline (shared weights) with the scheduler our sampler name stands for."""
    from nodes.schedulers import make_scheduler

    return type(pipe)(**{**pipe.components, "scheduler": make_scheduler(pipe.scheduler.config, sampler)})


# --- super-resolution -----------------------------------------------------------------------------------------


def upscale_graph(image: str, *, batch: int = 1, **inputs) -> ng.Workflow:
    wf = ng.Workflow()
    wf.add("load", "LoadLDMUpscaler", model=SR)
    wf.add("img", "LoadImage", image=image)
    picture = L("img", "image")
    if batch == 2:
        wf.add("batch", "ImageBatch", image1=picture, image2=picture)
        picture = L("batch", "image")
    wf.add("up", "LDMUpscale", upscaler=L("load", "upscaler"), image=picture, **inputs)
    wf.outputs = ["up"]
    return wf


def upscaled(executor, image: str, **inputs) -> np.ndarray:
    result = executor.run(upscale_graph(image, **inputs))
    assert result.status == "success", result.errors
    return result.output("up", "image").numpy()


@pytest.mark.parametrize("case", [
    dict(eta=0.0), dict(eta=0.5), dict(eta=0.0, batch=2), dict(eta=0.5, image=ODD),
    dict(eta=0.0, sampler="euler_ancestral"), dict(eta=0.0, sampler="dpmpp_2m", seed=7),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_upscaling_matches_the_super_resolution_pipeline(executor, ldm_pipelines, small_images, case):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion_superresolution import preprocess

    image, batch, seed = case.get("image", SMALL), case.get("batch", 1), case.get("seed", 0)
    sampler = case.get("sampler", "ddim")
    pipe = ldm_pipelines["sr"] if sampler == "ddim" else with_scheduler(ldm_pipelines["sr"], sampler)
    with Image.open(small_images / image) as pil:
        # a PIL image is preprocessed by the pipeline; a batch goes in as the tensor that preprocessing gives
        given = pil.convert("RGB") if batch == 1 else preprocess(pil.convert("RGB")).repeat(batch, 1, 1, 1)
    with global_rng_after(seed, (batch, 3, 32, 32)):
        expected = pipe(given, num_inference_steps=2, eta=case["eta"], generator=generator(seed),
                        output_type="np").images
    ours = upscaled(executor, image, batch=batch, seed=seed, steps=2, eta=case["eta"], sampler=sampler)
    assert ours.shape == expected.shape == (batch, 64, 64, 3)  # the tiny autoencoder's factor is 2
    assert max_diff(ours, expected) <= TOLERANCE


def test_the_upscaler_lists_super_resolution_models_only(executor, ldm_models, small_images):
    from nodes.latent_diffusion import LoadLatentDiffusion, LoadLDMUpscaler

    # the session's models folder is shared: other modules' models may be listed beside these
    upscalers = LoadLDMUpscaler.inputs["model"].current_options(executor.settings)
    text_models = LoadLatentDiffusion.inputs["model"].current_options(executor.settings)
    assert SR in upscalers and f"nested/{T2I}" not in upscalers
    assert f"nested/{T2I}" in text_models and SR not in text_models
    wrong = upscale_graph(SMALL, steps=2)
    wrong.set("load", "model", f"nested/{T2I}")
    with pytest.raises(ng.ValidationFailed) as info:
        executor.run(wrong)
    [error] = info.value.errors
    assert (error.code, error.node_id, error.input) == ("not_an_option", "load", "model")
    assert "LDMSuperResolutionPipeline folders" in error.message and "latent_diffusion" in error.message


def test_changing_the_seed_changes_the_upscaled_image(executor, ldm_models, small_images):
    first = upscaled(executor, SMALL, seed=0, steps=2, eta=0.0)
    again = upscaled(executor, SMALL, seed=0, steps=2, eta=0.0)
    other = upscaled(executor, SMALL, seed=1, steps=2, eta=0.0)
    assert max_diff(first, again) == 0
    assert max_diff(first, other) > 1e-3


# --- text-to-image --------------------------------------------------------------------------------------------


def text_graph(prompt: str, *, width: int = 64, height: int = 64, batch: int = 1, **inputs) -> ng.Workflow:
    """LoadLatentDiffusion -> CLIPEncode -> EmptyLatent -> Sampler -> VAEDecode ("decode"), as for any checkpoint."""
    wf = ng.Workflow()
    wf.add("ckpt", "LoadLatentDiffusion", model=f"nested/{T2I}")
    wf.add("pos", "CLIPEncode", clip=L("ckpt", "clip"), text=prompt)
    wf.add("latent", "EmptyLatent", width=width, height=height, batch=batch, vae=L("ckpt", "vae"))
    wf.add("sample", "Sampler", model=L("ckpt", "model"), positive=L("pos", "conditioning"),
           latent=L("latent", "latent"), **{"sampler": "ddim", "steps": 2, "guidance": 6.0, **inputs})
    wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample", "latent"))
    wf.outputs = ["decode"]
    return wf


@pytest.mark.parametrize("case", [
    {"eta": 0.0}, {"eta": 0.5}, {"eta": 0.0, "guidance": 1.0}, {"eta": 0.0, "batch": 2, "seed": 3},
    {"eta": 0.0, "prompt": "a painting of a blue house on the hill, zebra"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_text_to_image_matches_the_ldm_text_to_image_pipeline(executor, ldm_pipelines, case):
    prompt, batch, seed = case.get("prompt", "a red cat"), case.get("batch", 1), case.get("seed", 0)
    guidance = case.get("guidance", 6.0)
    # the pipeline's latents are height // 8 high whatever its autoencoder; the tiny one downscales 2x, so a
    # 64-pixel EmptyLatent (32 latent rows) matches the pipeline asked for 256 pixels
    with global_rng_after(seed, (batch, 4, 32, 32)):
        expected = ldm_pipelines["t2i"]([prompt] * batch, height=256, width=256, num_inference_steps=2,
                                        guidance_scale=guidance, eta=case["eta"], generator=generator(seed),
                                        output_type="np").images
    result = executor.run(text_graph(prompt, batch=batch, seed=seed, eta=case["eta"], guidance=guidance))
    assert result.status == "success", result.errors
    ours = result.output("decode", "image").numpy()
    assert ours.shape == expected.shape == (batch, 64, 64, 3)
    assert max_diff(ours, expected) <= TOLERANCE


def test_clip_skip_on_an_ldmbert_model_is_a_clear_error(executor, ldm_models):
    wf = text_graph("a red cat")
    wf.set("pos", "clip_skip", 1)
    result = executor.run(wf)
    assert "clip_skip works with CLIP text encoders" in result.nodes["pos"].error["message"]
    assert "LDMBert" in result.nodes["pos"].error["message"]


@pytest.mark.parametrize("dtype, map_weights", [("float32", None), ("float32", False), ("bfloat16", None)])
def test_every_component_loads_as_checkpoints_do(ldm_models, models_root, monkeypatch, dtype, map_weights):
    """The UNet, the VQ autoencoder and the LDMBert text encoder are streamed tensor by tensor (each read once, in
    the run's dtype), or, used as stored with a guard, kept in maps of their files: the pipeline's weights."""
    from diffusers import LDMTextToImagePipeline

    from nodegraph import filemaps
    from nodes.latent_diffusion import TEXT_TO_IMAGE, _load_folder

    settings = ng.Settings(models_dir=models_root, device="cpu", dtype=dtype, map_weights=map_weights,
                           memory_format="contiguous")
    read = spy_reads(monkeypatch)
    folder, loaded, _ = _load_folder(settings, f"nested/{T2I}", TEXT_TO_IMAGE)
    monkeypatch.undo()
    assert read and len(read) == len(set(read))
    pipe = LDMTextToImagePipeline.from_pretrained(folder, local_files_only=True).to(getattr(torch, dtype))
    for part in ("unet", "vqvae", "bert"):
        ours, theirs = loaded[part].state_dict(), getattr(pipe, part).state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs), part
        assert {p.dtype for p in loaded[part].parameters()} == {getattr(torch, dtype)}
        weights = next((folder / part).glob("*.safetensors"))
        inside = in_maps_of(weights, list(loaded[part].parameters()))
        mapped = dtype == "float32" and map_weights is None and filemaps.guard(weights) is not None
        assert all(inside) if mapped else not any(inside), part
