"""Image, mask, latent and conditioning utilities with ComfyUI's core semantics, and LoadVAE.

ImageScale, ImageScaleToTotalPixels, ImagePadForOutpaint, GrowMask, LatentUpscale, LatentUpscaleBy and
ConditioningZeroOut do what ComfyUI's nodes of the same names are documented to do, so workflows written for ComfyUI
map onto them; where a choice is ours it is said in the node's help text. Resizing goes through
``torch.nn.functional.interpolate`` (half-pixel centres, no antialiasing), Pillow for Lanczos, and our own
spherical-linear "bislerp" for latents. LoadVAE reads the ``vae`` model folder: diffusers folders, and
original-layout single files converted by :mod:`nodes.loading.vae`; LoadTinyVAE reads ``vae_approx``, where
ComfyUI keeps TAESD as madebyollin's encoder/decoder pair, converted here to diffusers' AutoencoderTiny.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from nodegraph import Combo, Float, Folder, Int, Node, Output, Settings, Socket

from . import devices
from .images import pil_to_tensor, tensor_to_pils
from .latent import DEFAULT_SCALE_FACTOR, check_size
from .values import CONDITIONING, IMAGE, LATENT, MASK, VAE, Conditioning, Latent, Vae

IMAGE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
LATENT_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROPS = ["disabled", "center"]
MAX_SIDE = 16384
MIN_LATENT_UPSCALE = 64  # pixels: LatentUpscale never makes a side smaller (ComfyUI's floor)


# --- resizing ------------------------------------------------------------------------------------------------------


def center_crop(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The centre of ``x`` [..., H, W] with the aspect ratio of width x height (a view; the cut on each side is
    rounded)."""
    h, w = x.shape[-2:]
    old, new = w / h, width / height
    if old > new:
        cut = round((w - w * new / old) / 2)
        return x[..., :, cut:w - cut]
    if old < new:
        cut = round((h - h * old / new) / 2)
        return x[..., cut:h - cut, :]
    return x


def resize(x: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, height, width] with a torch interpolation mode or "bislerp" (no clamping)."""
    if method == "bislerp":
        return bislerp(x, width, height)
    return F.interpolate(x, size=(height, width), mode=method)


def _source_positions(n_in: int, n_out: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index: the two input neighbours and the weight of the second, at the positions bilinear
    interpolation samples (half-pixel centres, align_corners=False, clamped to the edges). Computed in float64 on
    the CPU (MPS has no float64), returned on the device of ``like``, the weights in its dtype."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(0, n_in - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo.to(like.device), hi.to(like.device), (src - lo).to(like.dtype).to(like.device)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Spherical-linear interpolation of the vectors along ``dim``: the direction turns from a's to b's by the
    fraction ``t`` of the angle between them, the length goes linearly from |a| to |b|. Nearly parallel or opposite
    vectors, and zero vectors (no direction), are interpolated linearly instead."""
    norm_a, norm_b = a.norm(dim=dim, keepdim=True), b.norm(dim=dim, keepdim=True)
    unit_a = a / norm_a.clamp_min(torch.finfo(a.dtype).tiny)
    unit_b = b / norm_b.clamp_min(torch.finfo(b.dtype).tiny)
    dot = (unit_a * unit_b).sum(dim=dim, keepdim=True).clamp(-1, 1)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    linear = (1 - t) * a + t * b
    degenerate = (dot.abs() > 1 - 1e-5) | (norm_a == 0) | (norm_b == 0)
    sin_omega = torch.where(degenerate, torch.ones_like(sin_omega), sin_omega)  # no 0/0 where the result is linear
    direction = (torch.sin((1 - t) * omega) * unit_a + torch.sin(t * omega) * unit_b) / sin_omega
    return torch.where(degenerate, linear, direction * ((1 - t) * norm_a + t * norm_b))


