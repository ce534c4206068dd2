"""The values that travel on links between diffusion nodes, one class per socket type.

All are immutable: the result cache holds them, so a node never changes one in place; it builds a new one (a model
with one more patch, a latent with a mask). Weights are shared between handles, never copied. A MODEL or CLIP
handle carries its patches (LoRAs, FreeU, ...) and applies them only for the duration of a use (``applied()``),
so nothing held upstream in the cache ever changes.

Socket types: MODEL, CLIP, VAE, CONDITIONING, LATENT, SCHEDULE, IMAGE (float [B, H, W, 3] in [0, 1] on the CPU),
MASK (float [B, H, W] in [0, 1], 1 = repaint).
"""

from __future__ import annotations

import contextlib
import dataclasses
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Hashable, Iterator, Mapping, Protocol

import torch

from nodegraph.cache import storages_of, tensor_storage

from . import lcm_math
from .lcm_math import LCMSchedulerConfig

MODEL, CLIP, VAE, CONDITIONING, LATENT, SCHEDULE, IMAGE, MASK = (
    "MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "SCHEDULE", "IMAGE", "MASK")


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def storages(*parts: Any) -> Iterator[tuple[Hashable, int]]:
    """(key, bytes) of each tensor storage ``parts`` hold, for the result cache, which counts each storage once
    however many values share it: a module's parameters and buffers, tensors, the fields of values (dataclasses) and
    the items of containers; values that define ``__nodegraph_storages__`` answer for themselves. Anything else
    (names, configs, tokenizers) is small and left out."""
    seen: set[int] = set()
    stack = list(parts)
    while stack:
        part = stack.pop()
        if part is None or isinstance(part, (str, bytes, int, float, bool)) or id(part) in seen:
            continue
        seen.add(id(part))
        if isinstance(part, torch.Tensor):
            yield tensor_storage(part)
        elif isinstance(part, torch.nn.Module):
            for tensor in (*part.parameters(), *part.buffers()):
                yield tensor_storage(tensor)
        elif isinstance(part, (tuple, list, set, frozenset)):
            stack.extend(part)
        elif isinstance(part, Mapping):
            stack.extend(part.values())
        elif hasattr(part, "__nodegraph_storages__") or hasattr(part, "__nodegraph_nbytes__"):
            yield from storages_of(part)
        elif dataclasses.is_dataclass(part) and not isinstance(part, type):
            stack.extend(getattr(part, f.name) for f in dataclasses.fields(part))


def field_storages(value: Any) -> Iterator[tuple[Hashable, int]]:
    """The storages a value (a dataclass) holds through its fields: its ``__nodegraph_storages__``."""
    return storages(*(getattr(value, f.name) for f in dataclasses.fields(value)))


@dataclass(frozen=True)
class BatchLayout:
    """How the sampler lays out the batch of its UNet calls: ``images`` latents, twice over (unconditional half
    first) under classifier-free guidance."""

    images: int
    cfg: bool


# Set by the sampler for the duration of a sampling run; read by patches whose extra inputs are per image
# (IP-Adapter's image tokens differ between the two halves of classifier-free guidance).
UNET_BATCH: ContextVar[BatchLayout | None] = ContextVar("nodegraph_unet_batch", default=None)


@contextlib.contextmanager
def unet_batch(images: int, cfg: bool) -> Iterator[None]:
    token = UNET_BATCH.set(BatchLayout(images, cfg))
    try:
        yield
    finally:
        UNET_BATCH.reset(token)


class Patch(Protocol):
    """A change applied to a model only while it is used (a LoRA, FreeU, ...)."""

    def apply(self, module: torch.nn.Module) -> contextlib.AbstractContextManager: ...


@dataclass(frozen=True, eq=False)
class Model:
    """A denoising UNet (shared weights), the scheduler config it was trained with, and patches to apply."""

    unet: torch.nn.Module
    scheduler_config: Mapping[str, Any]
    family: str  # "sd1", "sd2", "sdxl", ...
    name: str
    patches: tuple[Patch, ...] = ()
    latent_scale: int = 8  # pixels per latent cell of the checkpoint's VAE (SDXL's size conditioning is in pixels)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler_config", MappingProxyType(dict(self.scheduler_config)))

    @property
    def lcm_distilled(self) -> bool:
        """An LCM-distilled UNet takes guidance as an embedding (``time_cond_proj_dim``), not through CFG."""
        return getattr(self.unet.config, "time_cond_proj_dim", None) is not None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def with_patch(self, patch: Patch) -> "Model":
        return replace(self, patches=(*self.patches, patch))

    @contextlib.contextmanager
    def applied(self) -> Iterator[torch.nn.Module]:
        """The UNet with this handle's patches applied, restored when the block ends."""
        with contextlib.ExitStack() as stack:
            for patch in self.patches:
                stack.enter_context(patch.apply(self.unet))
            yield self.unet

    __nodegraph_model__ = True
    # its weights and its patches' (a LoRA's factors), shared with every handle on the same UNet
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return param_bytes(self.unet)


@dataclass(frozen=True, eq=False)
class Clip:
    """A tokenizer and text encoder, with patches (LoRA on the text encoder, embeddings); SDXL and SSD-1B also
    have a second pair, whose projected pooled output conditions the UNet too (``patches_2`` apply to it)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    family: str
    name: str
    patches: tuple[Patch, ...] = ()
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None
    patches_2: tuple[Patch, ...] = ()  # on the second text encoder

    def with_patch(self, patch: Patch, second: bool = False) -> "Clip":
        if second:
            return replace(self, patches_2=(*self.patches_2, patch))
        return replace(self, patches=(*self.patches, patch))

    @contextlib.contextmanager
    def applied(self) -> Iterator[torch.nn.Module]:
        """The first text encoder with its patches applied, restored when the block ends."""
        with contextlib.ExitStack() as stack:
            for patch in self.patches:
                stack.enter_context(patch.apply(self.text_encoder))
            yield self.text_encoder

    @contextlib.contextmanager
    def applied_2(self) -> Iterator[torch.nn.Module | None]:
        """The second text encoder (SDXL), with its patches applied."""
        with contextlib.ExitStack() as stack:
            for patch in self.patches_2:
                stack.enter_context(patch.apply(self.text_encoder_2))
            yield self.text_encoder_2

    __nodegraph_model__ = True
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return param_bytes(self.text_encoder) + (param_bytes(self.text_encoder_2) if self.text_encoder_2 else 0)


@dataclass(frozen=True, eq=False)
class Vae:
    """An image autoencoder; ``scale_factor`` is pixels per latent cell, read from its config."""

    vae: torch.nn.Module
    name: str

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    __nodegraph_model__ = True
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return param_bytes(self.vae)


@dataclass(frozen=True, eq=False)
class Conditioning:
    """Encoded prompts: ``embeds`` [B, tokens, dim], the prompts they came from, and extras added by later nodes
    (for example controls from ControlNetApply); ``pooled`` [B, dim] is SDXL's pooled prompt embedding."""

    embeds: torch.Tensor
    prompts: tuple[str, ...]
    clip: Clip | None = None  # the encoder, so a sampler needing an unconditional embedding can make one
    extras: tuple = ()
    pooled: torch.Tensor | None = None
    # Other prompts sampled alongside this one (ConditioningCombine): the sampler averages their noise predictions.
    also: tuple["Conditioning", ...] = ()

    @property
    def batch(self) -> int:
        return int(self.embeds.shape[0])

    # the encoder it keeps alive too (``clip``): evicting the checkpoint alone does not free the text encoder
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        own = self.embeds.nbytes + (self.pooled.nbytes if self.pooled is not None else 0)
        return own + sum(c.__nodegraph_nbytes__() for c in self.also)


@dataclass(frozen=True, eq=False)
class Posterior:
    """The encoder's Gaussian over latents. Kept unsampled so that the sampler draws the sample from its own seeded
    generator, in the order diffusers draws it."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.scaling_factor * (self.mean + self.std * noise.to(self.mean.device, self.mean.dtype))

    def mode(self) -> torch.Tensor:
        return self.scaling_factor * self.mean


@dataclass(frozen=True, eq=False)
class Latent:
    """Latents [B, C, h, w] (already multiplied by the VAE's scaling factor), or the posterior of encoded images;
    for inpainting also the mask at latent resolution (1 = repaint) and the posterior of the masked image."""

    samples: torch.Tensor | None = None
    posterior: Posterior | None = None
    mask: torch.Tensor | None = None
    masked_image: Posterior | None = None
    empty: bool = False  # from EmptyLatent: only the shape matters, sampling starts from pure noise

    def __post_init__(self) -> None:
        if (self.samples is None) == (self.posterior is None):
            raise ValueError("a latent holds either samples or a posterior")

    @property
    def value(self) -> torch.Tensor:
        """The latents themselves (the posterior's mean for encoded images)."""
        return self.samples if self.samples is not None else self.posterior.mode()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple((self.samples if self.samples is not None else self.posterior.mean).shape)

    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        tensors = [self.samples, self.mask]
        for post in (self.posterior, self.masked_image):
            if post is not None:
                tensors += [post.mean, post.std]
        return sum(t.nbytes for t in tensors if t is not None)


@dataclass(frozen=True)
class Schedule:
    """What the LCMScheduler node asked for: step count or custom timesteps, over the model's scheduler config.

    The timesteps themselves depend on the sampler's strength (image-to-image shortens the distillation schedule
    before picking steps), so the sampler resolves them with ``resolve``.
    """

    config: LCMSchedulerConfig
    steps: int | None = None
    original_inference_steps: int | None = None
    custom: tuple[int, ...] | None = None

    def resolve(self, strength: float = 1.0) -> lcm_math.Timesteps:
        return lcm_math.lcm_timesteps(self.config, None if self.custom else self.steps,
                                      original_inference_steps=self.original_inference_steps,
                                      timesteps=self.custom, strength=strength)
