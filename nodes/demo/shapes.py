"""Procedural captioned shapes and a judge that checks an image against its caption.

Dataset
    One flat shape (circle, square or triangle) in a named colour on a plain background of another
    named colour, 64x64 RGB, with the caption ``"a {colour} {shape} on a {background} background"``
    ("an orange ..." where English wants it). The shape's bounding box is a square of side 18-38 px
    placed anywhere inside a 3 px margin. Triangles point up (apex at the top centre, base = bottom
    edge of the box). Everything is drawn with numpy from a ``numpy.random.Generator``, so a seed
    fixes every image.

Held-out combinations
    :data:`HELD_OUT` lists 12 (shape, colour, background) triples that the training sampler never
    draws. Every shape, colour, background, shape+colour pair and colour+background pair in them
    still occurs in training, so generating them tests composition rather than memorisation.

Judge
    :func:`judge` reads the background colour from the image border (nearest named colour), takes
    the pixels that differ clearly from the background, names the shape colour by majority vote of
    their nearest named colours, keeps the largest connected blob of that colour and classifies the
    shape by how much of its bounding box it fills (square ~1.0, circle ~0.785, triangle ~0.5) and,
    for triangles, by the share of the blob in the upper half of the box (0.25, against 0.5 for the
    others), which still holds when decoding blunts the apex. Thresholds sit midway between the
    values measured on the VAE's reconstructions (circle fill <= 0.834 < 0.877 <= square fill;
    triangle top share <= 0.37 < 0.467 <= circle/square).

Only numpy (and optionally PIL for input images) is needed; no torch.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

IMAGE_SIZE = 64

#: Named colours (RGB), chosen far apart from each other (pairwise distance >= 80).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 225),
    "yellow": (245, 225, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 175),
    "orange": (250, 140, 10),
}
#: Background colours: the same palette (a shape's colour always differs from its background).
BACKGROUNDS: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: (shape, colour, background) triples never drawn by the training sampler.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("circle", "red", "blue"),
    ("square", "green", "white"),
    ("triangle", "blue", "yellow"),
    ("circle", "yellow", "black"),
    ("square", "white", "purple"),
    ("triangle", "black", "orange"),
    ("circle", "purple", "green"),
    ("square", "orange", "red"),
    ("triangle", "red", "white"),
    ("circle", "green", "orange"),
    ("square", "blue", "black"),
    ("triangle", "yellow", "purple"),
)

MIN_SIDE, MAX_SIDE, MARGIN = 18, 38, 3

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)
_CAPTION = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*$", re.IGNORECASE)


def all_combos() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) triple with colour != background, in a fixed order (168)."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if c != b]


def train_combos() -> list[tuple[str, str, str]]:
    """The triples the training sampler draws from: :func:`all_combos` minus :data:`HELD_OUT` (156)."""
    held = set(HELD_OUT)
    return [t for t in all_combos() if t not in held]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, colour: str, background: str) -> str:
    """``caption("circle", "red", "blue") == "a red circle on a blue background"``."""
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of :func:`caption`: ``(shape, colour, background)``; ValueError if it is not one."""
    m = _CAPTION.match(text)
    if not m:
        raise ValueError(f"not a shapes caption: {text!r}")
    colour, shape, background = (g.lower() for g in m.groups())
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        raise ValueError(f"unknown shape or colour in caption: {text!r}")
    return shape, colour, background


