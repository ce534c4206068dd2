"""SDXL text-to-image: our graphs give the images diffusers' StableDiffusionXLPipeline (with an LCMScheduler) gives,
on tiny SDXL models: two text encoders, pooled embedding and size conditioning, LCM-LoRA-style guidance (CFG with
SDXL's zero negative embedding, or none at guidance 1) and an LCM-distilled SDXL UNet (guidance embedding)."""

from __future__ import annotations

import pytest
import torch

import nodegraph as ng
from nodegraph import Link as L

from .conftest import generator, max_diff
from .test_parity import graph, inpainting_pair, ours

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sdxl(models_root):
    from diffusers import StableDiffusionXLPipeline

    pipes = {}
    for name in ("tiny-sdxl", "tiny-sdxl-lcm"):  # built by conftest's models_root
        pipes[name] = StableDiffusionXLPipeline.from_pretrained(models_root / "checkpoints" / name,
                                                                local_files_only=True)
        pipes[name].set_progress_bar_config(disable=True)
    return pipes


@pytest.mark.parametrize("ckpt, case", [
    ("tiny-sdxl", dict(steps=4, guidance=1.0)),
    ("tiny-sdxl", dict(steps=2, guidance=2.0)),
    ("tiny-sdxl", dict(steps=3, guidance=1.5, negative="blurry")),
    ("tiny-sdxl", dict(steps=2, guidance=2.0, batch=2, width=48)),
    ("tiny-sdxl", dict(steps=2, guidance=1.0, clip_skip=1)),
    ("tiny-sdxl-lcm", dict(steps=4, guidance=4.0)),
    ("tiny-sdxl-lcm", dict(steps=1, guidance=8.0, height=48)),
], ids=lambda c: c if isinstance(c, str) else ",".join(f"{k}={v}" for k, v in c.items()))
def test_text_to_image_matches_the_sdxl_pipeline(executor, sdxl, ckpt, case):
    kwargs = dict(num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                  num_images_per_prompt=case.get("batch", 1), height=case.get("height", 64),
                  width=case.get("width", 64), output_type="np")
    for ours_name, theirs in (("negative", "negative_prompt"), ("clip_skip", "clip_skip")):
        if ours_name in case:
            kwargs[theirs] = case[ours_name]
    expected = sdxl[ckpt]("a red circle", generator=generator(5), **kwargs).images
    got = ours(executor, graph(ckpt, "a red circle", seed=5, **case))
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= TOLERANCE


def test_an_sdxl_model_refuses_a_prompt_from_a_one_encoder_clip(executor, sdxl):
    wf = graph("tiny-sdxl", "a red circle", guidance=1.0)
    wf.add("sd1", "LoadCheckpoint", ckpt="tiny-sd")
    wf.set("pos", "clip", L("sd1", "clip"))
    result = executor.run(wf)
    assert result.nodes["sample"].status == "failed"
    assert "needs a prompt encoded by an SDXL CLIP" in result.nodes["sample"].error["message"]


def test_an_sdxl_model_refuses_a_negative_prompt_from_a_one_encoder_clip(executor, sdxl):
    wf = graph("tiny-sdxl", "a red circle", guidance=2.0, negative="blurry")
    wf.add("sd1", "LoadCheckpoint", ckpt="tiny-sd")
    wf.set("neg", "clip", L("sd1", "clip"))
    result = executor.run(wf)
    assert result.nodes["sample"].status == "failed"
    assert "negative prompt of an SDXL model must come from an SDXL CLIP" in result.nodes["sample"].error["message"]


def test_the_sdxl_prompt_carries_both_encoders_and_the_pooled_embedding(executor, sdxl):
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt="tiny-sdxl")
    wf.add("pos", "CLIPEncode", clip=L("ckpt", "clip"), text="a red circle")
    result = executor.run(wf, outputs=["pos"])
    cond = result.output("pos", "conditioning")
    with torch.no_grad():
        embeds, _, pooled, _ = sdxl["tiny-sdxl"].encode_prompt("a red circle", do_classifier_free_guidance=False)
    assert cond.embeds.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
    assert max_diff(cond.embeds, embeds) == 0 and max_diff(cond.pooled, pooled) == 0


