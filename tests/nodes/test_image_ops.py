"""ImageScale, ImageScaleToTotalPixels, ImagePadForOutpaint, GrowMask, LatentUpscale(By), ConditioningZeroOut and
LoadVAE: exact values on small synthetic tensors, and the loaded VAEs against the checkpoint's own."""

from __future__ import annotations

import json
import math
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import nodegraph as ng
from nodegraph import Link as L
from nodegraph.validate import ValidationFailed
from nodes.image_ops import (
    VAES,
    ConditioningZeroOut,
    GrowMask,
    ImagePadForOutpaint,
    ImageScale,
    ImageScaleToTotalPixels,
    LatentUpscale,
    LatentUpscaleBy,
    LoadVAE,
    bislerp,
    slerp,
)
from nodes.latent import decode
from nodes.values import Conditioning, Latent, Posterior

from .conftest import EXACT, generator, in_maps_of, max_diff
from .test_parity import graph, ours


@pytest.fixture(scope="module")
def vae_root(models_root, tmp_path_factory):
    """A models folder whose checkpoints/ is the test models' and whose vae/ holds the tiny SD model's VAE as a
    diffusers folder, as original-layout files (with and without first_stage_model., and a pickle), and a tiny
    AutoencoderTiny folder."""
    from diffusers import AutoencoderTiny

    from nodes.testing.tiny import VAE_PREFIX, vae_to_ldm

    root = tmp_path_factory.mktemp("vae-models")
    (root / "checkpoints").symlink_to(models_root / "checkpoints", target_is_directory=True)
    source = models_root / "checkpoints" / "tiny-sd" / "vae"
    vaes = root / "vae"
    shutil.copytree(source, vaes / "tiny-vae")
    ldm = {k: v.contiguous() for k, v in vae_to_ldm(load_file(next(source.glob("*.safetensors"))),
                                                    json.loads((source / "config.json").read_text())).items()}
    save_file({VAE_PREFIX + k: v for k, v in ldm.items()}, vaes / "tiny-vae-ldm.safetensors")
    (vaes / "bare").mkdir()
    save_file(ldm, vaes / "bare" / "tiny-vae-bare.safetensors")
    torch.save({"state_dict": {VAE_PREFIX + k: v for k, v in ldm.items()}}, vaes / "tiny-vae.ckpt")
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                    latent_channels=4).save_pretrained(vaes / "taesd-tiny")
    (vaes / "notes").mkdir()
    (vaes / "notes" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    return root


@pytest.fixture
def settings(vae_root, input_dir, tmp_path):
    return ng.Settings(**EXACT, models_dir=vae_root, input_dir=input_dir, temp_dir=tmp_path / "temp",
                       output_dir=tmp_path / "out")


@pytest.fixture
def ctx(settings):
    return SimpleNamespace(settings=settings)


def hwc(*rows) -> torch.Tensor:
    """A one-image IMAGE whose three channels all hold ``rows``."""
    return torch.tensor(rows, dtype=torch.float32)[None, ..., None].expand(-1, -1, -1, 3).contiguous()


# --- ImageScale ----------------------------------------------------------------------------------------------------


def test_image_scale_nearest_exact_repeats_each_pixel(ctx):
    got = ImageScale().run(ctx, hwc([0.0, 0.25], [0.5, 1.0]), "nearest-exact", 4, 4, "disabled")
    assert got.shape == (1, 4, 4, 3)
    assert torch.equal(got[0, ..., 0], torch.tensor([[0.0, 0.0, 0.25, 0.25], [0.0, 0.0, 0.25, 0.25],
                                                     [0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]]))


def test_image_scale_bilinear_samples_at_pixel_centres(ctx):
    got = ImageScale().run(ctx, hwc([0.0, 1.0]), "bilinear", 4, 1, "disabled")
    assert torch.equal(got[0, 0, :, 1], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_image_scale_area_averages_blocks(ctx):
    image = hwc([0.0, 0.5, 1.0, 1.0], [0.5, 1.0, 0.0, 0.0], [0.25, 0.25, 0.0, 0.5], [0.25, 0.25, 1.0, 0.5])
    got = ImageScale().run(ctx, image, "area", 2, 2, "disabled")
    assert torch.equal(got[0, ..., 2], torch.tensor([[0.5, 0.5], [0.25, 0.5]]))


def keys_cubic(row: list[float], out: int, a: float = -0.75) -> list[float]:
    """1-D cubic convolution (Keys, a = -0.75) at half-pixel centres, edges repeated: the reference bicubic."""
    def w(x):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    n, values = len(row), []
    for i in range(out):
        src = (i + 0.5) * n / out - 0.5
        base = math.floor(src)
        values.append(sum(row[min(max(base + k, 0), n - 1)] * w(src - base - k) for k in (-1, 0, 1, 2)))
    return values


def test_image_scale_bicubic_is_cubic_convolution_clamped_to_the_unit_range(ctx):
    row = [0.0, 0.0, 1.0, 1.0]
    reference = keys_cubic(row, 8)
    assert min(reference) < 0 and max(reference) > 1  # the step overshoots: the clamp matters
    got = ImageScale().run(ctx, hwc(row), "bicubic", 8, 1, "disabled")
    expected = torch.tensor(reference, dtype=torch.float32).clamp(0, 1)
    assert max_diff(got[0, 0, :, 0], expected) <= 1e-6
    assert got.min() == 0 and got.max() == 1


def test_image_scale_lanczos_is_pillows_on_the_8_bit_image(ctx):
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels.astype(np.float32) / 255)[None]
    got = ImageScale().run(ctx, image, "lanczos", 7, 4, "disabled")
    expected = np.array(Image.fromarray(pixels).resize((7, 4), Image.Resampling.LANCZOS)).astype(np.float32) / 255
    assert torch.equal(got[0], torch.from_numpy(expected))


def test_image_scale_zero_keeps_the_aspect_ratio_and_both_zero_keep_the_image(ctx):
    image = torch.rand(2, 3, 5, 3, generator=generator(0))  # 5 wide, 3 high
    assert ImageScale().run(ctx, image, "nearest-exact", 0, 6, "disabled").shape == (2, 6, 10, 3)
    assert ImageScale().run(ctx, image, "nearest-exact", 8, 0, "disabled").shape == (2, 5, 8, 3)  # 4.8 -> 5
    assert ImageScale().run(ctx, image, "bilinear", 0, 0, "disabled") is image


def test_image_scale_center_crop_cuts_to_the_target_aspect_ratio_first(ctx):
    image = hwc([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 1.0, 0.5])
    got = ImageScale().run(ctx, image, "nearest-exact", 2, 2, "center")
    assert torch.equal(got[0, ..., 0], torch.tensor([[0.2, 0.3], [0.8, 0.9]]))
    tall = hwc(*[[v, v] for v in (0.0, 0.25, 0.5, 0.75, 1.0, 0.5)])  # 2 wide, 6 high -> rows 2 and 3
    assert torch.equal(ImageScale().run(ctx, tall, "nearest-exact", 2, 2, "center")[0, :, 0, 0],
                       torch.tensor([0.5, 0.75]))
    stretched = ImageScale().run(ctx, image, "nearest-exact", 2, 2, "disabled")
    assert torch.equal(stretched[0, ..., 0], torch.tensor([[0.1, 0.4], [0.7, 1.0]]))  # columns 1 and 4


def test_image_scale_refuses_sizes_over_the_limit(ctx, settings):
    small = SimpleNamespace(settings=settings.replace(max_image_size=64))
    with pytest.raises(ValueError, match="exceeds the size limit of 64"):
        ImageScale().run(small, hwc([0.0]), "nearest-exact", 65, 8, "disabled")


def test_image_scale_to_total_pixels_keeps_the_aspect_ratio(ctx):
    image = torch.rand(1, 2, 4, 3, generator=generator(1))  # 4 wide, 2 high
    # 0.01 MP = int(10485.76) = 10485 pixels: sides 4 and 2 times sqrt(10485 / 8) = 144.8 and 72.4
    got = ImageScaleToTotalPixels().run(ctx, image, "nearest-exact", 0.01)
    assert got.shape == (1, 72, 145, 3)
    assert torch.equal(got, ImageScale().run(ctx, image, "nearest-exact", 145, 72, "disabled"))
    square = ImageScaleToTotalPixels().run(ctx, torch.rand(1, 3, 3, 3), "bilinear", 0.25)
    assert square.shape == (1, 512, 512, 3)


# --- ImagePadForOutpaint -------------------------------------------------------------------------------------------


def feather_reference(h, w, top, bottom, left, right, f) -> torch.Tensor:
    """The feathered mask inside the image, pixel by pixel as ComfyUI describes it."""
    t = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            d = min(i if top else h, h - i if bottom else h, j if left else w, w - j if right else w)
            if d < f:
                t[i, j] = ((f - d) / f) ** 2
    return t


def test_pad_for_outpaint_greys_the_border_and_masks_it(ctx):
    image = torch.rand(2, 12, 12, 3, generator=generator(2))
    padded, mask = ImagePadForOutpaint().run(ctx, image, 8, 0, 0, 16, 4)
    assert padded.shape == (2, 28, 20, 3) and mask.shape == (1, 28, 20)
    assert torch.equal(padded[:, :12, 8:], image)
    assert (padded[:, :, :8] == 0.5).all() and (padded[:, 12:] == 0.5).all()
    assert (mask[0, :, :8] == 1).all() and (mask[0, 12:] == 1).all()
    inner = mask[0, :12, 8:]
    assert torch.equal(inner, feather_reference(12, 12, 0, 16, 8, 0, 4))
    # left (padded) side: 1 at the edge column, then (3/4)^2, (2/4)^2, (1/4)^2; bottom: from (3/4)^2 on the last row
    assert inner[5, :5].tolist() == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    assert inner[7:, 6].tolist() == [0.0, 0.0, 0.0625, 0.25, 0.5625]
    assert inner[0, 4:].eq(0).all()  # the top was not padded: no feathering from it


def test_pad_for_outpaint_without_room_to_feather_keeps_the_image_unmasked(ctx):
    image = torch.rand(1, 8, 16, 3, generator=generator(3))
    for feathering in (0, 4):  # 2 * 4 is not smaller than the height 8
        _, mask = ImagePadForOutpaint().run(ctx, image, 8, 8, 8, 8, feathering)
        assert mask[0, 8:16, 8:24].eq(0).all() and mask.sum() == 24 * 32 - 8 * 16
    padded, mask = ImagePadForOutpaint().run(ctx, image, 0, 0, 0, 0, 2)
    assert torch.equal(padded, image) and mask.eq(0).all()


# --- GrowMask ------------------------------------------------------------------------------------------------------


def test_grow_mask_dilates_and_erodes_with_a_square(ctx):
    dot = torch.zeros(1, 7, 7)
    dot[0, 3, 3] = 1
    grown = GrowMask().run(ctx, dot, 2)
    expected = torch.zeros(1, 7, 7)
    expected[0, 1:6, 1:6] = 1
    assert torch.equal(grown, expected)
    assert torch.equal(GrowMask().run(ctx, expected, -2), dot)
    assert torch.equal(GrowMask().run(ctx, expected, -3), torch.zeros(1, 7, 7))
    assert GrowMask().run(ctx, dot, 0) is dot


def test_grow_mask_keeps_soft_values_and_does_not_erode_from_outside(ctx):
    soft = torch.tensor([[[0.0, 0.25, 0.0, 0.0, 0.75]]])
    assert GrowMask().run(ctx, soft, 1).tolist() == [[[0.25, 0.25, 0.25, 0.75, 0.75]]]
    assert GrowMask().run(ctx, torch.ones(2, 4, 5), -1).eq(1).all()
    batch = torch.zeros(2, 5, 5)
    batch[1, 0, 0] = 1
    grown = GrowMask().run(ctx, batch, 1)
    assert grown[0].eq(0).all() and grown[1].sum() == 4 and torch.equal(grown[1, :2, :2], torch.ones(2, 2))


# --- bislerp -------------------------------------------------------------------------------------------------------


def test_bislerp_turns_the_direction_and_interpolates_the_length():
    # two 2-channel vectors side by side, (2, 0) and (0, 4), doubled in width: positions 0, 1/4, 3/4, 1
    x = torch.tensor([[[[2.0, 0.0]], [[0.0, 4.0]]]], dtype=torch.float64)
    got = bislerp(x, 4, 1)[0, :, 0].T
    expected = [(2.0, 0.0), (2.5 * math.cos(math.pi / 8), 2.5 * math.sin(math.pi / 8)),
                (3.5 * math.cos(3 * math.pi / 8), 3.5 * math.sin(3 * math.pi / 8)), (0.0, 4.0)]
    assert max_diff(got, torch.tensor(expected, dtype=torch.float64)) <= 1e-12
    bilinear = F.interpolate(x, size=(1, 4), mode="bilinear")[0, :, 0].T
    assert max_diff(bilinear[1], torch.tensor([1.5, 1.0], dtype=torch.float64)) <= 1e-12  # shorter: 1.80 < 2.5


def test_bislerp_of_a_constant_or_parallel_latent_is_bilinear():
    constant = torch.tensor([0.5, -0.25, 1.0, 0.125]).reshape(1, 4, 1, 1).expand(2, 4, 3, 5)
    got = bislerp(constant, 7, 6)
    assert torch.equal(got, F.interpolate(constant, size=(6, 7), mode="bilinear"))
    assert torch.equal(got, constant[:, :, :1, :1].expand(2, 4, 6, 7))
    direction = torch.tensor([1.0, 2.0, -2.0, 4.0]).reshape(1, 4, 1, 1)
    lengths = torch.rand(1, 1, 3, 4, generator=generator(5)) + 0.5
    parallel = direction * lengths
    assert max_diff(bislerp(parallel, 9, 5), F.interpolate(parallel, size=(5, 9), mode="bilinear")) <= 1e-6


def test_slerp_is_linear_for_opposite_and_zero_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).T[None]  # [1, 2 channels, 2 positions]
    b = torch.tensor([[-3.0, 0.0], [0.0, 2.0]]).T[None]
    got = slerp(a, b, torch.tensor(0.25))
    assert torch.equal(got, 0.75 * a + 0.25 * b)
    assert torch.isfinite(got).all()


