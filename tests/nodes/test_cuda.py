"""On a CUDA machine (skipped elsewhere): the graphs run on the GPU in float16 (the default there) and float32, agree
with the CPU and with diffusers' own pipeline on the same device, and the demo model still draws its prompt.

The rest of the suite pins the CPU (``NODEGRAPH_TEST_DEVICE``, see conftest) so that its parity checks stay exact;
``NODEGRAPH_TEST_DEVICE=cuda python -m pytest tests/nodes`` runs every node path on the GPU as well (then parity
tolerances of 1e-5 may be exceeded by float rounding, but nothing may raise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nodegraph as ng
from nodegraph.assets import shipped_workflows, workflows_dir

from .conftest import EXACT, generator, max_diff
from .test_parity import graph
from .test_workflows import on_tiny_model, workflow_models  # noqa: F401  (the fixture the workflows need)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def on(models_root, input_dir, tmp_path):
    """on(device, dtype) -> a fresh executor whose nodes run there."""

    def make(device: str, dtype: str | None) -> ng.Executor:
        settings = ng.Settings(**{**EXACT, "device": device, "dtype": dtype}, models_dir=models_root,
                               input_dir=input_dir, temp_dir=tmp_path / "temp",
                               output_dir=tmp_path / f"out-{device}-{dtype}")
        return ng.Executor(ng.build_registry(), settings=settings)

    return make


@pytest.fixture
def no_tf32():
    """Exact float32 on the GPU: convolutions in TF32 (cuDNN's default) round to 10 bits and random-weight tiny
    models amplify that far beyond the 1e-5 the CPU parity checks hold to."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _images(executor: ng.Executor, wf: ng.Workflow) -> dict[str, torch.Tensor]:
    result = executor.run(wf)
    assert result.status == "success", result.errors
    found = {}
    for nid, entry in wf.nodes.items():
        if entry.type == "VAEDecode":
            image = result.output(nid, "image")
            assert image.device.type == "cpu" and image.dtype == torch.float32  # IMAGE values live on the CPU
            assert torch.isfinite(image).all(), f"node {nid} decoded non-finite pixels"
            found[nid] = image
    assert found
    return found


@pytest.mark.parametrize("name", shipped_workflows())
def test_each_shipped_workflow_runs_on_the_gpu_and_agrees_with_the_cpu_in_float32(on, name):
    cpu = _images(on("cpu", "float32"), on_tiny_model(name))
    fp32 = _images(on("cuda", "float32"), on_tiny_model(name))
    # float16, the default on CUDA, runs through: random-weight tiny models amplify its rounding too much for a
    # comparison with the CPU (diffusers' own float16 pipeline differs as much), so that is checked against
    # diffusers below, and on the trained demo model by what it draws
    fp16 = _images(on("cuda", None), on_tiny_model(name))
    for nid in cpu:
        assert max_diff(fp32[nid], cpu[nid]) < 2e-3, nid
        assert float(fp16[nid].std()) > 0.01, nid


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float16, 5e-3)])
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("case", [dict(steps=4), dict(steps=2, batch=2)], ids=["4 steps", "batch 2"])
def test_text_to_image_matches_the_lcm_pipeline_on_the_gpu(on, pipelines, dtype, tolerance, case):
    executor = on("cuda", str(dtype).removeprefix("torch."))
    ours = _images(executor, graph("tiny-lcm", "a red circle", seed=3, **case))["decode"]
    pipe = pipelines["lcm"].to("cuda", dtype)
    try:
        expected = pipe("a red circle", generator=generator(3), num_inference_steps=case["steps"],
                        num_images_per_prompt=case.get("batch", 1), guidance_scale=8.5, height=64, width=64,
                        output_type="np").images
    finally:
        pipe.to("cpu", torch.float32)
    assert max_diff(ours, expected) < tolerance


def test_the_demo_model_draws_its_prompt_in_float16(on):
    from nodes.demo import shapes

    wf = ng.load(workflows_dir() / "text-to-image.json")
    captions = ["a red circle on a blue background", "a yellow square on a green background",
                "a white triangle on a black background", "a blue circle on a white background"]
    executor = on("cuda", None)
    correct = 0
    for seed, caption in enumerate(captions):
        for nid, entry in wf.nodes.items():
            if entry.type == "CLIPEncode":
                wf.set(nid, "text", caption)
            elif entry.type == "LCMSampler":
                wf.set(nid, "seed", seed)
        [image] = _images(executor, wf).values()
        correct += shapes.judge(np.asarray((image[0].numpy() * 255).round(), np.uint8), caption)["correct"]
    assert correct >= 2


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd.safetensors"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_loads_onto_the_gpu_give_the_cpu_load_weights(models_root, name, dtype):
    """Streamed straight to the GPU, tensor by tensor (never whole in host memory): the weights a CPU load gives."""
    from nodes.loading import load_components

    path = models_root / "checkpoints" / name
    gpu = load_components(path, device="cuda", dtype=dtype)
    cpu = load_components(path, device="cpu", dtype=dtype)
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(gpu, part).state_dict(), getattr(cpu, part).state_dict()
        assert set(ours) == set(theirs), part
        assert all(t.device.type == "cuda" for t in ours.values()), part
        assert all(torch.equal(ours[k].cpu(), theirs[k]) for k in theirs), part
