"""The tiny VAE (TAESD: diffusers' AutoencoderTiny) from vae/ and vae_approx/ against diffusers' pipelines with
``vae=AutoencoderTiny``, and sampler previews by a projection fitted to the checkpoint's VAE."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L
from nodes.image_ops import (
    tiny_config_from_original,
    tiny_from_original,
    tiny_to_original,
)
from nodes.latent import decode
from nodes.testing.tiny_adapters import build_tiny_taesd

from .conftest import generator, max_diff
from .test_parity import graph, ours

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_root(models_root, tmp_path_factory):
    """A models folder with the test checkpoints, a tiny TAESD as a diffusers folder in vae/ and as madebyollin's
    two files in vae_approx/ (plus a decoder without its encoder)."""
    root = tmp_path_factory.mktemp("tiny-vae-models")
    (root / "checkpoints").symlink_to(models_root / "checkpoints", target_is_directory=True)
    build_tiny_taesd(root / "vae" / "taesd-tiny", root / "vae_approx", seed=5)
    (root / "vae_approx" / "alone").mkdir()
    shutil.copy(root / "vae_approx" / "taesd_decoder.safetensors", root / "vae_approx" / "alone" /
                "taesd_decoder.safetensors")
    return root


@pytest.fixture
def settings(settings, tiny_root):
    return settings.replace(models_dir=tiny_root)


@pytest.fixture(scope="module")
def taesd(tiny_root):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(tiny_root / "vae" / "taesd-tiny", local_files_only=True).eval()


def load(executor, node, name):
    wf = ng.Workflow()
    wf.add("vae", node, vae=name)
    wf.outputs = ["vae"]
    result = executor.run(wf)
    assert result.status == "success", result.errors or result.nodes["vae"].error
    return result.output("vae", "vae")


@pytest.mark.parametrize("which", ["tiny", "TAESD's own shape"])
def test_original_layout_round_trips_exactly(taesd, which):
    from diffusers import AutoencoderTiny

    if which != "tiny":
        taesd = AutoencoderTiny()  # the released taesd/taesdxl: 64 channels, (1, 3, 3, 3) and (3, 3, 3, 1) blocks
    state = taesd.state_dict()
    encoder, decoder = tiny_to_original(state)
    assert "1.conv.0.weight" in encoder and "1.weight" in decoder  # the decoder's 0 is TAESD's weightless Clamp
    back = tiny_from_original(encoder, decoder)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    config = tiny_config_from_original(encoder, decoder)
    for key in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                "num_decoder_blocks", "latent_channels"):
        assert tuple(np.atleast_1d(config[key])) == tuple(np.atleast_1d(taesd.config[key])), key


class _TAESDBlock(torch.nn.Module):
    """madebyollin's taesd.py Block, written from its source: the layout the original files were saved from."""

    def __init__(self, n: int):
        super().__init__()
        conv = [torch.nn.Conv2d(n, n, 3, padding=1) for _ in range(3)]
        self.conv = torch.nn.Sequential(conv[0], torch.nn.ReLU(), conv[1], torch.nn.ReLU(), conv[2])
        self.skip = torch.nn.Identity()
        self.fuse = torch.nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class _Clamp(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def original_taesd(encoder_blocks, decoder_blocks, n=8, latent=4):
    """taesd.py's Encoder and Decoder (pixels in [0, 1] in and out) with the given blocks per stage."""
    enc = [torch.nn.Conv2d(3, n, 3, padding=1)]
    for i, blocks in enumerate(encoder_blocks):
        if i:
            enc.append(torch.nn.Conv2d(n, n, 3, padding=1, stride=2, bias=False))
        enc += [_TAESDBlock(n) for _ in range(blocks)]
    enc.append(torch.nn.Conv2d(n, latent, 3, padding=1))
    dec = [_Clamp(), torch.nn.Conv2d(latent, n, 3, padding=1), torch.nn.ReLU()]
    for i, blocks in enumerate(decoder_blocks):
        dec += [_TAESDBlock(n) for _ in range(blocks)]
        if i < len(decoder_blocks) - 1:
            dec += [torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(n, n, 3, padding=1, bias=False)]
    dec.append(torch.nn.Conv2d(n, 3, 3, padding=1))
    return torch.nn.Sequential(*enc), torch.nn.Sequential(*dec)


def test_original_files_load_into_taesds_own_modules_and_compute_the_same(tiny_root, taesd):
    from safetensors.torch import load_file

    encoder, decoder = original_taesd(taesd.config.num_encoder_blocks, taesd.config.num_decoder_blocks)
    encoder.load_state_dict(load_file(tiny_root / "vae_approx" / "taesd_encoder.safetensors"), strict=True)
    decoder.load_state_dict(load_file(tiny_root / "vae_approx" / "taesd_decoder.safetensors"), strict=True)
    x = torch.rand(1, 3, 32, 32, generator=generator(1)) * 2 - 1
    with torch.inference_mode():
        latents = taesd.encode(x).latents
        assert max_diff(encoder((x + 1) / 2), latents) <= 1e-6
        assert max_diff(decoder(latents) * 2 - 1, taesd.decode(latents).sample) <= 1e-6


@pytest.mark.parametrize("node, name", [("LoadTinyVAE", "taesd_decoder.safetensors"),
                                        ("LoadTinyVAE", "taesd_encoder.safetensors"),
                                        ("LoadVAE", "taesd-tiny")])
def test_both_folders_load_the_same_weights(executor, taesd, node, name):
    vae = load(executor, node, name).vae
    assert type(vae).__name__ == "AutoencoderTiny"
    ours_state, theirs = vae.state_dict(), taesd.state_dict()
    assert ours_state.keys() == theirs.keys()
    assert all(torch.equal(ours_state[k], theirs[k]) for k in theirs)


def test_a_decoder_without_its_encoder_decodes_but_refuses_to_encode(executor, taesd):
    vae = load(executor, "LoadTinyVAE", "alone/taesd_decoder.safetensors")
    latents = torch.randn(1, 4, 8, 8, generator=generator(0))
    with torch.inference_mode():
        expected = (taesd.decode(latents).sample * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.equal(decode(vae, latents), expected)
    wf = ng.Workflow()
    wf.add("vae", "LoadTinyVAE", vae="alone/taesd_decoder.safetensors")
    wf.add("img", "LoadImage", image="picture.png")
    wf.add("enc", "VAEEncode", vae=L("vae", "vae"), image=L("img", "image"))
    wf.outputs = ["enc"]
    result = executor.run(wf)
    assert result.status != "success" and "without its encoder" in str(result.nodes["enc"].error)


def with_tiny_vae(wf, node="LoadTinyVAE", name="taesd_decoder.safetensors"):
    wf.add("tiny", node, vae=name)
    wf.set("decode", "vae", L("tiny", "vae"))
    if "latent" in wf.nodes and wf.nodes["latent"].type == "VAEEncode":
        wf.set("latent", "vae", L("tiny", "vae"))
    return wf


@pytest.mark.parametrize("node, name", [("LoadTinyVAE", "taesd_decoder.safetensors"), ("LoadVAE", "taesd-tiny")])
def test_text_to_image_with_the_tiny_vae_matches_the_pipeline(executor, pipelines, taesd, node, name):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{**pipelines["sd"].components, "vae": taesd})
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, generator=generator(4), height=64,
                    width=64, output_type="np").images
    got = ours(executor, with_tiny_vae(graph("tiny-sd", "a red circle", seed=4, guidance=1.0), node, name))
    assert max_diff(got, expected) <= TOLERANCE
    full = ours(executor, graph("tiny-sd", "a red circle", seed=4, guidance=1.0))
    assert max_diff(got, full) > 1e-3  # the tiny VAE really decoded


