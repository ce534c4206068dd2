"""Toy node types for the server tests (plain Python and PIL, no torch): a node that reports progress with a
preview image, a LoadImage that lists and reads the input folder as the real one does, and an output node that
shows what ComfyUI's ``extra_pnginfo`` a run carries (as SaveImage would embed it)."""

from __future__ import annotations

from PIL import Image

from nodegraph import Combo, Int, Node, NodeOutput, Output, Registry, Socket
from nodegraph.folders import INPUT

from ..engine import toy

PICTURES = INPUT.with_suffixes((".png", ".jpg"), what="images")


def shade(step: int) -> tuple[int, int, int]:
    """The colour of the preview of step ``step`` (so a test can tell previews apart)."""
    return (40 * step, 0, 255 - 40 * step)


class Glimpse(Node):
    """Reports progress over `steps` steps, each with a small preview image."""
    category = "toy"
    x = Socket("INT")
    steps = Int(default=2, min=1, max=5)
    outputs = (Output("x", "INT"),)

    def run(self, ctx, x, steps):
        for i in range(steps):
            ctx.progress(i + 1, steps, preview=Image.new("RGB", (4, 4), shade(i)))
        return x


class LoadImage(Node):
    """Names an image of the input folder (uploads land there) and describes it: size and first pixel."""
    category = "toy"
    image = Combo(options=PICTURES, upload="image")
    outputs = (Output("description", "STRING"),)

    def run(self, ctx, image):
        with Image.open(PICTURES.locate(ctx.settings, image)) as picture:
            rgb = picture.convert("RGB")
            return f"{rgb.width}x{rgb.height} {rgb.getpixel((0, 0))}"


class Provenance(Node):
    """An output node: shows the ``extra_pnginfo`` of the workflow being run (its keys and their values as JSON)."""
    category = "toy"
    output_node = True
    value = Socket("*")
    cacheable = False

    def run(self, ctx, value):
        meta = (ctx.workflow or {}).get("meta") or {}
        return NodeOutput((), {"extra_pnginfo": [meta.get("extra_pnginfo")]})


def registry(load_image: type[Node] = LoadImage) -> Registry:
    """The engine's toy nodes, Glimpse, Provenance, and a LoadImage (this one, or the node library's)."""
    return Registry([*toy.ALL, Glimpse, Provenance, load_image])
