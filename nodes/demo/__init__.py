"""The embedded demo model: a procedural "coloured shapes" dataset and a deterministic judge.

:mod:`nodes.demo.shapes` renders captioned 64x64 images ("a red circle on a blue background") and
scores whether any image matches its caption. ``scripts/train_demo_model.py`` trains the tiny LCM
shipped in ``nodes/data/demo/`` on this data; ``benchmarks/demo_quality.py`` measures it with the judge.
"""

from .shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    IMAGE_SIZE,
    SHAPES,
    all_combos,
    caption,
    judge,
    parse_caption,
    render,
    sample_batch,
    train_combos,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT",
    "IMAGE_SIZE",
    "SHAPES",
    "all_combos",
    "caption",
    "judge",
    "parse_caption",
    "render",
    "sample_batch",
    "train_combos",
]
