"""--compile: the samplers run a checkpoint's UNet through torch.compile (inductor, frozen weights) and draw what the
eager UNet draws; handles whose patches change the weights while they run stay eager; a failing compiler falls
back to the eager module."""

from __future__ import annotations

import logging

import pytest
import torch

import nodegraph as ng
from nodes import compilation
from tests.nodes.conftest import max_diff
from tests.nodes.test_parity import graph


def _image(settings, **kwargs):
    executor = ng.Executor(ng.build_registry(), settings=settings)
    return executor.run(graph("tiny-lcm", "a red circle", width=32, height=32, **kwargs)).output("decode")


def test_a_compiled_unet_draws_what_the_eager_one_draws(settings, caplog):
    if shutil_which_cc() is None:
        pytest.skip("inductor needs a C++ compiler on the CPU")
    eager = _image(settings)
    with caplog.at_level(logging.WARNING, logger="nodes.compilation"):
        compiled = _image(settings.replace(compile=True))
    assert not [r for r in caplog.records if r.name == "nodes.compilation"], "compilation fell back to eager"
    assert max_diff(compiled, eager) < 1e-4  # the same float32 maths, fused differently


def test_only_unpatched_handles_on_cpu_or_cuda_are_compiled():
    class Unet(torch.nn.Linear):
        device = torch.device("cpu")

    class Handle:
        patches = ()

    unet, handle = Unet(2, 2), Handle()
    assert compilation.unet_for(handle, unet, enabled=False) is unet
    assert compilation.unet_for(handle, unet, enabled=True) is not unet
    handle.patches = (object(),)  # a LoRA: its weights change while it runs, the frozen graph would not see it
    assert compilation.unet_for(handle, unet, enabled=True) is unet
    handle.patches = ()
    Unet.device = torch.device("meta")
    assert compilation.unet_for(handle, Unet(2, 2), enabled=True).__class__ is Unet


def test_a_failing_compiler_falls_back_to_the_eager_unet(settings, monkeypatch, caplog):
    def broken(module, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    eager = _image(settings, seed=3)
    with caplog.at_level(logging.WARNING, logger="nodes.compilation"):
        fallen_back = _image(settings.replace(compile=True), seed=3)
    assert torch.equal(torch.as_tensor(fallen_back), torch.as_tensor(eager))
    assert "no C++ compiler found" in caplog.text


def test_compile_is_a_setting_of_the_environment_and_the_cache_key():
    assert ng.Settings.from_env({"NODEGRAPH_COMPILE": "1"}).compile is True
    assert ng.Settings.from_env({"NODEGRAPH_COMPILE": "off"}).compile is False
    with pytest.raises(ValueError, match="NODEGRAPH_COMPILE"):
        ng.Settings.from_env({"NODEGRAPH_COMPILE": "maybe"})
    assert ng.Settings(compile=True).fingerprint() != ng.Settings().fingerprint()


def shutil_which_cc():
    import shutil

    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
