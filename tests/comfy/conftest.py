"""Settings for running imported ComfyUI workflows on the embedded demo model: temporary folders, an input folder with
a small picture (also in a subfolder, as ComfyUI's uploads put them), exact float32 on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import nodegraph as ng


@pytest.fixture(scope="session")
def comfy_input(tmp_path_factory):
    folder = tmp_path_factory.mktemp("comfy-input")
    y, x = np.mgrid[0:64, 0:64]
    picture = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(picture).save(folder / "picture.png")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[16:48, 16:48] = 0  # transparent: the part to redraw
    (folder / "uploads").mkdir()
    for path in (folder / "with-alpha.png", folder / "uploads" / "with-alpha.png"):
        Image.fromarray(np.dstack([picture, alpha]), "RGBA").save(path)
    return folder


@pytest.fixture
def settings(tmp_path, comfy_input):
    return ng.Settings(device="cpu", dtype="float32", memory_format="contiguous", models_dir=tmp_path / "models",
                       input_dir=comfy_input, output_dir=tmp_path / "out", temp_dir=tmp_path / "temp")
