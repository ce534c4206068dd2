"""Small nodes for the browser tests: an image source with progress and previews (no model needed), a node that
always fails, and a node with a list input. Loaded with ``--node-path``; never part of the shipped library."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from PIL import Image

from nodegraph import Boolean, Combo, Float, Int, ListOf, Node, NodeOutput, Output, Socket, String


class TestPattern(Node):
    """A colour gradient, drawn in a few steps that each report progress and send a preview. seed picks the
    colours."""

    category = "testing"
    width = Int(default=64, min=8, max=512, step=8)
    height = Int(default=64, min=8, max=512, step=8)
    seed = Int(default=0, min=0, max=2**32 - 1)
    steps = Int(default=3, min=1, max=20)
    delay = Float(default=0.0, min=0.0, max=5.0, step=0.05)
    outputs = (Output("image", "IMAGE"),)

    def run(self, ctx, width, height, seed, steps, delay):
        rng = np.random.default_rng(seed)
        a, b = rng.random(3), rng.random(3)
        t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
        row = a * (1 - t) + b * t
        image = np.broadcast_to(row, (height, width, 3)).astype(np.float32)
        for i in range(steps):
            preview = Image.fromarray((image * 255 * (i + 1) / steps).astype("uint8"))
            ctx.progress(i + 1, steps, preview)
            time.sleep(delay)
        return torch.from_numpy(image.copy())[None]


class TestFail(Node):
    """Always fails: for testing how errors show."""

    category = "testing"
    images = Socket("IMAGE")
    outputs = (Output("images", "IMAGE"),)

    def run(self, ctx, images):
        raise ValueError("this node fails on purpose")


class TestOptions(Node):
    """Every widget kind at once; shows its inputs as text."""

    category = "testing"
    output_node = True
    count = Int(default=2, min=0, max=10)
    ratio = Float(default=0.5, min=0.0, max=1.0, step=0.05)
    label = String(default="hello")
    notes = String(default="", multiline=True)
    enabled = Boolean(default=True)
    mode = Combo(options=["fast", "slow"], default="fast")
    rows = ListOf(name=Combo(options=["a.bin", "b.bin"]), weight=Float(default=1.0, min=-2.0, max=2.0, step=0.05),
                  max_items=4)
    value = Socket("*", optional=True)

    def run(self, ctx, count, ratio, label, notes, enabled, mode, rows, value=None):
        shown = {"count": count, "ratio": ratio, "label": label, "enabled": enabled, "mode": mode, "rows": rows}
        return NodeOutput((), {"text": [json.dumps(shown)]})


NODES = [TestPattern, TestFail, TestOptions]