def bislerp(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resizing of [N, C, H, W] in which each step between two neighbouring latent vectors (over C) is a
    slerp instead of a straight line: the same sample positions as bilinear (half-pixel centres), rows first, then
    columns. Computed in float32 at least, returned in the input's dtype."""
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    lo, hi, t = _source_positions(y.shape[-1], width, y)
    y = slerp(y[..., lo], y[..., hi], t)
    lo, hi, t = _source_positions(y.shape[-2], height, y)
    y = slerp(y[..., lo, :], y[..., hi, :], t[:, None])
    return y.to(x.dtype)


def scale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """IMAGE [B, H, W, 3] resized to width x height (after a centre crop to that aspect ratio with "center")."""
    x = image.movedim(-1, 1)
    if crop == "center":
        x = center_crop(x, width, height)
    if method == "lanczos":  # through 8-bit PIL images, rounded as tensor_to_pils rounds
        pils = tensor_to_pils(x.movedim(1, -1))
        return torch.cat([pil_to_tensor(p.resize((width, height), Image.Resampling.LANCZOS)) for p in pils])
    x = resize(x, width, height, method)
    if method == "bicubic":
        x = x.clamp(0, 1)  # bicubic overshoots at edges; an IMAGE stays in [0, 1]
    return x.movedim(1, -1).contiguous()


def _keep_aspect(width: int, height: int, old_width: int, old_height: int, floor: int = 1) -> tuple[int, int]:
    """(width, height) with a 0 side computed from the other so that the aspect ratio is kept."""
    if width == 0:
        return max(floor, round(old_width * height / old_height)), height
    if height == 0:
        return width, max(floor, round(old_height * width / old_width))
    return width, height


class ImageScale(Node):
    """Resize images to width x height. A 0 in one of them keeps the aspect ratio from the other (both 0: the
    images are left as they are). crop "center" first cuts the images to the target aspect ratio, keeping their
    centre; "disabled" stretches them. lanczos resizes 8-bit images with Pillow; bicubic is clamped to [0, 1]."""

    category = "image/transform"
    image = Socket(IMAGE)
    method = Combo(options=IMAGE_METHODS, default="nearest-exact")
    width = Int(default=512, min=0, max=MAX_SIDE)
    height = Int(default=512, min=0, max=MAX_SIDE)
    crop = Combo(options=CROPS, default="disabled")
    outputs = (Output("image", IMAGE),)

    def run(self, ctx, image, method, width, height, crop):
        if width == 0 and height == 0:
            return image
        width, height = _keep_aspect(width, height, image.shape[2], image.shape[1])
        check_size(width, height, ctx.settings.max_image_size)
        return scale_image(image, width, height, method, crop)


class ImageScaleToTotalPixels(Node):
    """Resize images to about megapixels x 1024 x 1024 pixels, keeping the aspect ratio: both sides are scaled by
    the same factor, then each is rounded."""

    category = "image/transform"
    image = Socket(IMAGE)
    method = Combo(options=IMAGE_METHODS, default="nearest-exact")
    megapixels = Float(default=1.0, min=0.01, max=16.0, step=0.01)
    outputs = (Output("image", IMAGE),)

    def run(self, ctx, image, method, megapixels):
        h, w = image.shape[1:3]
        scale = math.sqrt(int(megapixels * 1024 * 1024) / (w * h))
        width, height = max(1, round(w * scale)), max(1, round(h * scale))
        check_size(width, height, ctx.settings.max_image_size)
        return scale_image(image, width, height, method)


# --- outpainting and masks -----------------------------------------------------------------------------------------


def outpaint_feather(height: int, width: int, top: int, bottom: int, left: int, right: int,
                     feathering: int) -> torch.Tensor:
    """The mask over the original image [height, width]: ((f - d) / f)^2 where d < f, 0 elsewhere, d being the
    distance to the nearest padded side. Distances count as ComfyUI counts them: the first row (column) is 0 from
    the top (left) side, the last one is 1 from the bottom (right) side. No feathering when 2f is not smaller
    than both sides."""
    if feathering <= 0 or 2 * feathering >= height or 2 * feathering >= width:
        return torch.zeros(height, width)
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    far = torch.tensor(math.inf, dtype=torch.float64)
    d = torch.minimum(torch.minimum(rows if top else far, height - rows if bottom else far),
                      torch.minimum(cols if left else far, width - cols if right else far))
    ramp = ((feathering - d) / feathering) ** 2
    return torch.where(d < feathering, ramp, 0.0).to(torch.float32)


class ImagePadForOutpaint(Node):
    """Pad images for outpainting: the new border is mid grey (0.5) and the mask is 1 over it. With feathering f,
    the mask also rises inside the original image toward each padded side, as ((f - d) / f)^2 at d pixels from that
    side (0 further in), so the new content blends into the old; no feathering unless 2f is smaller than both
    sides of the image. Connect image and mask to InpaintEncode."""

    category = "image"
    image = Socket(IMAGE)
    left = Int(default=0, min=0, max=4096, step=8)
    top = Int(default=0, min=0, max=4096, step=8)
    right = Int(default=0, min=0, max=4096, step=8)
    bottom = Int(default=0, min=0, max=4096, step=8)
    feathering = Int(default=40, min=0, max=4096)
    outputs = (Output("image", IMAGE), Output("mask", MASK))

    def run(self, ctx, image, left, top, right, bottom, feathering):
        b, h, w, c = image.shape
        new_h, new_w = h + top + bottom, w + left + right
        check_size(new_w, new_h, ctx.settings.max_image_size)
        padded = torch.full((b, new_h, new_w, c), 0.5, dtype=image.dtype)
        padded[:, top:top + h, left:left + w] = image
        mask = torch.ones(1, new_h, new_w)
        mask[0, top:top + h, left:left + w] = outpaint_feather(h, w, top, bottom, left, right, feathering)
        return padded, mask


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grey dilation (pixels > 0) or erosion (< 0) of [B, H, W] with a (2|pixels| + 1)-pixel square: each value
    becomes the largest (smallest) within |pixels| pixels horizontally and vertically; outside the image counts as
    absent, not as 0."""
    if pixels == 0:
        return mask
    n = abs(pixels)
    x = mask[:, None] if pixels > 0 else -mask[:, None]
    x = F.max_pool2d(x, kernel_size=2 * n + 1, stride=1, padding=n)
    return (x if pixels > 0 else -x)[:, 0]


class GrowMask(Node):
    """Grow the masked area by this many pixels (or shrink it, for a negative number): every pixel takes the largest
    (smallest, when shrinking) mask value within that many pixels, over a square, so corners grow square. Soft
    masks stay soft. Useful before inpainting, so the new content overlaps the old."""

    category = "mask"
    mask = Socket(MASK)
    pixels = Int(default=6, min=-64, max=64)
    outputs = (Output("mask", MASK),)

    def run(self, ctx, mask, pixels):
        return grow_mask(mask[None] if mask.ndim == 2 else mask, pixels)


# --- latents -------------------------------------------------------------------------------------------------------


def scale_latents(x: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Latents [B, C, h, w] (or videos [B, C, F, h, w], frame by frame) resized to width x height cells."""
    if x.ndim == 5:
        b, c, f, h, w = x.shape
        frames = scale_latents(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), width, height, method, crop)
        return frames.reshape(b, f, c, height, width).permute(0, 2, 1, 3, 4).contiguous()
    if crop == "center":
        x = center_crop(x, width, height)
    return resize(x, width, height, method)