def test_bislerp_downscales_and_keeps_the_dtype():
    x = torch.randn(1, 4, 8, 8, generator=generator(6)).half()
    got = bislerp(x, 4, 2)
    assert got.dtype == torch.float16 and got.shape == (1, 4, 2, 4)
    # halving samples halfway between neighbour pairs (columns 1-2, 5-6; rows 1-2, 5-6... of the 2-row result)
    lo = torch.tensor([1, 3, 5, 7]) - 1
    wide = slerp(x.float()[..., lo], x.float()[..., lo + 1], torch.tensor(0.5))
    rows = torch.tensor([1, 5])
    expected = slerp(wide[..., rows, :], wide[..., rows + 1, :], torch.tensor(0.5))
    assert max_diff(got.float(), expected.half().float()) == 0


# --- LatentUpscale, LatentUpscaleBy --------------------------------------------------------------------------------


def test_latent_upscale_resizes_to_pixels_over_8(ctx):
    x = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    out = LatentUpscale().run(ctx, Latent(samples=x), "nearest-exact", 128, 128, "disabled")
    assert isinstance(out, Latent) and out.samples is not None and not out.empty and out.mask is None
    assert torch.equal(out.samples, x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert LatentUpscale().run(ctx, Latent(samples=x), "bilinear", 0, 128, "disabled").shape == (2, 4, 16, 16)
    wide = Latent(samples=torch.zeros(1, 4, 8, 16))
    assert LatentUpscale().run(ctx, wide, "area", 0, 128, "disabled").shape == (1, 4, 16, 32)
    assert LatentUpscale().run(ctx, wide, "area", 96, 0, "disabled").shape == (1, 4, 8, 12)  # 48 -> 64
    assert LatentUpscale().run(ctx, wide, "area", 8, 16, "disabled").shape == (1, 4, 8, 8)  # 64 at least
    assert LatentUpscale().run(ctx, wide, "bislerp", 0, 0, "disabled") is wide


def test_latent_upscale_of_an_empty_or_encoded_latent_is_a_plain_latent(ctx):
    empty = Latent(samples=torch.zeros(1, 4, 8, 8), empty=True)
    out = LatentUpscale().run(ctx, empty, "bilinear", 96, 96, "disabled")
    assert not out.empty and out.samples.eq(0).all() and out.shape == (1, 4, 12, 12)
    mean, std = torch.randn(1, 4, 8, 8, generator=generator(7)), torch.ones(1, 4, 8, 8)
    encoded = Latent(posterior=Posterior(mean, std, 0.5), mask=torch.ones(1, 1, 8, 8), masked_image=None)
    out = LatentUpscaleBy().run(ctx, encoded, "nearest-exact", 2.0)
    assert out.posterior is None and out.mask is None
    assert torch.equal(out.samples, (0.5 * mean).repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_latent_upscale_center_crop(ctx):
    x = torch.arange(8 * 16, dtype=torch.float32).reshape(1, 1, 8, 16)
    out = LatentUpscale().run(ctx, Latent(samples=x), "nearest-exact", 64, 64, "center")
    assert torch.equal(out.samples, x[..., :, 4:12])


def test_latent_upscale_by_rounds_each_side(ctx):
    x = torch.randn(1, 4, 3, 5, generator=generator(8))
    out = LatentUpscaleBy().run(ctx, Latent(samples=x), "bicubic", 1.5)
    assert out.shape == (1, 4, 4, 8)  # 4.5 -> 4 and 7.5 -> 8, as Python rounds
    assert torch.equal(out.samples, F.interpolate(x, size=(4, 8), mode="bicubic"))  # latents are not clamped
    vectors = torch.tensor([[[[2.0, 0.0]], [[0.0, 4.0]]]])
    got = LatentUpscaleBy().run(ctx, Latent(samples=vectors), "bislerp", 2.0).samples
    assert got.shape == (1, 2, 2, 4) and torch.equal(got[:, :, 0], got[:, :, 1])
    assert max_diff(got[0, :, 0, 1], torch.tensor([2.5 * math.cos(math.pi / 8), 2.5 * math.sin(math.pi / 8)])) <= 1e-6


def test_latent_upscale_of_a_video_resizes_every_frame(ctx):
    video = torch.randn(2, 4, 3, 8, 8, generator=generator(9))
    out = LatentUpscaleBy().run(ctx, Latent(samples=video), "bislerp", 1.5).samples
    assert out.shape == (2, 4, 3, 12, 12)
    for f in range(3):
        assert torch.equal(out[:, :, f], bislerp(video[:, :, f], 12, 12))


# --- ConditioningZeroOut -------------------------------------------------------------------------------------------


def test_conditioning_zero_out_zeroes_the_embeddings_only(ctx):
    embeds, pooled = torch.randn(2, 77, 32, generator=generator(10)), torch.randn(2, 64, generator=generator(11))
    cond = Conditioning(embeds=embeds, prompts=("a", "b"), extras=("control",), pooled=pooled)
    out = ConditioningZeroOut().run(ctx, cond)
    assert out.embeds.shape == (2, 77, 32) and out.embeds.eq(0).all() and out.pooled.eq(0).all()
    assert out.prompts == ("a", "b") and out.extras == ("control",) and out.clip is None
    assert embeds.ne(0).any() and pooled.ne(0).any()  # the input is left alone
    plain = ConditioningZeroOut().run(ctx, Conditioning(embeds=embeds, prompts=("a", "b")))
    assert plain.pooled is None and plain.embeds.eq(0).all()


def test_a_zeroed_negative_matches_stable_diffusion_given_zero_negative_embeddings(executor, pipelines):
    wf = graph("tiny-sd", "a green triangle", seed=11, guidance=2.0)
    wf.add("zero", "ConditioningZeroOut", conditioning=L("pos", "conditioning"))
    wf.set("sample", "negative", L("zero", "conditioning"))
    expected = pipelines["sd"]("a green triangle", negative_prompt_embeds=torch.zeros(1, 77, 32),
                               num_inference_steps=4, guidance_scale=2.0, generator=generator(11), height=64,
                               width=64, output_type="np").images
    got = ours(executor, wf)
    assert max_diff(got, expected) <= 1e-5
    plain = ours(executor, graph("tiny-sd", "a green triangle", seed=11, guidance=2.0))
    assert max_diff(got, plain) > 1e-3


# --- LoadVAE -------------------------------------------------------------------------------------------------------


def load_vae(executor, name):
    wf = ng.Workflow()
    wf.add("vae", "LoadVAE", vae=name)
    wf.outputs = ["vae"]
    result = executor.run(wf)
    assert result.status == "success", result.errors or result.nodes["vae"].error
    return result.output("vae", "vae")


def checkpoint_vae(executor, ckpt):
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt=ckpt)
    wf.outputs = ["ckpt"]
    return executor.run(wf).output("ckpt", "vae")


def test_the_vae_folder_lists_folders_and_files(settings):
    from nodegraph.folders import folders_of

    assert VAES.names(settings) == ["bare/tiny-vae-bare.safetensors", "taesd-tiny", "tiny-vae",
                                    "tiny-vae-ldm.safetensors", "tiny-vae.ckpt"]  # notes/ is no VAE: searched
    assert folders_of(ng.build_registry())["vae"] is VAES  # so /models lists it


def test_a_vae_folder_decodes_as_the_checkpoints_own(executor):
    latents = torch.randn(2, 4, 8, 8, generator=generator(12))
    vae = load_vae(executor, "tiny-vae")
    own = checkpoint_vae(executor, "tiny-sd")
    assert vae.name == "tiny-vae" and vae.vae is not own.vae
    assert (vae.scale_factor, vae.latent_channels, vae.scaling_factor) == (8, 4, 0.18215)
    assert max_diff(decode(vae, latents), decode(own, latents)) == 0


@pytest.mark.parametrize("name", ["tiny-vae-ldm.safetensors", "bare/tiny-vae-bare.safetensors"])
def test_an_original_layout_vae_file_decodes_as_the_single_file_checkpoints_own(executor, name):
    latents = torch.randn(1, 4, 8, 8, generator=generator(13))
    vae = load_vae(executor, name)
    own = checkpoint_vae(executor, "tiny-sd.safetensors")  # the same weights, configured from the same shapes
    assert max_diff(decode(vae, latents), decode(own, latents)) <= 1e-6
    # shapes cannot tell the tiny VAE's 4 norm groups: both single files get the derived 8 (the folder has 4)
    assert vae.vae.config.norm_num_groups == own.vae.config.norm_num_groups == 8
    folder = load_vae(executor, "tiny-vae").vae.state_dict()
    assert vae.vae.state_dict().keys() == folder.keys()
    assert all(torch.equal(t, folder[k]) for k, t in vae.vae.state_dict().items())  # converted losslessly


def test_a_vae_pickle_needs_permission(settings):
    refused = ng.Executor(ng.build_registry(), settings=settings)
    wf = ng.Workflow()
    wf.add("vae", "LoadVAE", vae="tiny-vae.ckpt")
    wf.outputs = ["vae"]
    result = refused.run(wf)
    assert result.status != "success" and "--allow-pickle" in result.nodes["vae"].error["message"]
    allowed = ng.Executor(ng.build_registry(), settings=settings.replace(allow_pickle=True))
    vae = load_vae(allowed, "tiny-vae.ckpt")
    latents = torch.randn(1, 4, 8, 8, generator=generator(14))
    assert max_diff(decode(vae, latents), decode(load_vae(allowed, "tiny-vae-ldm.safetensors"), latents)) == 0


def test_a_tiny_autoencoder_folder_loads_as_its_own_class(executor, vae_root):
    from diffusers import AutoencoderTiny

    vae = load_vae(executor, "taesd-tiny")
    assert isinstance(vae.vae, AutoencoderTiny) and vae.scale_factor == 8 and vae.scaling_factor == 1.0
    latents = torch.randn(1, 4, 8, 8, generator=generator(15))
    reference = AutoencoderTiny.from_pretrained(vae_root / "vae" / "taesd-tiny").eval()
    with torch.no_grad():
        expected = (reference.decode(latents).sample * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert max_diff(decode(vae, latents), expected) == 0


def test_load_vae_places_weights_as_the_settings_say(settings):
    from nodes.devices import prefers_channels_last

    executor = ng.Executor(ng.build_registry(), settings=settings.replace(memory_format="channels_last",
                                                                          dtype="bfloat16"))
    vae = load_vae(executor, "tiny-vae-ldm.safetensors")
    assert prefers_channels_last(vae.vae) and next(vae.vae.parameters()).dtype == torch.bfloat16


def test_a_missing_vae_names_the_folder(executor, ctx, vae_root):
    wf = ng.Workflow()
    wf.add("vae", "LoadVAE", vae="nope.safetensors")
    wf.outputs = ["vae"]
    with pytest.raises(ValidationFailed, match=f"'nope.safetensors' is not one of the choices.*read from "
                                               f"{vae_root / 'vae'}; put them there or use --models"):
        executor.run(wf)
    with pytest.raises(FileNotFoundError, match=str(vae_root / "vae")):
        LoadVAE().run(ctx, "nope.safetensors")


def test_image_ops_run_in_a_graph(executor):
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt="tiny-sd")
    wf.add("vae", "LoadVAE", vae="tiny-vae")
    wf.add("img", "LoadImage", image="picture.png")
    wf.add("small", "ImageScale", image=L("img", "image"), method="area", width=32, height=0, crop="disabled")
    wf.add("pad", "ImagePadForOutpaint", image=L("small", "image"), left=16, top=0, right=16, bottom=32,
           feathering=8)
    wf.add("grow", "GrowMask", mask=L("pad", "mask"), pixels=4)
    wf.add("enc", "InpaintEncode", vae=L("vae", "vae"), image=L("pad", "image"), mask=L("grow", "mask"))
    wf.add("up", "LatentUpscaleBy", latent=L("enc", "latent"), method="bislerp", scale=1.5)
    wf.add("up2", "LatentUpscale", latent=L("up", "latent"), method="bilinear", width=128, height=0, crop="center")
    wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("up2", "latent"))
    wf.outputs = ["decode"]
    result = executor.run(wf)
    assert result.status == "success", result.errors or {k: n.error for k, n in result.nodes.items() if n.error}
    assert result.output("grow", "mask").shape == (1, 64, 64)
    assert result.output("up", "latent").shape == (1, 4, 12, 12)
    assert result.output("decode", "image").shape == (1, 128, 128, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guards are leases, a Linux feature")
@pytest.mark.parametrize("name", ["tiny-vae", "tiny-vae-ldm.safetensors"])
@pytest.mark.parametrize("map_weights", [None, False])
def test_vaes_map_their_weights_where_guarded_as_checkpoints_do(settings, name, map_weights):
    from nodegraph import filemaps

    executor = ng.Executor(ng.build_registry(), settings=settings.replace(dtype="float32", device="cpu")
                           .replace(**({"map_weights": map_weights} if map_weights is not None else {})))
    vae = load_vae(executor, name).vae
    path = settings.models_dir / "vae" / name
    weights = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    inside = in_maps_of(weights, [p for p in vae.parameters() if p.layout == torch.strided])
    mapped = map_weights is None and filemaps.guard(weights) is not None
    assert (sum(inside) > len(inside) // 2) if mapped else not any(inside)
