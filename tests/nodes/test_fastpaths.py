"""The inference form of ResnetBlock2D is bit-identical to diffusers' and is what loaded checkpoints run (so every
parity test of the suite runs through it)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from nodes import fastpaths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_channels, temb_channels", [(8, 16), (16, 16), (8, None)])
def test_the_inference_block_is_bit_identical(dtype, out_channels, temb_channels):
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=out_channels, temb_channels=temb_channels, groups=4).eval()
    block = block.to(dtype)
    fast = fastpaths.apply(copy.deepcopy(block))
    assert type(fast) is fastpaths.InferenceResnetBlock2D
    x = torch.randn(2, 8, 12, 12, dtype=dtype)
    temb = torch.randn(2, temb_channels, dtype=dtype) if temb_channels else None
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
        assert fastpaths.InferenceResnetBlock2D in kinds
