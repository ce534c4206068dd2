"""Toy node types for engine tests: plain Python, no torch. Each run is counted, so tests can assert what ran."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from nodegraph import (Boolean, Combo, Float, Folder, Int, Node, NodeOutput, Output, Registry, Socket, String,
                       file_identity)

RUNS: Counter = Counter()
FILES_DIR = Path(".")


class Const(Node):
    """A constant integer."""
    category = "toy"
    value = Int(default=0, min=-1000, max=1000)
    outputs = (Output("value", "INT"),)

    def run(self, ctx, value):
        RUNS["Const"] += 1
        return value


class Add(Node):
    """a + b."""
    category = "toy"
    a = Socket("INT")
    b = Int(default=0, min=-10**6, max=10**6)
    outputs = (Output("sum", "INT"),)

    def run(self, ctx, a, b):
        RUNS["Add"] += 1
        return a + b


class Scale(Node):
    """x * factor as a float, with a step-constrained factor."""
    category = "toy"
    x = Socket("INT")
    factor = Float(default=1.0, min=0.0, max=10.0, step=0.25)
    even = Int(default=2, min=0, max=10, step=2)
    outputs = (Output("result", "FLOAT"),)

    def run(self, ctx, x, factor, even):
        RUNS["Scale"] += 1
        return x * factor


class Pair(Node):
    """Two outputs: the value and its negation."""
    category = "toy"
    x = Socket("INT")
    outputs = (Output("same", "INT"), Output("negated", "INT"))

    def run(self, ctx, x):
        RUNS["Pair"] += 1
        return {"same": x, "negated": -x}


class Words(Node):
    """Text options for combo and boolean checks."""
    category = "toy"
    mode = Combo(options=["upper", "lower"], default="upper")
    text = String(default="hi", multiline=True)
    shout = Boolean(default=False)
    extra = Socket("INT", optional=True)
    outputs = (Output("text", "STRING"),)

    def run(self, ctx, mode, text, shout, extra=None):
        RUNS["Words"] += 1
        out = text.upper() if mode == "upper" else text.lower()
        return out + ("!" if shout else "") + ("" if extra is None else str(extra))


class ReadFile(Node):
    """Reads a file from FILES_DIR; the file's identity is part of the cache key."""
    category = "toy"
    filename = Combo(options=lambda settings: sorted(p.name for p in FILES_DIR.iterdir()),
                     identity_of=lambda n, settings: file_identity(FILES_DIR / n))
    outputs = (Output("text", "STRING"),)

    def run(self, ctx, filename):
        RUNS["ReadFile"] += 1
        return (FILES_DIR / filename).read_text()


class Fail(Node):
    """Always raises."""
    category = "toy"
    x = Socket("INT")
    outputs = (Output("x", "INT"),)

    def run(self, ctx, x):
        RUNS["Fail"] += 1
        raise RuntimeError(f"boom on {x}")


class Steps(Node):
    """Reports progress over `steps` steps; calls `on_step` hooks (tests use them to cancel mid-node)."""
    category = "toy"
    x = Socket("INT")
    steps = Int(default=3, min=1, max=100)
    outputs = (Output("x", "INT"),)
    hooks: list = []

    def run(self, ctx, x, steps):
        RUNS["Steps"] += 1
        for i in range(steps):
            for hook in self.hooks:
                hook(ctx, i)
            ctx.progress(i + 1, steps)
        return x


class Random(Node):
    """Not cacheable: reruns every time."""
    category = "toy"
    cacheable = False
    outputs = (Output("value", "INT"),)

    def run(self, ctx):
        RUNS["Random"] += 1
        return RUNS["Random"]


class Show(Node):
    """An output node: publishes its input as a UI result."""
    category = "toy"
    output_node = True
    value = Socket("*")

    def run(self, ctx, value):
        RUNS["Show"] += 1
        return NodeOutput((), {"text": [repr(value)]})


STYLES = Folder("loras", what="styles", suffixes=(".safetensors",))


class Style(Node):
    """Names a file of the models folder's loras/ (a model folder declared by a node, as loaders do)."""
    category = "toy"
    style = Combo(options=STYLES)
    outputs = (Output("size", "INT"),)

    def run(self, ctx, style):
        return STYLES.locate(ctx.settings, style).stat().st_size


ALL = [Const, Add, Scale, Pair, Words, ReadFile, Fail, Steps, Random, Show, Style]


def registry() -> Registry:
    return Registry(ALL)
