"""The CPU default stores convolution weights channels_last where oneDNN runs them faster (the VAE always, the UNet in
bfloat16, and in float32 where its convolutions keep blocked weights): the images stay within float rounding of the
contiguous layout, which matches diffusers' pipelines exactly."""

from __future__ import annotations

import pytest
import torch

import nodegraph as ng


from .conftest import max_diff
from .test_parity import graph


def _run(executor, memory_format, models_root, input_dir, tmp_path, **kwargs):
    executor.settings = ng.Settings(models_dir=models_root, input_dir=input_dir, dtype="float32", device="cpu",
                                    memory_format=memory_format, temp_dir=tmp_path / "temp",
                                    output_dir=tmp_path / "out")
    executor.cache.clear()
    wf = graph("tiny-lcm", "a red cube", **kwargs)
    wf.outputs = ["decode", "ckpt"]
    result = executor.run(wf)
    assert result.status == "success", result.errors
    return result


@pytest.mark.parametrize("kwargs", [dict(steps=4), dict(steps=2, image="picture.png", strength=0.6)])
def test_channels_last_is_the_cpu_default_and_within_rounding_of_contiguous(executor, models_root, input_dir,
                                                                            tmp_path, kwargs):
    fast = _run(executor, "auto", models_root, input_dir, tmp_path, **kwargs)
    exact = _run(executor, "contiguous", models_root, input_dir, tmp_path, **kwargs)
    unet = fast.output("ckpt", "model").unet
    vae = fast.output("ckpt", "vae").vae
    from nodes import devices, fastpaths

    # float32: the UNet runs faster contiguous, unless its convolutions keep blocked weights (then channels_last)
    assert devices.prefers_channels_last(unet) is fastpaths.packing_works(torch.float32)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert exact.output("ckpt", "model").unet.conv_in.weight.is_contiguous()
    diff = max_diff(fast.output("decode", "image"), exact.output("decode", "image"))
    assert diff <= 1e-4


@pytest.mark.parametrize("dtype, unet_channels_last", [("float32", None), ("bfloat16", True)])
def test_the_auto_layout_is_chosen_per_part_and_precision(dtype, unet_channels_last):
    from nodes import devices, fastpaths

    if unet_channels_last is None:  # float32: where the convolutions can keep blocked weights
        unet_channels_last = fastpaths.packing_works(torch.float32)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    settings = ng.Settings(dtype=dtype)
    assert devices.channels_last(settings, cpu, "unet") is unet_channels_last
    assert devices.channels_last(settings, cpu, "vae") is True
    assert devices.channels_last(settings, cuda, "vae") is False
    assert devices.channels_last(settings.replace(memory_format="channels_last"), cuda, "unet") is True
    assert devices.channels_last(settings.replace(memory_format="contiguous"), cpu, "vae") is False


def test_an_unknown_memory_format_is_a_clear_error_before_anything_runs():
    with pytest.raises(ValueError, match="unknown memory format 'nhwc'"):
        ng.Settings(memory_format="nhwc")
