"""ComfyUI API clients from PyPI, run unchanged against a real ``nodegraph serve`` on the embedded demo model.

The server runs in a subprocess for the package, on a free loopback port, with its own empty folders; the clients
talk to it as they would to ComfyUI on 127.0.0.1:8188. Each test module skips itself when its client is not
installed (they come with the ``test`` extras).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from ..serving import running_server


@pytest.fixture(scope="package")
def server_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("comfy-clients")
    dirs = {name: root / name for name in ("models", "input", "output", "data", "temp")}
    for path in dirs.values():
        path.mkdir()
    return dirs


@pytest.fixture(scope="package")
def server(server_dirs) -> str:
    """The URL of a running ``nodegraph serve`` (the demo models are embedded: no model files needed)."""
    with running_server(server_dirs, probe="/system_stats") as url:
        yield url


@pytest.fixture
def source_png(tmp_path) -> Path:
    """A small picture to upload: left half red, right half blue."""
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 64))
    path = tmp_path / "halves.png"
    image.save(path)
    return path


def decoded(data: bytes) -> Image.Image:
    """A PNG the server sent, decoded and checked."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def is_square(image: Image.Image) -> bool:
    """A text-to-image result of the demo model: EmptyLatentImage's latent is 1/8 of the pixels (ComfyUI's rule),
    and the demo VAE decodes 4x, so 64x64 asks give 32x32 pictures; only the shape is checked."""
    return image.width == image.height >= 32
