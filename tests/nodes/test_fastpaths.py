"""The inference form of ResnetBlock2D is bit-identical to diffusers' and is what loaded checkpoints run (so every
parity test of the suite runs through it). The phase form of Upsample2D equals diffusers' up to rounding, is what
VAEs run in the fast layout, and steps aside wherever it could not be the same computation."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

import nodegraph as ng

from nodes import fastpaths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_channels, temb_channels, norm, temb_size", [
    (8, 16, "default", 16), (16, 16, "default", 16), (8, None, "default", None), (8, None, "default", 8),
    (8, None, "group", None), (16, None, "group", 16),  # VAE decoders' blocks: "group" ignores any temb
])
def test_the_inference_block_is_bit_identical(dtype, out_channels, temb_channels, norm, temb_size):
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=out_channels, temb_channels=temb_channels, groups=4,
                          time_embedding_norm=norm).eval()
    block = block.to(dtype)
    fast = fastpaths.apply(copy.deepcopy(block))
    assert type(fast) is fastpaths.InferenceResnetBlock2D
    x = torch.randn(2, 8, 12, 12, dtype=dtype)
    temb = torch.randn(2, temb_size, *(() if temb_channels else (1, 1)), dtype=dtype) if temb_size else None
    with torch.inference_mode():
        assert torch.equal(fast(x, temb), block(x, temb))
    fast.train()  # training keeps diffusers' forward (dropout)
    assert torch.equal(fast(x, temb), block.train()(x, temb))


def test_resampling_blocks_keep_their_forward():
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4, up=True)
    assert type(fastpaths.apply(block)) is ResnetBlock2D


def test_loaded_checkpoints_run_the_inference_blocks(executor):
    from tests.nodes.test_parity import graph

    result = executor.run(graph("tiny-lcm", "a red circle"), outputs=["ckpt"])
    for module in (result.output("ckpt", "model").unet, result.output("ckpt", "vae").vae):
        kinds = {type(m) for m in module.modules() if isinstance(m, ResnetBlock2D)}
        assert kinds == {fastpaths.InferenceResnetBlock2D}  # the VAE decoder's "group" blocks too


def _upsampler(dtype, channels=8, out_channels=6, bias=True, name="conv"):
    torch.manual_seed(0)
    block = Upsample2D(channels, use_conv=True, out_channels=out_channels, bias=bias, name=name).eval().to(dtype)
    return block, fastpaths.apply(copy.deepcopy(block), upsample=True)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias, name", [(True, "conv"), (False, "Conv2d_0")])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_phase_upsampling_equals_diffusers_up_to_rounding(dtype, tolerance, bias, name, channels_last):
    block, fast = _upsampler(dtype, bias=bias, name=name)
    assert type(fast) is fastpaths.InferenceUpsample2D
    x = torch.randn(2, 8, 5, 7, dtype=dtype)  # odd sizes: the borders of every phase
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        ours, theirs = fast(x), block(x)
    assert ours.shape == theirs.shape == (2, 6, 10, 14)
    assert (ours - theirs).abs().max().item() <= tolerance * theirs.abs().max().item()
    assert not torch.equal(ours, block(x)) or dtype == torch.float64  # the phase form ran (float32 rounds apart)


def test_phase_upsampling_in_bfloat16_decodes_as_close_to_float32_as_diffusers():
    # One layer alone rounds its summed kernels once more (measured 1.7x diffusers' mean error against float64);
    # through a whole decoder the other bfloat16 roundings dominate (SD-size random VAE at 256: 46.9 against
    # 47.1 dB PSNR to float32).
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=16).eval()
    latent = torch.randn(1, 4, 16, 16)
    with torch.inference_mode():
        exact = vae.decode(latent).sample.double()
    theirs = copy.deepcopy(vae).to(torch.bfloat16).to(memory_format=torch.channels_last)
    ours = fastpaths.apply(copy.deepcopy(theirs), upsample=True)
    assert sum(isinstance(m, fastpaths.InferenceUpsample2D) for m in ours.modules()) == 2

    def error(model) -> float:
        with torch.inference_mode():
            out = model.decode(latent.to(torch.bfloat16).to(memory_format=torch.channels_last)).sample
        return (out.double() - exact).abs().mean().item()

    assert error(ours) <= 1.1 * error(theirs)


def test_phase_upsampling_steps_aside_where_it_would_differ():
    block, fast = _upsampler(torch.float32)
    x = torch.randn(1, 8, 5, 7)
    with torch.inference_mode():
        # an output size that is not twice the input (the UNet asks for one when sizes are odd multiples)
        assert torch.equal(fast(x, output_size=(11, 14)), block(x, output_size=(11, 14)))
        # a LoRA's forward hook on the convolution must see it run
        hook = lambda module, args, output: output + 1  # noqa: E731
        handles = [m.conv.register_forward_hook(hook) for m in (block, fast)]
        assert torch.equal(fast(x), block(x))
        for h in handles:
            h.remove()
    assert torch.equal(fast.train()(x), block.train()(x))


def test_phase_kernels_follow_weights_changed_in_place():
    block, fast = _upsampler(torch.float32)
    x = torch.randn(1, 8, 4, 4)
    with torch.inference_mode():
        before = fast(x)
        for m in (block, fast):
            m.conv.weight.mul_(-2.0)
            m.conv.bias.add_(1.0)
        after, expected = fast(x), block(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=1e-5)


@pytest.mark.parametrize("memory_format, phases", [("auto", True), ("contiguous", False)])
def test_vaes_upsample_in_phases_only_in_the_fast_layout(executor, models_root, tmp_path, memory_format, phases):
    from tests.nodes.test_parity import graph

    executor.settings = ng.Settings(models_dir=models_root, dtype="float32", device="cpu",
                                    memory_format=memory_format, temp_dir=tmp_path / "t", output_dir=tmp_path / "o")
    executor.cache.clear()
    result = executor.run(graph("tiny-lcm", "a red circle"), outputs=["ckpt"])
    vae_kinds = {type(m) for m in result.output("ckpt", "vae").vae.modules() if isinstance(m, Upsample2D)}
    unet_kinds = {type(m) for m in result.output("ckpt", "model").unet.modules() if isinstance(m, Upsample2D)}
    assert vae_kinds == ({fastpaths.InferenceUpsample2D} if phases else {Upsample2D})
    assert unet_kinds == {Upsample2D}
