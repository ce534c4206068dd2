"""Tiny random-weight models, built once per test run, in a models folder the test's settings point at."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodes.testing.tiny import build_tiny_sd, build_tiny_sdxl, write_single_file


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ckpts = root / "checkpoints"
    build_tiny_sd(ckpts / "tiny-lcm", lcm=True, seed=0)
    build_tiny_sd(ckpts / "tiny-sd", lcm=False, seed=1)
    write_single_file(ckpts / "tiny-sd", ckpts / "tiny-sd.safetensors")
    build_tiny_sdxl(ckpts / "tiny-sdxl", lcm=False, seed=30)
    build_tiny_sdxl(ckpts / "tiny-sdxl-lcm", lcm=True, seed=31)
    return root


@pytest.fixture(scope="session")
def input_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input")
    rng = np.random.default_rng(0)
    # a smooth picture (random pixels would make img2img comparisons meaningless) and a mask of its right half
    y, x = np.mgrid[0:64, 0:64]
    picture = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    picture[16:40, 20:44] = rng.integers(0, 255, size=3)
    Image.fromarray(picture).save(folder / "picture.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    rgba = np.dstack([picture, 255 - mask])
    Image.fromarray(rgba, "RGBA").save(folder / "with-alpha.png")
    return folder


#: Settings under which our graphs must match diffusers' pipelines exactly: float32, contiguous weights (the
#: default channels_last layout on the CPU is faster but rounds differently; test_channels_last covers it), and
#: the CPU, where the reference pipelines run, even on a CUDA machine (test_cuda covers the GPU);
#: NODEGRAPH_TEST_DEVICE=cuda runs every graph of the suite there instead.
EXACT = {"dtype": "float32", "memory_format": "contiguous", "device": os.environ.get("NODEGRAPH_TEST_DEVICE", "cpu")}
if EXACT["device"].startswith("cuda"):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 (test_cuda)


@pytest.fixture
def settings(models_root, input_dir, tmp_path):
    """The settings of a test's executor (a module may narrow them by overriding this fixture)."""
    return ng.Settings(**EXACT, models_dir=models_root, input_dir=input_dir, temp_dir=tmp_path / "temp",
                       output_dir=tmp_path / "out")


@pytest.fixture
def executor(settings):
    return ng.Executor(ng.build_registry(), settings=settings)


def max_diff(a, b) -> float:
    return float((torch.as_tensor(np.asarray(a)) - torch.as_tensor(np.asarray(b))).abs().max())


def in_maps_of(path, tensors) -> list[bool]:
    """Whether each tensor lies in this process's private maps of the file at ``path`` (/proc/self/maps)."""
    from nodegraph import filemaps

    st = os.stat(path)
    ranges = filemaps.private_maps((st.st_dev, st.st_ino)) if os.path.exists("/proc/self/maps") else []
    return [any(a <= t.data_ptr() < b for a, b in ranges) for t in tensors]


def spy_reads(monkeypatch) -> list[str]:
    """The keys every StreamedSafetensors is asked for from now on (until ``monkeypatch.undo()``), in order."""
    from nodes.loading import StreamedSafetensors

    read: list[str] = []
    original = StreamedSafetensors.__getitem__
    monkeypatch.setattr(StreamedSafetensors, "__getitem__", lambda self, key: read.append(key) or original(self, key))
    return read


@pytest.fixture(scope="session")
def pipelines(models_root):
    """diffusers' own pipelines over the tiny models: the reference our graphs are compared with."""
    from diffusers import (LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline,
                           StableDiffusionInpaintPipeline, StableDiffusionPipeline)

    ckpts = models_root / "checkpoints"
    lcm = LatentConsistencyModelPipeline.from_pretrained(ckpts / "tiny-lcm", local_files_only=True)
    sd = StableDiffusionPipeline.from_pretrained(ckpts / "tiny-sd", local_files_only=True)
    out = {
        "lcm": lcm,
        "lcm_img2img": LatentConsistencyModelImg2ImgPipeline(**lcm.components),
        "sd": sd,
        "sd_inpaint": StableDiffusionInpaintPipeline(**sd.components),
        "lcm_inpaint": StableDiffusionInpaintPipeline(**{k: v for k, v in lcm.components.items()
                                                         if k != "image_encoder"}, image_encoder=None),
    }
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


def generator(seed):
    return torch.Generator("cpu").manual_seed(seed)
