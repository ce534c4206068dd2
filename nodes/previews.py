"""Previews during sampling: latents to a small RGB image by a linear projection fitted to the checkpoint's VAE.

A preview must cost a small fraction of a UNet step, so no VAE runs per step. Instead each latent cell is mapped to
one RGB colour by ``rgb = latent @ weight + bias`` (a [C, 3] matrix and a bias), the linear approximation of the
VAE's decoder at the scale of one latent cell. The projection is fitted once per VAE, lazily on the first preview:
16 flat colour images (4x4 latent cells each) are encoded and decoded by that VAE, the decoded images
average-pooled to latent resolution, and the projection is the least-squares fit of those colours on the latents
(see fit_projection for why encoded rather than random latents). That is one small encode and decode (about
10 ms for the demo model on a 2-core CPU; 0.8-1.4 s for a full-size SD VAE in float32 there), cached per VAE
module (weakly: it goes with the module). Published factor matrices for SD1.x and SDXL are the same idea, fitted
on real images; fitting our own keeps any VAE right, tiny or full, SD or SDXL, without a table to maintain.

Samplers only hold the MODEL: LoadCheckpoint attaches its VAE to the UNet with :func:`attach`, and
:func:`preview` finds it there. A model with no attached VAE (a UNet loaded some other way) falls back to the old
look: the first three latent channels, each stretched to 0-255 (:func:`stretch_preview`).
"""

from __future__ import annotations

import weakref

import torch

from .values import Model, Vae

PREVIEW_SIZE = 64  # pixels on the longer side at most (the websocket frame of a preview)
# The flat colour images encoded and decoded to fit a projection, and their side in latent cells (at 2 cells the
# images' borders weigh in: the demo model's preview error went from 0.13 to 0.22).
FIT_IMAGES, FIT_CELLS = 16, 4

# UNet module -> its checkpoint's Vae; VAE module -> (weight [C, 3], bias [3]). Weak keys: an entry goes with its
# module.
_VAE_OF: weakref.WeakKeyDictionary[torch.nn.Module, Vae] = weakref.WeakKeyDictionary()
_PROJECTIONS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = \
    weakref.WeakKeyDictionary()


def attach(model: Model, vae: Vae) -> None:
    """Remember ``vae`` as the VAE whose colours previews of ``model``'s latents show (handles patched later share
    the UNet, so they find it too)."""
    _VAE_OF[model.unet] = vae


def share(model: Model, derived: Model) -> None:
    """``derived`` (a model built over ``model``'s UNet, such as an animated one) previews in the same colours."""
    vae = _VAE_OF.get(model.unet)
    if vae is not None:
        _VAE_OF[derived.unet] = vae


def projection(vae: Vae, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached (weight [C, 3], bias [3]) that maps a latent cell to the mean colour in [0, 1] of the pixels
    ``vae`` decodes it to; fitted on the first call for this VAE module."""
    found = _PROJECTIONS.get(vae.vae)
    if found is None:
        found = _PROJECTIONS[vae.vae] = fit_projection(vae, seed)
    return found


def fit_projection(vae: Vae, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares of decoded colours on latents. The latents are the VAE's own encodings of flat colour images
    (the RGB cube's 8 corners and 8 random colours): a preview's latents lie where images' latents lie, and random
    latents, far from there, give a projection about twice as wrong (measured on the demo model). A VAE that cannot
    encode (a tiny decoder alone) is fitted on random latents instead."""
    from .latent import decode, encode

    generator = torch.Generator().manual_seed(seed)
    c, f = vae.latent_channels, vae.scale_factor
    corners = torch.tensor([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=torch.float32)
    colours = torch.cat([corners, torch.rand(FIT_IMAGES - 8, 3, generator=generator)])
    images = colours[:, :, None, None].expand(-1, -1, FIT_CELLS * f, FIT_CELLS * f)
    param = next(vae.vae.parameters())
    try:
        latents = encode(vae, (images * 2 - 1).to(param.device, param.dtype)).mode().float().cpu()
    except ValueError:  # no encoder
        latents = torch.randn(FIT_IMAGES, c, FIT_CELLS, FIT_CELLS, generator=generator)
    decoded = decode(vae, latents)  # [B, H, W, 3] in [0, 1]
    targets = torch.nn.functional.avg_pool2d(decoded.movedim(-1, 1).double(), f)  # [B, 3, h, w]
    x = latents.double().movedim(1, -1).reshape(-1, c)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = targets.movedim(1, -1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution  # [C + 1, 3]
    return solution[:c].float(), solution[c].float()


def project(latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The first latent [C, h, w] of a batch (a video's first frame) as colours [h, w, 3] in [0, 1]."""
    x = latents[0] if latents.ndim == 4 else latents[0, :, 0]
    return (x.detach().float().cpu().movedim(0, -1) @ weight + bias).clamp(0, 1)


def _image(rgb: torch.Tensor, size: int):
    from PIL import Image

    image = Image.fromarray((rgb * 255).round().byte().numpy())
    image.thumbnail((size, size))
    return image


def stretch(latents: torch.Tensor) -> torch.Tensor:
    """The old look, [h, w, 3] in [0, 1]: the first three channels, each stretched to its own range."""
    x = (latents[0, :3] if latents.ndim == 4 else latents[0, :3, 0]).detach().float().cpu()
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).movedim(0, -1)


def stretch_preview(latents: torch.Tensor, size: int = PREVIEW_SIZE):
    return _image(stretch(latents), size)


def preview(model: Model, latents: torch.Tensor, size: int = PREVIEW_SIZE):
    """A small PIL image of the first latent of the batch, in the colours of the model's checkpoint VAE."""
    vae = _VAE_OF.get(model.unet)
    if vae is None or vae.latent_channels != latents.shape[1]:
        return stretch_preview(latents, size)
    return _image(project(latents, *projection(vae)), size)