@pytest.mark.parametrize("fmt, strength, guidance", [("peft", 1.0, 1.0), ("kohya", 0.8, 1.5)])
def test_an_lcm_lora_on_sdxl_matches_diffusers(executor, sdxl, models_root, fmt, strength, guidance):
    """LCM-LoRA's setting: a plain SDXL UNet, a LoRA on every layer LCM-LoRA adapts, few steps, CFG only above 1."""
    from nodes.testing.tiny_adapters import write_tiny_lora

    pipe = sdxl["tiny-sdxl"]
    path = models_root / "loras" / f"sdxl-{fmt}.safetensors"
    if not path.exists():
        write_tiny_lora(pipe.unet, pipe.text_encoder, path, fmt=fmt, rank=4, seed=32, text=False, everywhere=True,
                        std=0.1)
    wf = graph("tiny-sdxl", "a red circle", seed=2, steps=4, guidance=guidance)
    wf.add("lora", "LoRAStack", model=L("ckpt", "model"), clip=L("ckpt", "clip"),
           loras=[{"lora": path.name, "strength_model": strength, "strength_clip": strength}])
    wf.set("sample", "model", L("lora", "model"))
    got = ours(executor, wf)

    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="lcm")
    try:
        pipe.set_adapters(["lcm"], adapter_weights=[strength])
        expected = pipe("a red circle", generator=generator(2), num_inference_steps=4, guidance_scale=guidance,
                        height=64, width=64, output_type="np").images
    finally:
        pipe.unload_lora_weights()
    assert max_diff(got, expected) <= TOLERANCE
    plain = ours(executor, graph("tiny-sdxl", "a red circle", seed=2, steps=4, guidance=guidance))
    assert max_diff(got, plain) > 1e-2  # the LoRA does change the image


@pytest.mark.parametrize("guidance, strength", [(1.0, 1.0), (2.0, 0.75)])
def test_inpainting_matches_the_sdxl_inpaint_pipeline(executor, sdxl, input_dir, guidance, strength):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline(**sdxl["tiny-sdxl"].components)
    pipe.set_progress_bar_config(disable=True)
    got, expected = inpainting_pair(executor, pipe, "tiny-sdxl", input_dir, seed=5, guidance=guidance,
                                    strength=strength)
    assert max_diff(got, expected) <= TOLERANCE


def test_image_to_image_runs_on_sdxl_and_keeps_the_picture_at_low_strength(executor, sdxl):
    low = ours(executor, graph("tiny-sdxl", "a yellow star", seed=4, guidance=1.0, strength=0.2, image="picture.png"))
    high = ours(executor, graph("tiny-sdxl", "a yellow star", seed=4, guidance=1.0, strength=1.0, image="picture.png"))
    result = executor.run(graph("tiny-sdxl", "a yellow star", image="picture.png"), outputs=["img"])
    picture = result.output("img", "image").numpy()
    assert abs(low - picture).mean() < abs(high - picture).mean()  # (a random tiny VAE reconstructs loosely)


