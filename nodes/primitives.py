"""Primitive value nodes: a number or a text produced once and linked into several widgets."""

from __future__ import annotations

from nodegraph import Float, Int, Node, Output, String


class Integer(Node):
    """A whole number to link into any INT input (e.g. one seed shared by several samplers)."""

    category = "primitives"
    value = Int(default=0, min=-(2**63), max=2**64 - 1)
    outputs = (Output("value", "INT"),)

    def run(self, ctx, value):
        return value


class Number(Node):
    """A real number to link into any FLOAT input."""

    category = "primitives"
    value = Float(default=0.0)
    outputs = (Output("value", "FLOAT"),)

    def run(self, ctx, value):
        return value


class Text(Node):
    """A text to link into any STRING input (e.g. one prompt shared by several encoders)."""

    category = "primitives"
    value = String(default="", multiline=True)
    outputs = (Output("value", "STRING"),)

    def run(self, ctx, value):
        return value


NODES = [Integer, Number, Text]