class LatentUpscale(Node):
    """Resize latents to width x height pixels (1/8 of that in latent cells), for a second, higher-resolution
    sampling pass ("hires fix"). A 0 in one of them keeps the aspect ratio from the other (both 0: the latent is
    left as it is); sides below 64 pixels become 64. bislerp interpolates latent vectors spherically (their
    direction turns, their length changes linearly), which keeps their magnitude where bilinear would shrink it.
    The result is a plain latent (an encoded image's mean; an inpainting mask is not carried), so a sampler
    treats it as image-to-image: use a strength below 1."""

    category = "latent"
    latent = Socket(LATENT)
    method = Combo(options=LATENT_METHODS, default="nearest-exact")
    width = Int(default=512, min=0, max=MAX_SIDE, step=8)
    height = Int(default=512, min=0, max=MAX_SIDE, step=8)
    crop = Combo(options=CROPS, default="disabled")
    outputs = (Output("latent", LATENT),)

    def run(self, ctx, latent, method, width, height, crop):
        if width == 0 and height == 0:
            return latent
        x = latent.value
        factor = DEFAULT_SCALE_FACTOR
        width, height = (max(MIN_LATENT_UPSCALE, side) if side else 0 for side in (width, height))
        width, height = _keep_aspect(width, height, x.shape[-1] * factor, x.shape[-2] * factor, MIN_LATENT_UPSCALE)
        check_size(width, height, ctx.settings.max_image_size)
        return Latent(samples=scale_latents(x, width // factor, height // factor, method, crop))


class LatentUpscaleBy(Node):
    """Resize latents by a factor (each side rounded to whole latent cells), for a second, higher-resolution
    sampling pass. bislerp interpolates latent vectors spherically. The result is a plain latent (an encoded
    image's mean; an inpainting mask is not carried), so a sampler treats it as image-to-image."""

    category = "latent"
    latent = Socket(LATENT)
    method = Combo(options=LATENT_METHODS, default="nearest-exact")
    scale = Float(default=1.5, min=0.01, max=8.0, step=0.01)
    outputs = (Output("latent", LATENT),)

    def run(self, ctx, latent, method, scale):
        x = latent.value
        width, height = max(1, round(x.shape[-1] * scale)), max(1, round(x.shape[-2] * scale))
        check_size(width * DEFAULT_SCALE_FACTOR, height * DEFAULT_SCALE_FACTOR, ctx.settings.max_image_size)
        return Latent(samples=scale_latents(x, width, height, method))


# --- conditioning --------------------------------------------------------------------------------------------------


class ConditioningZeroOut(Node):
    """Conditioning whose prompt embeddings (and SDXL's pooled embedding) are all zeros, everything else kept
    (controls, the prompts' text). An empty negative for models trained with zeroed prompts (SDXL Turbo)."""

    category = "conditioning"
    conditioning = Socket(CONDITIONING)
    outputs = (Output("conditioning", CONDITIONING),)

    def run(self, ctx, conditioning: Conditioning):
        pooled = conditioning.pooled
        return replace(conditioning, embeds=torch.zeros_like(conditioning.embeds),
                       pooled=None if pooled is None else torch.zeros_like(pooled))


# --- LoadVAE -------------------------------------------------------------------------------------------------------

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
SDXL_SCALING_FACTOR = 0.13025


def is_vae_folder(path: Path) -> bool | None:
    """True for a diffusers folder whose config.json names a VAE class; None (search it) otherwise."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return True if isinstance(config, dict) and config.get("_class_name") in VAE_CLASSES else None


VAES = Folder("vae", what="VAEs (diffusers AutoencoderKL folders or single .safetensors files)",
              suffixes=(".safetensors", ".pt", ".ckpt"), entry_dir=is_vae_folder, flag="--models")


def _load_folder(path: Path, settings: Settings) -> torch.nn.Module:
    """A VAE folder's model, loaded as a checkpoint's components are (streamed, or mapped where guarded)."""
    from .checkpoint import standalone_options
    from .loading.assemble import _pretrained
    from .loading.configs import read_json

    opts = standalone_options(settings, sorted(path.glob("diffusion_pytorch_model*.safetensors")))
    return _pretrained(read_json(path / "config.json")["_class_name"], path, None, opts)


class LoadVAE(Node):
    """Load a VAE from the models folder's vae/ subfolder, to use in place of a checkpoint's own (VAEDecode,
    VAEEncode, InpaintEncode). A diffusers folder (config.json + weights) of an AutoencoderKL, or of an
    AutoencoderTiny (TAESD: fast and approximate; see also LoadTinyVAE); or a single original-layout file such as
    sd-vae-ft-mse-original, read as an SD 1.x/2.x VAE (scaling factor 0.18215: for SDXL's VAE use its diffusers
    folder). .ckpt/.pt pickles are refused unless nodegraph runs with --allow-pickle."""

    category = "loaders"
    vae = Combo(options=VAES)
    outputs = (Output("vae", VAE),)

    def run(self, ctx, vae):
        from .loading.vae import load_vae_file

        path = VAES.locate(ctx.settings, vae)
        device = devices.device(ctx.settings)
        dtype = devices.dtype(ctx.settings, device)
        if path.is_dir():
            module = _load_folder(path, ctx.settings)
        else:
            from .checkpoint import standalone_options
            from .loading.weights import file_kind

            # streamed, or mapped where guarded, as checkpoints load
            opts = standalone_options(ctx.settings, [path] if file_kind(path) == "safetensors" else [])
            module = load_vae_file(path, device=device, dtype=dtype, allow_pickle=ctx.settings.allow_pickle,
                                   clone_weights=opts.clone, guarded_only=opts.guarded_only)
        config = module.config
        if (module.dtype == torch.float16 and getattr(config, "force_upcast", False)
                and math.isclose(float(config.scaling_factor), SDXL_SCALING_FACTOR)):
            module.to(torch.float32)  # SDXL's VAE overflows in float16, as LoadCheckpoint knows
        return _as_vae(ctx, module, vae, device)


# --- LoadTinyVAE: TAESD in ComfyUI's vae_approx/ ------------------------------------------------------------------

VAE_APPROX = Folder("vae_approx", what="tiny VAEs (TAESD: taesd_decoder/_encoder.safetensors pairs, or "
                    "AutoencoderTiny diffusers folders)", suffixes=(".safetensors", ".pth"),
                    entry_dir=is_vae_folder, flag="--models")


def _block_indices(state: dict[str, torch.Tensor]) -> list[tuple[int, str, torch.Tensor]]:
    """(index, "conv" or "block", weight of the entry's first convolution) for each layer with weights, in order."""
    layers: dict[int, tuple[str, torch.Tensor]] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if rest == "weight":
            layers[int(head)] = ("conv", value)
        elif rest == "conv.0.weight":
            layers[int(head)] = ("block", value)
    return [(i, *layers[i]) for i in sorted(layers)]


def tiny_config_from_original(encoder: dict[str, torch.Tensor] | None,
                              decoder: dict[str, torch.Tensor]) -> dict:
    """AutoencoderTiny's config read from the shapes of madebyollin's TAESD layout: the encoder is
    conv, blocks, (stride-2 conv, blocks) x 3, conv; the decoder Clamp, conv, ReLU, (blocks, Upsample, conv) x 3,
    blocks, conv. Block counts and widths are counted from the convolutions between them."""
    def groups(layers):
        counts, widths, n = [], [], 0
        for _, kind, weight in layers[1:]:
            if kind == "block":
                n += 1
                width = int(weight.shape[0])
            else:
                counts.append(n)
                widths.append(width if n else int(weight.shape[1]))
                n = 0
        return counts, widths

    dec = _block_indices(decoder)
    dec_counts, dec_widths = groups(dec)
    config = {"latent_channels": int(dec[0][2].shape[1]), "out_channels": int(dec[-1][2].shape[0]),
              "decoder_block_out_channels": tuple(dec_widths), "num_decoder_blocks": tuple(dec_counts)}
    if encoder is not None:
        enc = _block_indices(encoder)
        counts, widths = groups(enc)
        # the encoder's groups start with their conv: the first block count belongs to the first conv's group
        config.update(in_channels=int(enc[0][2].shape[1]), encoder_block_out_channels=tuple(widths),
                      num_encoder_blocks=tuple(counts))
    else:  # TAESD's shape, mirrored from the decoder
        config.update(encoder_block_out_channels=tuple(reversed(dec_widths)),
                      num_encoder_blocks=tuple(reversed(dec_counts)))
    return config


# madebyollin's Decoder starts with a weightless Clamp() that diffusers' DecoderTiny does in forward (tanh(x/3)*3):
# its layer i is diffusers' layer i - 1. The encoders' layers line up.
DECODER_SHIFT = 1


def tiny_from_original(encoder: dict[str, torch.Tensor] | None,
                       decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """madebyollin TAESD key names (``1.weight``, ``3.conv.0.weight``) -> AutoencoderTiny's."""
    out = {}
    for key, value in (encoder or {}).items():
        out[f"encoder.layers.{key}"] = value
    for key, value in decoder.items():
        head, _, rest = key.partition(".")
        out[f"decoder.layers.{int(head) - DECODER_SHIFT}.{rest}"] = value
    return out


def tiny_to_original(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """AutoencoderTiny's state dict -> (encoder, decoder) in madebyollin's layout: the inverse of
    tiny_from_original."""
    encoder, decoder = {}, {}
    for key, value in state.items():
        part, _, rest = key.partition(".layers.")
        head, _, tail = rest.partition(".")
        if part == "encoder":
            encoder[rest] = value
        else:
            decoder[f"{int(head) + DECODER_SHIFT}.{tail}"] = value
    return encoder, decoder


class _NoEncoder(torch.nn.Module):
    def forward(self, x):
        raise ValueError("this tiny VAE was loaded without its encoder file (taesd_encoder.safetensors next to the "
                         "decoder): it can only decode")


def _read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from .loading import read_weights

    return read_weights(path, allow_pickle=allow_pickle)  # by content; pickles only when allowed


def load_tiny_files(path: Path, device: torch.device, dtype: torch.dtype, allow_pickle: bool) -> torch.nn.Module:
    """An AutoencoderTiny from one half of a TAESD pair (``taesd_decoder.safetensors``, ``taesdxl_encoder.pth``):
    the other half is read from next to it when it is there; without the encoder the VAE only decodes."""
    from diffusers import AutoencoderTiny

    from .loading import ready

    stem = path.stem
    if "encoder" not in stem and "decoder" not in stem:
        raise ValueError(f"{path.name}: a TAESD file is named *_decoder or *_encoder")
    decoder_path = path.with_name(stem.replace("encoder", "decoder") + path.suffix)
    encoder_path = path.with_name(stem.replace("decoder", "encoder") + path.suffix)
    if not decoder_path.is_file():
        raise ValueError(f"{path.name}: its decoder {decoder_path.name} is not in the folder")
    decoder = _read_weights(decoder_path, allow_pickle)
    encoder = _read_weights(encoder_path, allow_pickle) if encoder_path.is_file() else None
    module = AutoencoderTiny(**tiny_config_from_original(encoder, decoder))
    state = tiny_from_original(encoder, decoder)
    strict = encoder is not None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (strict and missing) or any(not k.startswith("encoder.") for k in missing):
        raise ValueError(f"{path.name}: not a TAESD layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if encoder is None:
        module.encoder = _NoEncoder()
    return ready(module, device, dtype)


class LoadTinyVAE(Node):
    """Load a tiny VAE (TAESD, TAESDXL: diffusers' AutoencoderTiny) from the models folder's vae_approx/, where
    ComfyUI keeps them: choose taesd_decoder.safetensors (or its _encoder) and the pair is read together; an
    AutoencoderTiny diffusers folder works too. Its decodes are approximate and cost a fraction of the full
    VAE's (about 1 M weights per half against tens of millions); use it in place of the checkpoint's VAE in
    VAEDecode and VAEEncode. TAESD fits SD 1.x/2.x latents, TAESDXL SDXL's. Without the _encoder file it only
    decodes."""

    category = "loaders"
    vae = Combo(options=VAE_APPROX)
    outputs = (Output("vae", VAE),)

    def run(self, ctx, vae):
        path = VAE_APPROX.locate(ctx.settings, vae)
        device = devices.device(ctx.settings)
        dtype = devices.dtype(ctx.settings, device)
        if path.is_dir():
            module = _load_folder(path, ctx.settings)
        else:
            module = load_tiny_files(path, device, dtype, ctx.settings.allow_pickle)
        return _as_vae(ctx, module, vae, device)


def _as_vae(ctx, module: torch.nn.Module, name: str, device: torch.device) -> Vae:
    """A loaded VAE as the VAE value, its convolutions in the layout the settings ask for on ``device``."""
    from . import fastpaths

    fast_layout = devices.channels_last(ctx.settings, device)
    fastpaths.apply(module, upsample=fast_layout, attention=fast_layout)
    if fast_layout:
        module.to(memory_format=torch.channels_last)
    return Vae(module, name)


NODES = [ImageScale, ImageScaleToTotalPixels, ImagePadForOutpaint, GrowMask, LatentUpscale, LatentUpscaleBy,
         ConditioningZeroOut, LoadVAE, LoadTinyVAE]