def test_an_sdxl_textual_inversion_embedding_matches_diffusers(executor, sdxl, models_root):
    """An SDXL embedding file holds vectors for each encoder (clip_l, clip_g), as diffusers loads them."""
    from safetensors.torch import save_file

    folder = models_root / "embeddings"
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(9)
    vectors = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}
    save_file(vectors, folder / "xl-style.safetensors")
    prompt = "a red circle, <xl-style>"
    got = ours(executor, graph("tiny-sdxl", prompt, seed=3, steps=2, guidance=2.0))

    pipe = sdxl["tiny-sdxl"]
    pipe.load_textual_inversion(vectors["clip_l"], token="<xl-style>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token="<xl-style>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    try:
        expected = pipe(prompt, generator=generator(3), num_inference_steps=2, guidance_scale=2.0, height=64,
                        width=64, output_type="np").images
    finally:
        pipe.unload_textual_inversion("<xl-style>", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        pipe.unload_textual_inversion("<xl-style>", tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
    assert max_diff(got, expected) <= TOLERANCE
    plain = ours(executor, graph("tiny-sdxl", "a red circle, xl-style", seed=3, steps=2, guidance=2.0))
    assert max_diff(got, plain) > 1e-4  # the embedding really changed the image


def test_an_sd1_embedding_on_sdxl_is_a_clear_error(executor, sdxl, models_root):
    from safetensors.torch import save_file

    folder = models_root / "embeddings"
    folder.mkdir(exist_ok=True)
    save_file({"emb_params": torch.zeros(1, 32)}, folder / "sd1-only.safetensors")
    result = executor.run(graph("tiny-sdxl", "a red circle, <sd1-only>", guidance=1.0))
    assert result.nodes["pos"].status == "failed"
    assert "has no 'clip_l' vectors: it is not an SDXL embedding" in result.nodes["pos"].error["message"]


def _kohya_sdxl_lora_with_both_text_encoders(pipe, path):
    """A kohya SDXL file: lora_unet_* plus lora_te1_* and lora_te2_* (different weights on each encoder)."""
    from safetensors.torch import load_file, save_file

    from nodes.testing.tiny_adapters import write_tiny_lora

    single = path.with_name("one-encoder.safetensors")
    write_tiny_lora(pipe.unet, pipe.text_encoder, single, fmt="kohya", rank=4, seed=33, std=0.1)
    tensors = {}
    for key, value in load_file(single).items():
        if key.startswith("lora_te_"):
            tensors[key.replace("lora_te_", "lora_te1_")] = value.clone()
            tensors[key.replace("lora_te_", "lora_te2_")] = value.flip(0).clone() if value.ndim else value.clone()
        else:
            tensors[key] = value
    single.unlink()
    save_file(tensors, path)


@pytest.mark.parametrize("strength_model, strength_clip, guidance", [(1.0, 1.0, 1.0), (0.0, 1.0, 2.0)])
def test_a_lora_on_both_sdxl_text_encoders_matches_diffusers(executor, sdxl, models_root, strength_model,
                                                             strength_clip, guidance):
    pipe = sdxl["tiny-sdxl"]
    path = models_root / "loras" / "sdxl-kohya-te1-te2.safetensors"
    if not path.exists():
        _kohya_sdxl_lora_with_both_text_encoders(pipe, path)
    wf = graph("tiny-sdxl", "a red circle", seed=6, steps=2, guidance=guidance)
    wf.add("lora", "LoRAStack", model=L("ckpt", "model"), clip=L("ckpt", "clip"),
           loras=[{"lora": path.name, "strength_model": strength_model, "strength_clip": strength_clip}])
    wf.set("sample", "model", L("lora", "model"))
    wf.set("pos", "clip", L("lora", "clip"))
    got = ours(executor, wf)

    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="both")
    try:
        pipe.set_adapters(["both"], adapter_weights=[{"unet": strength_model, "text_encoder": strength_clip,
                                                      "text_encoder_2": strength_clip}])
        expected = pipe("a red circle", generator=generator(6), num_inference_steps=2, guidance_scale=guidance,
                        height=64, width=64, output_type="np").images
    finally:
        pipe.unload_lora_weights()
    assert max_diff(got, expected) <= TOLERANCE
    result = executor.run(wf, outputs=["lora"])
    clip = result.output("lora", "clip")
    assert len(clip.patches) == len(clip.patches_2) == 1  # one patch on each encoder
    plain = ours(executor, graph("tiny-sdxl", "a red circle", seed=6, steps=2, guidance=guidance))
    assert max_diff(got, plain) > 1e-3  # the text-encoder layers alone change the image too


def test_the_sdxl_vae_stays_in_float32_when_the_rest_runs_in_float16(executor, models_root, input_dir):
    """SDXL's VAE overflows in float16; its config says force_upcast, and diffusers' SDXL pipelines decode in
    float32. SD1 models keep a float16 VAE."""


    executor.settings = executor.settings.replace(dtype="float16")
    wf = ng.Workflow()
    wf.add("xl", "LoadCheckpoint", ckpt="tiny-sdxl")
    wf.add("sd", "LoadCheckpoint", ckpt="tiny-sd")
    result = executor.run(wf, outputs=["xl", "sd"])
    assert result.output("xl", "model").dtype == torch.float16
    assert result.output("xl", "vae").vae.dtype == torch.float32
    assert result.output("sd", "vae").vae.dtype == torch.float16
