"""Latents and the VAE: EmptyLatent, VAEEncode, InpaintEncode, VAEDecode.

Pre- and post-processing follow diffusers' ``VaeImageProcessor`` exactly (pixels to [-1, 1], decode output back
to [0, 1] with a clamp). A tiny VAE (AutoencoderTiny) goes through the same code: diffusers' pipelines divide by
its ``scaling_factor`` of 1.0 too. Encoders return the posterior unsampled: the sampler draws the sample from its own seeded
generator, where diffusers draws it. The latent geometry (channels, pixels per latent cell) comes from the VAE's
config, never from a constant.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from nodegraph import Boolean, Int, Node, Output, Socket

from .devices import prefers_channels_last
from .images import resize_to_multiple
from .values import IMAGE, LATENT, MASK, VAE, Latent, Posterior, Vae

# The SD geometry, assumed only when EmptyLatent is given no VAE to read it from.
DEFAULT_LATENT_CHANNELS, DEFAULT_SCALE_FACTOR = 4, 8


class EmptyLatent(Node):
    """A blank latent of the given image size, the start of text-to-image.

    Connect the checkpoint's VAE so the latent takes its geometry (channels, downscale factor); without one the
    Stable Diffusion geometry (4 channels, 1/8 of the pixels) is assumed. Width and height must be multiples of 8."""

    category = "latent"
    width = Int(default=512, min=8, max=16384, step=8)
    height = Int(default=512, min=8, max=16384, step=8)
    batch = Int(default=1, min=1, max=64)
    vae = Socket(VAE, optional=True)
    outputs = (Output("latent", LATENT),)

    def run(self, ctx, width, height, batch, vae=None):
        channels, h, w = latent_geometry(width, height, vae, ctx.settings.max_image_size)
        return Latent(samples=torch.zeros(batch, channels, h, w), empty=True)


def latent_geometry(width: int, height: int, vae: Vae | None, limit: int) -> tuple[int, int, int]:
    """(channels, h, w) of the latent of a width x height image for ``vae`` (SD's geometry without one)."""
    check_size(width, height, limit)
    channels, factor = (vae.latent_channels, vae.scale_factor) if vae else (DEFAULT_LATENT_CHANNELS,
                                                                            DEFAULT_SCALE_FACTOR)
    if width % factor or height % factor:
        raise ValueError(f"width and height must be multiples of {factor} for this VAE, got {width}x{height}")
    return channels, height // factor, width // factor


def check_size(width: int, height: int, limit: int) -> None:
    if width > limit or height > limit:
        raise ValueError(f"{width}x{height} exceeds the size limit of {limit} pixels per side "
                         f"(raise it with NODEGRAPH_MAX_SIZE)")


def to_vae_input(images: torch.Tensor, vae: Vae, limit: int) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> [B, 3, H, W] in [-1, 1] on the VAE's device, as diffusers preprocesses;
    ``limit`` is the largest side allowed (Settings.max_image_size)."""
    images = resize_to_multiple(images, vae.scale_factor)
    check_size(images.shape[2], images.shape[1], limit)
    x = images.permute(0, 3, 1, 2)
    x = 2.0 * x - 1.0
    param = next(vae.vae.parameters())
    return x.to(param.device, param.dtype)


@contextlib.contextmanager
def vae_mode(vae: Vae, tiled: bool = False, sliced: bool = False):
    """diffusers' VAE tiling (large images in overlapping tiles, blended: not bit-identical to one pass) and slicing
    (one image of the batch at a time), switched on for one call only: the VAE is shared with the cache."""
    module = vae.vae
    module.use_tiling, module.use_slicing = tiled, sliced
    try:
        yield module
    finally:
        module.use_tiling = module.use_slicing = False


def is_tiny(vae: Vae) -> bool:
    """A tiny VAE (diffusers' AutoencoderTiny: TAESD, TAESDXL) encodes to latents, not to a distribution; it works
    in the latents the UNet sees (its config's scaling_factor is 1.0), so the scaling below is a no-op for it."""
    return type(vae.vae).__name__ == "AutoencoderTiny"


def _layout(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input in the layout of the VAE's weights: oneDNN is fastest when both are channels_last."""
    return x.contiguous(memory_format=torch.channels_last) if prefers_channels_last(module) else x


def encode(vae: Vae, x: torch.Tensor, tiled: bool = False, sliced: bool = False) -> Posterior:
    """The posterior of images [B, 3, H, W] in [-1, 1]. A tiny VAE (AutoencoderTiny) has no distribution: its
    encoder gives the latents themselves, a posterior with zero spread (so a sampler's draw is the latents, as
    diffusers' ``retrieve_latents`` reads ``.latents``)."""
    with vae_mode(vae, tiled, sliced) as module, torch.inference_mode():
        out = module.encode(_layout(module, x))
    if not hasattr(out, "latent_dist"):
        return Posterior(out.latents, torch.zeros_like(out.latents), vae.scaling_factor)
    dist = out.latent_dist
    return Posterior(dist.mean, dist.std, vae.scaling_factor)


class VAEEncode(Node):
    """Encode images into latents, the start of image-to-image (sizes are rounded down to the VAE's multiple).
    tiled encodes large images in overlapping tiles to save memory; sliced encodes a batch one image at a time."""

    category = "latent"
    vae = Socket(VAE)
    image = Socket(IMAGE)
    tiled = Boolean(default=False)
    sliced = Boolean(default=False)
    outputs = (Output("latent", LATENT),)

    def run(self, ctx, vae, image, tiled, sliced):
        x = to_vae_input(image, vae, ctx.settings.max_image_size)
        posterior = encode(vae, x, tiled, sliced)
        if is_tiny(vae):  # deterministic latents: nothing for the sampler to draw
            return Latent(samples=posterior.mode())
        return Latent(posterior=posterior)


class InpaintEncode(Node):
    """Encode an image and a mask for inpainting: white (1) in the mask is redrawn, black (0) is kept.

    The mask is made binary at 0.5 and must have the image's size; a single mask applies to every image."""

    category = "latent"
    vae = Socket(VAE)
    image = Socket(IMAGE)
    mask = Socket(MASK)
    outputs = (Output("latent", LATENT),)

    def run(self, ctx, vae, image, mask):
        if mask.shape[-2:] != image.shape[1:3]:
            raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                             f"{image.shape[2]}x{image.shape[1]}: they must be the same size")
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"{mask.shape[0]} masks for {image.shape[0]} images: give one, or one per image")
        x = to_vae_input(image, vae, ctx.settings.max_image_size)
        # the mask follows the image through the same resize, then is binarised as diffusers' mask processor does
        m = resize_to_multiple(mask[..., None].expand(*mask.shape, 3), vae.scale_factor)[..., :1]
        m = (m.permute(0, 3, 1, 2) >= 0.5).to(x.dtype)
        masked = x * (m.to(x.device) < 0.5)
        latent_mask = F.interpolate(m, size=(x.shape[2] // vae.scale_factor, x.shape[3] // vae.scale_factor))
        if latent_mask.shape[0] < x.shape[0]:
            latent_mask = latent_mask.repeat(x.shape[0], 1, 1, 1)
        return Latent(posterior=encode(vae, x), mask=latent_mask, masked_image=encode(vae, masked))


class VAEDecode(Node):
    """Decode latents into images. tiled decodes large images in overlapping, blended tiles to save memory (the
    result differs slightly from one pass); sliced decodes a batch one image at a time."""

    category = "latent"
    vae = Socket(VAE)
    latent = Socket(LATENT)
    tiled = Boolean(default=False)
    sliced = Boolean(default=False)
    outputs = (Output("image", IMAGE),)

    def run(self, ctx, vae, latent, tiled, sliced):
        return decode(vae, latent.value, tiled, sliced)


def decode(vae: Vae, latents: torch.Tensor, tiled: bool = False, sliced: bool = False) -> torch.Tensor:
    """Images [B, H, W, 3] of latents [B, C, h, w]; for videos [B, C, F, h, w], B x F frames, video by video."""
    param = next(vae.vae.parameters())
    if latents.ndim == 5:
        return _decode_frames(vae, latents, tiled, sliced)
    with vae_mode(vae, tiled, sliced) as module, torch.inference_mode():
        x = module.decode(_layout(module, latents.to(param.device, param.dtype) / vae.scaling_factor),
                          return_dict=False)[0]
    x = (x * 0.5 + 0.5).clamp(0, 1)
    return x.permute(0, 2, 3, 1).float().cpu()


FRAMES_PER_DECODE = 16  # AnimateDiffPipeline's decode_chunk_size: frames decoded in one VAE pass


def _decode_frames(vae: Vae, latents: torch.Tensor, tiled: bool, sliced: bool) -> torch.Tensor:
    # AnimateDiffPipeline.decode_latents, in its order of operations (it scales by 1 / factor first)
    param = next(vae.vae.parameters())
    b, c, f, h, w = latents.shape
    x = 1 / vae.scaling_factor * latents
    x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    with vae_mode(vae, tiled, sliced) as module, torch.inference_mode():
        frames = [module.decode(_layout(module, x[i:i + FRAMES_PER_DECODE].to(param.device, param.dtype)),
                                return_dict=False)[0] for i in range(0, b * f, FRAMES_PER_DECODE)]
    x = (torch.cat(frames).float() * 0.5 + 0.5).clamp(0, 1)
    return x.permute(0, 2, 3, 1).cpu()


NODES = [EmptyLatent, VAEEncode, InpaintEncode, VAEDecode]
