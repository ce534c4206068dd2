"""ConditioningCombine: two prompts sampled together, their noise predictions averaged at every step."""

from __future__ import annotations

import pytest
import torch

import nodegraph as ng
from nodegraph import Link as L

from .conftest import max_diff
from .test_parity import add_latent, ours


def combined_graph(first: str, second: str | None, *, ckpt="tiny-sd", guidance=4.0, sampler="ddim", lcm=False,
                   negative: str | None = "blurry") -> ng.Workflow:
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt=ckpt)
    wf.add("a", "CLIPEncode", clip=L("ckpt", "clip"), text=first)
    positive = L("a", "conditioning")
    if second is not None:
        wf.add("b", "CLIPEncode", clip=L("ckpt", "clip"), text=second)
        wf.add("both", "ConditioningCombine", conditioning_1=positive, conditioning_2=L("b", "conditioning"))
        positive = L("both", "conditioning")
    add_latent(wf)
    inputs = dict(model=L("ckpt", "model"), positive=positive, latent=L("latent", "latent"), seed=2,
                  guidance=guidance)
    if negative is not None and not lcm:
        wf.add("neg", "CLIPEncode", clip=L("ckpt", "clip"), text=negative)
        inputs["negative"] = L("neg", "conditioning")
    if lcm:
        wf.add("sched", "LCMScheduler", model=L("ckpt", "model"), steps=3)
        wf.add("sample", "LCMSampler", schedule=L("sched", "schedule"), **inputs)
    else:
        wf.add("sample", "Sampler", steps=3, sampler=sampler, **inputs)
    wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample", "latent"))
    wf.outputs = ["decode"]
    return wf


@pytest.mark.parametrize("kwargs", [dict(guidance=4.0), dict(guidance=1.0), dict(guidance=1.0, negative=None),
                                    dict(ckpt="tiny-lcm", lcm=True, guidance=6.0)],
                         ids=["cfg", "no-cfg", "no-negative", "lcm-distilled"])
def test_a_prompt_combined_with_itself_is_that_prompt(executor, kwargs):
    alone = ours(executor, combined_graph("a red cube", None, **kwargs))
    doubled = ours(executor, combined_graph("a red cube", "a red cube", **kwargs))
    # the same predictions, from a larger UNet batch (its kernels may round differently)
    assert max_diff(alone, doubled) <= 1e-5


def test_combining_two_prompts_averages_their_predictions(executor):
    """One Euler step from pure noise is linear in the noise prediction: with guidance 1 the combined image's
    latents are exactly halfway between the two prompts' own."""
    def latents(first, second):
        wf = combined_graph(first, second, guidance=1.0, negative=None, sampler="euler")
        wf.set("sample", "steps", 1)
        wf.outputs = ["sample"]
        result = executor.run(wf)
        assert result.status == "success", result.errors
        return result.output("sample", "latent").samples

    a, b = latents("a red cube", None), latents("a blue ball", None)
    both = latents("a red cube", "a blue ball")
    assert max_diff(both, (a + b) / 2) <= 1e-5
    assert max_diff(both, latents("a blue ball", "a red cube")) <= 1e-6  # the order does not matter
    assert max_diff(a, b) > 1e-3


def test_combined_prompts_with_a_controlnet_are_a_clear_error(executor):
    from nodes.sampling import _prepare_guidance
    from nodes.values import Conditioning

    class Model:
        lcm_distilled = False
        unet = type("U", (), {"config": type("C", (), {"addition_embed_type": None})()})()

    cond = Conditioning(torch.zeros(1, 77, 32), ("a",), extras=("a control",),
                        also=(Conditioning(torch.zeros(1, 77, 32), ("b",)),))
    with pytest.raises(ValueError, match="without ControlNets"):
        _prepare_guidance(Model(), cond, None, 1.0, (1, 4, 8, 8), torch.float32, torch.device("cpu"))