def _mask(shape: str, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """Boolean mask of a shape whose bounding box is [x0, x0+side) x [y0, y0+side)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    u = (xx - x0) / side  # 0..1 inside the box
    v = (yy - y0) / side
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex at top centre, base along the bottom edge
        return inside & (np.abs(u - 0.5) <= 0.5 * v)
    raise ValueError(f"unknown shape {shape!r}")


def render(
    shape: str, colour: str, background: str, x0: int, y0: int, side: int, size: int = IMAGE_SIZE
) -> np.ndarray:
    """An ``size x size x 3`` uint8 image of one shape (bounding box at x0, y0 of side ``side``)."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = COLOURS[background]
    img[_mask(shape, x0, y0, side, size)] = COLOURS[colour]
    return img


def random_geometry(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[int, int, int]:
    """A random (x0, y0, side) that keeps the shape inside a MARGIN px border."""
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    x0 = int(rng.integers(MARGIN, size - MARGIN - side + 1))
    y0 = int(rng.integers(MARGIN, size - MARGIN - side + 1))
    return x0, y0, side


def sample_batch(
    rng: np.random.Generator,
    n: int,
    combos: Sequence[tuple[str, str, str]] | None = None,
    size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, list[str]]:
    """``n`` random (image, caption) pairs: uint8 array ``(n, size, size, 3)`` and the captions.

    ``combos`` defaults to :func:`train_combos` (held-out triples excluded); each sample draws a
    triple uniformly, then a random position and size.
    """
    combos = list(combos) if combos is not None else train_combos()
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        shape, colour, background = combos[int(rng.integers(len(combos)))]
        images[i] = render(shape, colour, background, *random_geometry(rng, size), size=size)
        captions.append(caption(shape, colour, background))
    return images, captions


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index into the palette (:data:`COLOURS` order) of the nearest named colour, for ``(..., 3)`` input."""
    d = ((np.asarray(rgb, dtype=np.float32)[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy is optional
        return mask
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(sizes.argmax()))


#: Fill-ratio thresholds between triangle (0.5), circle (0.785) and square (1.0).
TRIANGLE_CIRCLE, CIRCLE_SQUARE = 0.6, 0.855
#: Upper-half share of the blob below which a shape is a triangle (0.25) rather than a circle/square (0.5).
TRIANGLE_TOP = 0.42
#: A pixel belongs to the shape if it is at least this far (RGB Euclidean) from the background colour.
DIFF_THRESHOLD = 60.0
MIN_SHAPE_PIXELS = 40


def analyse(image) -> dict:
    """What the judge sees: ``dict(background=name, colour=name|None, shape=name|None, fill=float)``."""
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    img = img.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _PALETTE_NAMES[int(nearest_colour(bg_rgb))]
    result = {"background": background, "colour": None, "shape": None, "fill": 0.0, "top": 0.0}

    far = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > DIFF_THRESHOLD
    if far.sum() < MIN_SHAPE_PIXELS:
        return result
    names = nearest_colour(img)
    votes = np.bincount(names[far], minlength=len(_PALETTE_NAMES))
    votes[_PALETTE_NAMES.index(background)] = 0  # the shape is not the background colour
    if votes.max() == 0:
        return result
    colour_idx = int(votes.argmax())
    result["colour"] = _PALETTE_NAMES[colour_idx]

    blob = _largest_component(far & (names == colour_idx))
    if blob.sum() < MIN_SHAPE_PIXELS // 2:
        return result
    ys, xs = np.nonzero(blob)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(blob.sum()) / float(box)
    # Share of the blob in the upper half of its box: 0.25 for an upright triangle, 0.5 for circles and
    # squares. It survives a blunted apex (which raises a decoded triangle's fill towards a circle's).
    middle = (ys.min() + ys.max()) / 2.0
    top = float((ys < middle).sum() + 0.5 * (ys == middle).sum()) / float(len(ys))
    result["fill"], result["top"] = fill, top
    if fill < TRIANGLE_CIRCLE or top < TRIANGLE_TOP:
        result["shape"] = "triangle"
    else:
        result["shape"] = "circle" if fill < CIRCLE_SQUARE else "square"
    return result


def judge(image, caption_text: str) -> dict[str, bool]:
    """Does ``image`` (PIL or HxWx3 uint8) show ``caption_text``? Separate verdicts and ``correct`` (all three)."""
    shape, colour, background = parse_caption(caption_text)
    seen = analyse(image)
    out = {
        "shape": seen["shape"] == shape,
        "colour": seen["colour"] == colour,
        "background": seen["background"] == background,
    }
    out["correct"] = all(out.values())
    return out


def score(images: Iterable, captions: Iterable[str]) -> dict[str, float]:
    """Mean of each :func:`judge` verdict over pairs of images and captions (fractions in 0..1)."""
    keys = ("shape", "colour", "background", "correct")
    totals = dict.fromkeys(keys, 0)
    n = 0
    for image, text in zip(images, captions):
        verdict = judge(image, text)
        for k in keys:
            totals[k] += verdict[k]
        n += 1
    return {k: totals[k] / max(n, 1) for k in keys}
