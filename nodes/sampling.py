"""The denoising loop every sampler node shares: classifier-free guidance, SDXL's added conditioning, ControlNet and
T2I-Adapter residuals, model patches (LoRA, FreeU, IP-Adapter), text-to-image, image-to-image and inpainting.

A sampler node brings its ``Steps``: what the UNet is called with, in order, and what one step does with its noise
prediction. ``nodes.lcm`` brings LCM's (bit-exact with diffusers' LCMScheduler), ``nodes.schedulers`` wraps any of
diffusers' schedulers. The loop reproduces diffusers' pipelines exactly (the same random draws in the same order from
a CPU generator seeded with ``seed``, the same floating-point operations):

* text-to-image as ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` and
  ``LatentConsistencyModelPipeline``: noise scaled by the scheduler's ``init_noise_sigma``; an LCM-distilled UNet
  gets guidance through its w-embedding (one UNet pass per step), a plain UNet classifier-free guidance with batch
  doubling when guidance > 1;
* image-to-image: the encoded image is sampled from its posterior and noised to the first timestep; which
  timesteps are left is the Steps' business (LCM shortens its distillation schedule, SD img2img slices the full
  one);
* inpainting as ``StableDiffusionInpaintPipeline``: strength slices the full schedule; a 4-channel UNet has the
  known region put back (noised to the next timestep) after every step, a 9-channel inpainting UNet gets the mask
  and the masked image as extra input channels.

ControlNets and T2I-Adapters attached to the positive conditioning (``nodes.control``) add their residuals to the
UNet calls (a ControlNet only within its step window), as diffusers' ControlNet, ControlNet-inpaint and T2I-Adapter
pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from . import compilation, lcm_math
from .devices import cpu_generator
from .values import Conditioning, Latent, Model, unet_batch


class Steps(Protocol):
    """One sampler's walk through the timesteps, as the loop needs it."""

    timesteps: Sequence  # the UNet is called once per entry, in this order
    init_noise_sigma: Any  # text-to-image noise is scaled by it

    def scale(self, latents: torch.Tensor, t) -> torch.Tensor:
        """The UNet's input at ``t`` (some schedulers divide by the noise level)."""

    def unet_timestep(self, t) -> torch.Tensor:
        """``t`` as the UNet takes it."""

    def step(self, i: int, eps: torch.Tensor, t, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the latents of the next step, the estimate of the clean latents) after step ``i``."""

    def noise_start(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x`` noised to the first timestep (image-to-image and inpainting below full strength)."""

    def noise_to(self, x: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """``x`` noised to timestep ``i`` (the known region of an inpainting)."""

    def output(self, latents: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """What text-to-image and image-to-image return after the last step."""


#: mode ("text", "image" or "inpaint"), strength, the run's generator, the device -> the Steps of one run
MakeSteps = Callable[[str, float, torch.Generator, torch.device], Steps]


@dataclass
class _Guidance:
    embeds: torch.Tensor  # [(uncond) + prompts x N, tokens, dim]
    cfg: bool
    scale: float
    w_embedding: torch.Tensor | None
    controls: Any = None  # ControlNet / T2I-Adapter controls (nodes.control.UNetControls), or None
    added: dict | None = None  # SDXL's added conditioning: pooled text embeddings and size/crop "time ids"
    prompts: int = 1  # combined prompts (ConditioningCombine), whose noise predictions are averaged


def _prepare_guidance(model: Model, positive: Conditioning, negative: Conditioning | None, guidance: float,
                      latent_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Guidance:
    batch = latent_shape[0]
    embeds = _repeat(positive.embeds, batch)
    cfg = guidance > 1.0 and not model.lcm_distilled
    xl = getattr(model.unet.config, "addition_embed_type", None) == "text_time"
    if positive.also:  # combined prompts: every one is predicted in the same UNet call, side by side
        if xl or positive.extras or any(c.extras for c in positive.also):
            raise ValueError("combined prompts (ConditioningCombine) work with SD 1.x/2.x models without "
                             "ControlNets or T2I-Adapters for now")
        for other in positive.also:
            if other.embeds.shape[1:] != positive.embeds.shape[1:]:
                raise ValueError(f"combined prompts must come from the same CLIP: {tuple(other.embeds.shape)} "
                                 f"vs {tuple(positive.embeds.shape)}")
        embeds = torch.cat([embeds, *(_repeat(c.embeds, batch) for c in positive.also)])
    if xl and positive.pooled is None:
        raise ValueError("this SDXL model needs a prompt encoded by an SDXL CLIP (both text encoders, "
                         "with the pooled embedding)")
    uncond_pooled = None
    if cfg:
        if negative is None:
            if positive.clip is None:
                raise ValueError("guidance > 1 needs a negative prompt (or a positive one from CLIPEncode)")
            from .conditioning import encode_text  # the unconditional embedding, as diffusers makes it
            if xl:  # SDXL pipelines use zeros when no negative prompt is given (force_zeros_for_empty_prompt)
                uncond, uncond_pooled = torch.zeros_like(positive.embeds[:1]), torch.zeros_like(positive.pooled[:1])
            else:
                uncond = encode_text(positive.clip, "")
        else:
            uncond = negative.embeds
            if xl and negative.pooled is None:
                raise ValueError("the negative prompt of an SDXL model must come from an SDXL CLIP too")
            uncond_pooled = negative.pooled
        if uncond.shape[1:] != positive.embeds.shape[1:]:
            raise ValueError(f"the negative prompt's embeddings {tuple(uncond.shape)} do not match the positive "
                             f"prompt's {tuple(positive.embeds.shape)}: encode both with the same CLIP")
        embeds = torch.cat([_repeat(uncond, batch), embeds])  # unconditional first, as diffusers orders them
    w_embedding = None
    if model.lcm_distilled:
        w_embedding = lcm_math.guidance_embedding(guidance, model.unet.config.time_cond_proj_dim, batch,
                                                  dtype=dtype, device=device)
        if positive.also:
            w_embedding = torch.cat([w_embedding] * (1 + len(positive.also)))
    added = None
    if xl:
        pooled = _repeat(positive.pooled[:, None], batch)[:, 0]
        if cfg:
            pooled = torch.cat([_repeat(uncond_pooled[:, None], batch)[:, 0], pooled])
        # original size, crop top-left, target size, in pixels: the image as generated, uncropped
        height, width = (n * model.latent_scale for n in latent_shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(pooled.shape[0], 1)
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device)}
    if len(latent_shape) == 5:  # a video [B, C, F, h, w]: each frame reads its video's prompt, as AnimateDiff does
        if added is not None:
            raise ValueError("animating an SDXL model is not supported yet: use an SD 1.5 model and motion module")
        embeds = embeds.repeat_interleave(latent_shape[2], dim=0)
    return _Guidance(embeds.to(device), cfg, guidance, w_embedding, added=added, prompts=1 + len(positive.also))


def _repeat(embeds: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat one prompt's embeddings for each image of the batch (diffusers' num_images_per_prompt layout)."""
    if embeds.shape[0] == batch:
        return embeds
    if embeds.shape[0] != 1:
        raise ValueError(f"the conditioning holds {embeds.shape[0]} prompts but the latent batch is {batch}")
    _, tokens, dim = embeds.shape
    return embeds.repeat(1, batch, 1).view(batch, tokens, dim)


def _attach_controls(g: _Guidance, model: Model, positive: Conditioning, latent_shape: tuple[int, ...],
                     steps: int, device: torch.device) -> None:
    """Prepare the ControlNet / T2I-Adapter controls the positive conditioning carries (nodes.control)."""
    if positive.extras:
        if len(latent_shape) == 5:
            raise ValueError("ControlNets and T2I-Adapters do not work on animations yet: sample the video without "
                             "them")
        from .control import prepare_controls

        g.controls = prepare_controls(model.unet, positive.extras, batch=latent_shape[0], cfg=g.cfg,
                                      latent_size=tuple(latent_shape[-2:]), steps=steps, device=device)


def _predict_noise(unet, latents: torch.Tensor, t: torch.Tensor, g: _Guidance,
                   extra_channels: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
    copies = g.prompts + g.cfg
    model_input = torch.cat([latents] * copies) if copies > 1 else latents
    # controls see the latents only (as in diffusers' ControlNet inpainting), never the inpainting channels
    control = g.controls(step, model_input, t, g.embeds, g.added) if g.controls is not None else {}
    if extra_channels is not None:
        model_input = torch.cat([model_input, extra_channels], dim=1)
    if g.added is not None:
        control = {**control, "added_cond_kwargs": g.added}
    eps = unet(model_input, t, encoder_hidden_states=g.embeds, timestep_cond=g.w_embedding,
               return_dict=False, **control)[0]
    if g.prompts > 1:  # the combined prompts' predictions, averaged (the unconditional one stays apart)
        parts = eps.chunk(copies)
        eps = torch.stack(parts[g.cfg:]).mean(dim=0)
        if g.cfg:
            eps = torch.cat([parts[0], eps])
    if g.cfg:
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + g.scale * (eps_cond - eps_uncond)
    return eps


def sample(model: Model, positive: Conditioning, latent: Latent, make_steps: MakeSteps, *, seed: int,
           guidance: float, strength: float = 1.0, negative: Conditioning | None = None,
           on_step=None, compile_unet: bool = False) -> torch.Tensor:
    """Denoise ``latent`` (empty: text-to-image; encoded: image-to-image; with a mask: inpainting) and return the
    final latents. ``compile_unet``: run the UNet compiled where it can be (Settings.compile, nodes.compilation)."""
    if latent.mask is not None:
        return _inpaint(model, positive, latent, make_steps, seed=seed, guidance=guidance, strength=strength,
                        negative=negative, on_step=on_step, compile_unet=compile_unet)
    device, dtype = model.device, positive.embeds.dtype
    generator = cpu_generator(seed)
    batch = latent.shape[0]
    _check_channels(model, latent, expected=model.unet.config.in_channels)

    if latent.empty:  # text-to-image: pure noise (DRAW 1)
        steps = make_steps("text", 1.0, generator, device)
        noise = lcm_math.randn_like_diffusers(latent.shape, generator, dtype=dtype, device=device)
        latents = noise * steps.init_noise_sigma
    else:  # image-to-image
        if strength <= 0:
            raise ValueError("strength 0 would leave the image unchanged: use a strength above 0")
        steps = make_steps("image", strength, generator, device)
        _check_some_steps(steps, strength)
        if latent.posterior is not None:  # DRAW 1: the posterior sample of the encoded image
            init = latent.posterior.sample(_posterior_noise(latent.posterior, generator, dtype))
        else:
            init = latent.samples
        init = init.to(device, dtype)
        noise = lcm_math.randn_like_diffusers(init.shape, generator, dtype=dtype, device=device)  # DRAW 2
        latents = steps.noise_start(init, noise)

    g = _prepare_guidance(model, positive, negative, guidance, latent.shape, dtype, device)
    _attach_controls(g, model, positive, latent.shape, len(steps.timesteps), device)
    latents, denoised = _loop(model, g, steps, latents, dtype, batch, on_step=on_step, compile_unet=compile_unet)
    return steps.output(latents, denoised).to(dtype)


def _inpaint(model: Model, positive: Conditioning, latent: Latent, make_steps: MakeSteps, *, seed: int,
             guidance: float, strength: float, negative: Conditioning | None, on_step,
             compile_unet: bool) -> torch.Tensor:
    """StableDiffusionInpaintPipeline's loop (see the module docstring)."""
    if latent.posterior is None or latent.masked_image is None:
        raise ValueError("inpainting needs a latent from InpaintEncode (the image, its mask and the masked image)")
    device, dtype = model.device, positive.embeds.dtype
    generator = cpu_generator(seed)
    batch = latent.shape[0]
    unet_channels = model.unet.config.in_channels
    latent_channels = latent.shape[1]
    if unet_channels not in (latent_channels, 2 * latent_channels + 1):
        raise ValueError(f"this UNet takes {unet_channels} input channels; inpainting needs {latent_channels} "
                         f"(any model) or {2 * latent_channels + 1} (an inpainting model)")
    blend = unet_channels == latent_channels
    steps = make_steps("inpaint", strength, generator, device)
    _check_some_steps(steps, strength)

    image_latents = None
    if blend or strength < 1.0:  # DRAW: the image's posterior sample
        image_latents = latent.posterior.sample(_posterior_noise(latent.posterior, generator, dtype)).to(device)
    noise = lcm_math.randn_like_diffusers(latent.shape, generator, dtype=dtype, device=device)  # DRAW: noise
    latents = noise * steps.init_noise_sigma if strength == 1.0 else steps.noise_start(image_latents, noise)
    masked = latent.masked_image.sample(_posterior_noise(latent.masked_image, generator, dtype)).to(device)  # DRAW

    g = _prepare_guidance(model, positive, negative, guidance, latent.shape, dtype, device)
    _attach_controls(g, model, positive, latent.shape, len(steps.timesteps), device)
    mask = latent.mask.to(device, dtype)
    extra = put_back = None
    if blend:
        last = len(steps.timesteps) - 1

        def put_back(i: int, latents: torch.Tensor) -> torch.Tensor:
            # the known region, noised to where the next step starts
            known = steps.noise_to(image_latents, noise, i + 1) if i < last else image_latents
            return (1 - mask) * known + mask * latents
    else:  # an inpainting UNet reads the mask and the masked image as extra input channels
        extra = torch.cat([mask, masked], dim=1)
        if g.cfg:
            extra = torch.cat([extra] * 2)
    latents, _ = _loop(model, g, steps, latents, dtype, batch, extra=extra, after_step=put_back, on_step=on_step,
                       compile_unet=compile_unet)
    return latents


def _loop(model: Model, g: _Guidance, steps: Steps, latents: torch.Tensor, dtype: torch.dtype, batch: int, *,
          extra: torch.Tensor | None = None, after_step=None, on_step=None,
          compile_unet: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    denoised = latents
    total = len(steps.timesteps)
    with model.applied() as unet, torch.inference_mode(), unet_batch(batch, g.cfg):
        unet = compilation.unet_for(model, unet, compile_unet)
        for i, t in enumerate(steps.timesteps):
            latents = latents.to(dtype)
            eps = _predict_noise(unet, steps.scale(latents, t), steps.unet_timestep(t), g, extra, step=i)
            latents, denoised = steps.step(i, eps, t, latents)
            if after_step is not None:
                latents = after_step(i, latents)
            if on_step is not None:
                on_step(i, total, denoised)
    return latents, denoised


def _check_some_steps(steps: Steps, strength: float) -> None:
    if len(steps.timesteps) == 0:
        raise ValueError(f"strength {strength} leaves no step to run: raise strength or steps")


def _posterior_noise(posterior, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return lcm_math.randn_like_diffusers(posterior.mean.shape, generator, dtype=dtype, device=posterior.mean.device)


def _check_channels(model: Model, latent: Latent, expected: int) -> None:
    animates = getattr(model.unet.config, "motion_max_seq_length", None) is not None  # a UNetMotionModel
    if len(latent.shape) == 5 and not animates:
        raise ValueError("a video latent (EmptyLatentVideo) needs a model with a motion module: put "
                         "ApplyMotionModule between the checkpoint and the sampler")
    if len(latent.shape) == 4 and animates:
        raise ValueError("this model has a motion module and makes videos: start from EmptyLatentVideo")
    if latent.shape[1] != expected:
        raise ValueError(f"the latent has {latent.shape[1]} channels but this UNet takes {expected}: "
                         f"make the latent with this checkpoint's VAE")


def latent_preview(latents: torch.Tensor, size: int = 64):
    """A cheap look at the first image of a latent batch without its VAE: its first three channels, each stretched
    to 0-255 (colours only indicative). Samplers that hold a checkpoint's model use :func:`nodes.previews.preview`,
    in the VAE's colours."""
    from .previews import stretch_preview

    return stretch_preview(latents, size)