def test_image_to_image_with_the_tiny_vae_matches_the_pipeline(executor, pipelines, taesd, input_dir):
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    pipe = LatentConsistencyModelImg2ImgPipeline(**{**pipelines["lcm_img2img"].components, "vae": taesd})
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(input_dir / "picture.png").convert("RGB")
    expected = pipe("a blue square", image=image, strength=0.6, num_inference_steps=4, guidance_scale=8.5,
                    generator=generator(3), output_type="np").images
    got = ours(executor, with_tiny_vae(graph("tiny-lcm", "a blue square", seed=3, guidance=8.5, strength=0.6,
                                             image="picture.png")))
    assert max_diff(got, expected) <= TOLERANCE


def test_vae_encode_with_the_tiny_vae_gives_its_latents(executor, taesd, input_dir):
    wf = ng.Workflow()
    wf.add("vae", "LoadTinyVAE", vae="taesd_encoder.safetensors")
    wf.add("img", "LoadImage", image="picture.png")
    wf.add("enc", "VAEEncode", vae=L("vae", "vae"), image=L("img", "image"))
    wf.add("dec", "VAEDecode", vae=L("vae", "vae"), latent=L("enc", "latent"))
    wf.outputs = ["dec"]
    result = executor.run(wf)
    assert result.status == "success", result.errors
    latent = result.output("enc", "latent")
    assert latent.posterior is None  # deterministic: nothing for a sampler to draw
    pixels = torch.from_numpy(np.array(Image.open(input_dir / "picture.png").convert("RGB"))).float() / 255
    with torch.inference_mode():
        expected = taesd.encode(pixels.permute(2, 0, 1)[None] * 2 - 1).latents * taesd.config.scaling_factor
        image = (taesd.decode(expected / taesd.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
    assert max_diff(latent.samples, expected) <= TOLERANCE
    assert max_diff(result.output("dec", "image"), image.permute(0, 2, 3, 1)) <= TOLERANCE


# --- previews ------------------------------------------------------------------------------------------------------


def test_the_projection_is_fitted_once_per_vae_and_used_by_sampler_previews(executor, monkeypatch):
    from nodes import previews

    fits = []
    fit = previews.fit_projection
    monkeypatch.setattr(previews, "fit_projection", lambda vae, seed=0: fits.append(vae) or fit(vae, seed))
    images = []
    executor.events.subscribe(lambda e: images.append(e.data["preview"]) if "preview" in e.data else None)
    executor.settings = executor.settings.replace(previews=True)
    wf = graph("tiny-sd", "a red circle", seed=4, guidance=1.0)
    wf.outputs = ["sample"]
    result = executor.run(wf)
    assert result.status == "success", result.errors
    assert len(images) == 4 and images[0].size == (8, 8) and images[0].mode == "RGB"
    wf.set("sample", "seed", 5)
    executor.run(wf)
    assert len(images) == 8
    assert len(fits) <= 1  # cached on the VAE module (one fit, or none when an earlier test fitted it)


def colour_errors(executor, captions):
    """Mean absolute colour error, per latent cell, of the projection preview and of the old channel stretch,
    against the decoded image pooled to latent resolution, over demo-model samples of ``captions``."""
    from nodes import previews

    ours_error, stretch_error = [], []
    for seed, caption in enumerate(captions):
        wf = graph("demo-lcm", caption, seed=seed, guidance=3.0)
        wf.outputs = ["decode", "sample"]
        result = executor.run(wf)
        assert result.status == "success", result.errors
        vae, latents = result.output("ckpt", "vae"), result.output("sample", "latent").samples
        image = result.output("decode", "image").movedim(-1, 1)
        target = torch.nn.functional.avg_pool2d(image, vae.scale_factor)[0].movedim(0, -1)
        ours_error.append(float((previews.project(latents, *previews.projection(vae)) - target).abs().mean()))
        stretch_error.append(float((previews.stretch(latents) - target).abs().mean()))
    return float(np.mean(ours_error)), float(np.mean(stretch_error))


def test_projection_previews_are_closer_in_colour_than_the_old_stretch(executor):
    ours_error, stretch_error = colour_errors(executor, ["a red circle on a white background",
                                                        "a blue square on a yellow background",
                                                        "a green triangle on a black background"])
    assert ours_error < 0.5 * stretch_error  # measured on 4 captions: 0.13 against 0.44
