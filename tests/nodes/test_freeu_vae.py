"""FreeU as a patch, and the VAE's tiling and slicing options, against diffusers."""

from __future__ import annotations

import pytest
import torch

from nodegraph import Link as L

from .conftest import max_diff
from .conftest import generator
from .test_parity import graph, ours


def test_freeu_matches_diffusers_and_leaves_the_cached_model_alone(executor, pipelines):
    wf = graph("tiny-sd", "a red circle", seed=4, guidance=1.0)
    wf.add("freeu", "FreeU", model=L("ckpt", "model"), s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    wf.set("sample", "model", L("freeu", "model"))
    pipe = pipelines["sd"]
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        expected = pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, generator=generator(4), height=64,
                        width=64, output_type="np").images
    finally:
        pipe.disable_freeu()
    got = ours(executor, wf)
    assert max_diff(got, expected) <= 1e-5
    plain = ours(executor, graph("tiny-sd", "a red circle", seed=4, guidance=1.0))
    assert max_diff(plain, got) > 1e-3  # FreeU changed the image; the unpatched branch did not see it
    unet = executor.run(wf, outputs=["ckpt"]).output("ckpt", "model").unet
    assert all(getattr(block, "s1", None) is None for block in unet.up_blocks)




@pytest.mark.parametrize("tiled, sliced, size, batch", [(True, False, 128, 1), (False, True, 64, 3),
                                                        (True, True, 128, 2)])
def test_vae_tiling_and_slicing_match_diffusers(executor, pipelines, tiled, sliced, size, batch):
    from nodes.latent import decode
    from nodes.values import Vae

    vae = pipelines["sd"].vae
    latents = torch.randn(batch, 4, size // 8, size // 8, generator=generator(0))
    vae.use_tiling, vae.use_slicing = tiled, sliced
    try:
        with torch.inference_mode():
            expected = vae.decode(latents / vae.config.scaling_factor).sample
    finally:
        vae.use_tiling = vae.use_slicing = False
    expected = (expected * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    got = decode(Vae(vae, "tiny"), latents, tiled=tiled, sliced=sliced)
    assert torch.equal(got, expected)
    assert vae.use_tiling is False and vae.use_slicing is False
    if tiled:
        assert max_diff(got, decode(Vae(vae, "tiny"), latents)) > 0  # tiles really were used


def test_decode_options_are_widgets_on_the_node(executor):
    wf = graph("tiny-sd", "a cat", guidance=1.0)
    wf.set("decode", "tiled", True)
    wf.set("decode", "sliced", True)
    assert executor.run(wf).status == "success"
