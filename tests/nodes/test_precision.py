"""The precision policy: without --dtype, CPUs that compute bfloat16 natively run in it, others in float32;
an explicit dtype always wins (the rest of the suite pins float32 for its exact comparisons)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nodegraph as ng
from nodes import devices
from tests.nodes.test_parity import graph


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU does (True) or does not (False) have bfloat16 in hardware."""
    def pretend(value: bool) -> None:
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: value)
    return pretend


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_cpu_default_follows_the_hardware(native_bf16, native, expected):
    native_bf16(native)
    cpu = torch.device("cpu")
    assert devices.dtype(ng.Settings(), cpu) == expected
    assert devices.dtype(ng.Settings(dtype="float32"), cpu) == torch.float32  # an explicit choice wins
    assert devices.dtype(ng.Settings(dtype="bfloat16"), cpu) == torch.bfloat16


def test_accelerators_default_to_float16(native_bf16):
    native_bf16(True)
    for kind in ("cuda", "mps"):
        assert devices.dtype(ng.Settings(), torch.device(kind)) == torch.float16


def test_the_detection_agrees_with_the_cpu_flags():
    flags = Path("/proc/cpuinfo")
    if not flags.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    words = set(flags.read_text(errors="replace").split())
    devices.cpu_has_native_bf16.cache_clear()
    assert devices.cpu_has_native_bf16() == bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


@pytest.mark.parametrize("native", [True, False])
def test_a_default_run_loads_and_samples_in_the_chosen_precision(native_bf16, native, models_root, tmp_path):
    native_bf16(native)
    settings = ng.Settings(models_dir=models_root, output_dir=tmp_path, device="cpu")  # no dtype given
    executor = ng.Executor(ng.build_registry(), settings=settings)
    wf = graph("tiny-lcm", "a red circle", width=32, height=32)
    result = executor.run(wf, outputs=["decode", "ckpt"])
    expected = torch.bfloat16 if native else torch.float32
    assert {p.dtype for p in result.output("ckpt", "model").unet.parameters()} == {expected}
    image = torch.as_tensor(result.output("decode"))
    assert torch.isfinite(image).all() and image.dtype == torch.float32  # images leave in float32 whatever ran


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_system_stats_say_which_precision_runs(native_bf16, native, expected):
    import nodes

    native_bf16(native)
    assert [d["dtype"] for d in nodes.system_info(ng.Settings(device="cpu"))] == [expected]
    assert [d["dtype"] for d in nodes.system_info(ng.Settings(device="cpu", dtype="float16"))] == ["float16"]
