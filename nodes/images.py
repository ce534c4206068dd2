"""Images in and out: LoadImage, SaveImage, PreviewImage, ImageToMask, and the IMAGE <-> PIL conversions.

IMAGE values are float tensors [B, H, W, 3] in [0, 1] on the CPU, built as ``uint8 / 255`` exactly as diffusers'
image processor builds its arrays, so that results match diffusers bit for bit. MASK values are [B, H, W] in [0, 1]
where 1 means "redraw this pixel". Saved PNGs embed the workflow, so dropping one on the canvas restores the graph.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from nodegraph import Combo, Int, Node, NodeOutput, Output, Socket, String
from nodegraph.folders import INPUT, OUTPUT
from nodegraph.paths import safe_join
from nodegraph.workflow import PNG_KEY

from .values import IMAGE, MASK

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGES = INPUT.with_suffixes(IMAGE_SUFFIXES, what="images")  # the input folder, as LoadImage lists it
WORKFLOW_KEY = PNG_KEY  # the PNG text chunk holding the workflow JSON


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """One RGB PIL image -> [1, H, W, 3] float32 in [0, 1] (uint8 / 255, as diffusers computes it)."""
    return torch.from_numpy(np.array(image.convert("RGB")).astype(np.float32) / 255.0)[None]


def tensor_to_pils(images: torch.Tensor) -> list[Image.Image]:
    """IMAGE -> PIL images, rounding as diffusers' ``numpy_to_pil`` does."""
    arrays = (images.detach().cpu().float().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def resize_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Round the size down to a multiple of ``multiple`` with a Lanczos resize, as diffusers' preprocessing does
    (no change, and no copy, when the size already fits)."""
    _, h, w, _ = images.shape
    new_h, new_w = h - h % multiple, w - w % multiple
    if (new_h, new_w) == (h, w):
        return images
    if not new_h or not new_w:
        raise ValueError(f"the image is {w}x{h}, smaller than the minimum of {multiple} pixels per side")
    resized = [pil.resize((new_w, new_h), Image.LANCZOS) for pil in tensor_to_pils(images)]
    return torch.cat([pil_to_tensor(p) for p in resized])


class LoadImage(Node):
    """Load an image from the input folder. Transparency becomes the mask: transparent pixels are the ones to
    redraw (an opaque image gives an empty mask). Rotation stored in EXIF is applied."""

    category = "image"
    image = Combo(options=IMAGES, upload="image")
    outputs = (Output("image", IMAGE), Output("mask", MASK))

    def run(self, ctx, image):
        path = IMAGES.locate(ctx.settings, image)
        limit = ctx.settings.max_image_size
        try:
            with Image.open(path) as pil:
                # the header's size is judged before any pixel is decoded: a small file may declare a huge image
                too_large = pil.width > limit or pil.height > limit
                if not too_large:
                    pil = ImageOps.exif_transpose(pil)
                    pil.load()
        except Image.DecompressionBombError as exc:  # Pillow's own limit, on pixels in all, met while opening
            raise ValueError(f"{image!r} is refused as a decompression bomb: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:  # ValueError: Pillow's limit on text chunks
            raise ValueError(f"{image!r} is not a readable image: {exc}") from None
        if too_large:
            raise ValueError(f"{image!r} is {pil.width}x{pil.height} pixels, over the size limit of {limit} pixels "
                             f"per side (raise it with NODEGRAPH_MAX_SIZE, or scale the image down)")
        if "A" in pil.getbands() or (pil.mode == "P" and "transparency" in pil.info):
            alpha = np.array(pil.convert("RGBA"))[..., 3].astype(np.float32) / 255.0
            mask = torch.from_numpy(1.0 - alpha)[None]
        else:
            mask = torch.zeros(1, pil.height, pil.width)
        return pil_to_tensor(pil), mask


class ImageToMask(Node):
    """Make a mask from an image: white (bright) pixels are redrawn, black ones kept. channel picks what to read:
    the grey level (as PIL's "L" conversion, which diffusers uses for masks) or one colour channel."""

    category = "image"
    image = Socket(IMAGE)
    channel = Combo(options=["luminance", "red", "green", "blue"], default="luminance")
    outputs = (Output("mask", MASK),)

    def run(self, ctx, image, channel):
        if channel != "luminance":
            return image[..., ["red", "green", "blue"].index(channel)].clone()
        grey = [np.array(p.convert("L")).astype(np.float32) / 255.0 for p in tensor_to_pils(image)]
        return torch.from_numpy(np.stack(grey))


class RectangleMask(Node):
    """A mask that is 1 (redraw) inside a rectangle and 0 elsewhere, for inpainting without drawing a mask.
    x, y, w and h are in pixels of an image of the given width and height; the rectangle is clipped to it."""

    category = "image"
    width = Int(default=512, min=1, max=16384)
    height = Int(default=512, min=1, max=16384)
    x = Int(default=128, min=0, max=16384)
    y = Int(default=128, min=0, max=16384)
    w = Int(default=256, min=0, max=16384)
    h = Int(default=256, min=0, max=16384)
    outputs = (Output("mask", MASK),)

    def run(self, ctx, width, height, x, y, w, h):
        mask = torch.zeros(1, height, width)
        mask[:, y:y + h, x:x + w] = 1.0
        return mask


class ImageBatch(Node):
    """Join two images (or image batches) into one batch: image2's images follow image1's. When their sizes differ,
    image2 is resized to image1's size (Lanczos). Useful for several reference images of one IPAdapterApply, or to
    process images together."""

    category = "image"
    image1 = Socket(IMAGE)
    image2 = Socket(IMAGE)
    outputs = (Output("image", IMAGE),)

    def run(self, ctx, image1, image2):
        height, width = image1.shape[1:3]
        if tuple(image2.shape[1:3]) != (height, width):
            image2 = torch.cat([pil_to_tensor(p.resize((width, height), Image.Resampling.LANCZOS))
                                for p in tensor_to_pils(image2)])
        return torch.cat([image1, image2.to(image1.dtype)])


def _png_metadata(ctx) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if ctx.workflow is not None:
        info.add_text(WORKFLOW_KEY, json.dumps(ctx.workflow, separators=(",", ":")))
    return info


def save_files(folder: Path, prefix: str, suffix: str, writers: list) -> list[dict]:
    """Write one file per writer (a function of a path) as ``prefix_NNNNN{suffix}``, numbered on from the files
    already there, each atomically; returns the canvas's entries (file name, subfolder)."""
    target = safe_join(folder, f"{prefix}_00000{suffix}")  # validates the prefix, subfolders included
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = target.name[: -len(f"_00000{suffix}")]
    taken = [p.name[len(stem) + 1: len(stem) + 6] for p in target.parent.glob(f"{stem}_*{suffix}")]
    counter = max((int(n) for n in taken if n.isdigit()), default=0) + 1
    subfolder = target.parent.relative_to(Path(folder).resolve()).as_posix()
    entries = []
    for write in writers:
        name = f"{stem}_{counter:05d}{suffix}"
        write_atomically(target.parent / name, write)
        entries.append({"filename": name, "subfolder": "" if subfolder == "." else subfolder})
        counter += 1
    return entries


def write_atomically(path: Path, write) -> None:
    """Call ``write`` on a hidden temporary name beside ``path``, then rename it to ``path``: a crash never leaves a
    half-written file under the final name, and a failed write (a full disk) leaves no file at all. The error of a
    failed write names the file."""
    partial = path.parent / f".{path.name}.partial"
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        message = f"cannot write {path}: {exc.strerror or exc}"
        # OSError(errno, ...) keeps the subclass (PermissionError...) and the errno (ENOSPC) for callers
        raise (OSError(exc.errno, message) if exc.errno is not None else OSError(message)) from exc


def save_pngs(images: torch.Tensor, folder: Path, prefix: str, ctx) -> list[dict]:
    """Write each image as ``prefix_NNNNN.png`` (next free number) atomically; returns UI entries."""
    info = _png_metadata(ctx)
    writers = [lambda path, pil=pil: pil.save(path, format="PNG", pnginfo=info, compress_level=4)
               for pil in tensor_to_pils(images)]
    return save_files(folder, prefix, ".png", writers)


class SaveImage(Node):
    """Save images as PNG files in the output folder, each carrying the workflow that made it (drop one on the
    canvas to restore the graph). filename_prefix may include subfolders ("portraits/cat")."""

    category = "image"
    output_node = True
    images = Socket(IMAGE)
    filename_prefix = String(default="nodegraph", path_within=OUTPUT)

    def run(self, ctx, images, filename_prefix):
        entries = save_pngs(images, ctx.output_dir, filename_prefix, ctx)
        return NodeOutput((), {"images": [{**e, "type": "output"} for e in entries]})


class PreviewImage(Node):
    """Show images on the canvas without keeping them (they go to a temporary folder)."""

    category = "image"
    output_node = True
    images = Socket(IMAGE)

    def run(self, ctx, images):
        entries = save_pngs(images, ctx.settings.temp_dir, f"preview_{ctx.run_id[:8]}", ctx)
        return NodeOutput((), {"images": [{**e, "type": "temp"} for e in entries]})


def read_workflow_from_png(path: str | Path) -> dict | None:
    """The workflow a SaveImage PNG carries, or None."""
    with Image.open(path) as pil:
        text = pil.text.get(WORKFLOW_KEY) if hasattr(pil, "text") else None
    return json.loads(text) if text else None


NODES = [LoadImage, ImageToMask, RectangleMask, ImageBatch, SaveImage, PreviewImage]
