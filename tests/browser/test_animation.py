"""The canvas shows a saved animation playing on its SaveAnimation node (an animated WebP from the output folder)."""

from __future__ import annotations

import pytest

from .helpers import load, node

pytestmark = pytest.mark.browser


def test_an_animation_shows_on_its_node_and_plays(page, server_dirs):
    pattern = {"width": 32, "height": 32, "steps": 1}
    load(page, {"format": "nodegraph/workflow", "version": 1, "nodes": {
        "1": {"type": "TestPattern", "inputs": {**pattern, "seed": 1}, "ui": {"pos": [0, 0]}},
        "2": {"type": "TestPattern", "inputs": {**pattern, "seed": 2}, "ui": {"pos": [0, 260]}},
        "3": {"type": "ImageBatch", "inputs": {"image1": {"link": ["1", "image"]}, "image2": {"link": ["2", "image"]}},
              "ui": {"pos": [300, 100]}},
        "4": {"type": "SaveAnimation", "inputs": {"images": {"link": ["3", "image"]}, "filename_prefix": "clip",
                                                  "fps": 4, "format": "webp"}, "ui": {"pos": [600, 100]}},
    }})
    page.click("#btn-run")
    shown = node(page, "4").locator("img").first
    shown.wait_for(timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth === 32", arg=shown.element_handle())
    assert ".webp" in shown.get_attribute("src")
    [saved] = list(server_dirs["output"].glob("clip_*.webp"))
    from PIL import Image

    with Image.open(saved) as image:
        assert image.n_frames == 2
