"""LCM scheduling and sampling: the heart of the library.

``sample`` is one loop that reproduces three diffusers pipelines exactly (same random draws in the same order from
a CPU generator seeded with ``seed``, same floating-point operations):

* text-to-image as ``LatentConsistencyModelPipeline`` (an LCM-distilled UNet: guidance through the w-embedding,
  one UNet pass per step) or ``StableDiffusionPipeline`` + ``LCMScheduler`` (a plain UNet with LCM-LoRA:
  classifier-free guidance with batch doubling only when guidance > 1);
* image-to-image as ``LatentConsistencyModelImg2ImgPipeline``: strength shortens the distillation schedule before
  steps are picked, the encoded image is sampled from its posterior and noised to the first timestep;
* inpainting as ``StableDiffusionInpaintPipeline`` + ``LCMScheduler``: strength slices the full schedule; a
  4-channel UNet has the known region put back (noised to the next timestep) after every step, a 9-channel
  inpainting UNet gets the mask and the masked image as extra input channels.

ControlNets and T2I-Adapters attached to the positive conditioning (``nodes.control``) add their residuals to the
UNet calls of all three (a ControlNet only within its step window), as diffusers' ControlNet, ControlNet-inpaint and
T2I-Adapter pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nodegraph import Float, Int, Node, Output, Socket, String

from . import lcm_math
from .devices import cpu_generator
from .lcm_math import LCMSchedulerConfig
from .values import CONDITIONING, LATENT, MODEL, SCHEDULE, Conditioning, Latent, Model, Schedule, unet_batch


class LCMScheduler(Node):
    """The timesteps an LCM sampler visits, exactly as diffusers' LCMScheduler picks them.

    steps: how many denoising steps (1-8 is LCM's sweet spot). original_inference_steps: the length of the
    distillation schedule the steps are picked from (0 = the model's own, usually 50). timesteps: an optional
    comma-separated, strictly descending list such as "999, 759, 499, 259" that replaces steps."""

    category = "sampling"
    model = Socket(MODEL)
    steps = Int(default=4, min=1, max=50)
    original_inference_steps = Int(default=0, min=0, max=1000)
    timesteps = String(default="")
    outputs = (Output("schedule", SCHEDULE),)

    def run(self, ctx, model, steps, original_inference_steps, timesteps):
        config = LCMSchedulerConfig.from_dict(model.scheduler_config)
        custom = parse_timesteps(timesteps)
        schedule = Schedule(config, steps, original_inference_steps or None, custom)
        schedule.resolve()  # fail here, on this node, if the request is impossible
        return schedule


def parse_timesteps(text: str) -> tuple[int, ...] | None:
    text = text.strip()
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"timesteps must be whole numbers separated by commas, got {text!r}") from None


class LCMSampler(Node):
    """Denoise a latent in a few steps with a Latent Consistency Model (or a model with LCM-LoRA).

    An LCM-distilled model takes guidance through its guidance embedding (w = guidance - 1) and ignores a negative
    prompt; a plain model uses classifier-free guidance with the negative prompt (or an empty one) when
    guidance > 1, and none at 1.0 (LCM-LoRA works best at 1-2).
    From an EmptyLatent this is text-to-image. From VAEEncode it is image-to-image: strength is how much of the
    image is redrawn (1.0 = all of it). From InpaintEncode only the masked region is redrawn.
    The same seed gives the same image as diffusers' pipelines, on any device."""

    category = "sampling"
    model = Socket(MODEL)
    positive = Socket(CONDITIONING)
    negative = Socket(CONDITIONING, optional=True)
    latent = Socket(LATENT)
    schedule = Socket(SCHEDULE)
    seed = Int(default=0, min=0, max=2**64 - 1)
    guidance = Float(default=8.0, min=0.0, max=30.0, step=0.01)
    strength = Float(default=1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("latent", LATENT),)

    def run(self, ctx, model, positive, latent, schedule, seed, guidance, strength, negative=None):
        if negative is not None and model.lcm_distilled:
            ctx.log.warning("an LCM-distilled model takes no negative prompt: the negative input is ignored")
        previews = ctx.settings.previews

        def on_step(i: int, total: int, denoised: torch.Tensor) -> None:
            ctx.progress(i + 1, total, latent_preview(denoised) if previews else None)

        out = sample(model, positive, latent, schedule, seed=seed, guidance=guidance, strength=strength,
                     negative=negative, on_step=on_step)
        return Latent(samples=out)


@dataclass
class _Guidance:
    embeds: torch.Tensor  # [N or 2N, tokens, dim]
    cfg: bool
    scale: float
    w_embedding: torch.Tensor | None
    controls: Any = None  # ControlNet / T2I-Adapter controls (nodes.control.UNetControls), or None
    added: dict | None = None  # SDXL's added conditioning: pooled text embeddings and size/crop "time ids"


def _prepare_guidance(model: Model, positive: Conditioning, negative: Conditioning | None, guidance: float,
                      latent_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Guidance:
    batch = latent_shape[0]
    embeds = _repeat(positive.embeds, batch)
    cfg = guidance > 1.0 and not model.lcm_distilled
    xl = getattr(model.unet.config, "addition_embed_type", None) == "text_time"
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
    added = None
    if xl:
        pooled = _repeat(positive.pooled[:, None], batch)[:, 0]
        if cfg:
            pooled = torch.cat([_repeat(uncond_pooled[:, None], batch)[:, 0], pooled])
        # original size, crop top-left, target size, in pixels: the image as generated, uncropped
        height, width = (n * model.latent_scale for n in latent_shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(pooled.shape[0], 1)
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device)}
    return _Guidance(embeds.to(device), cfg, guidance, w_embedding, added=added)


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
        from .control import prepare_controls

        g.controls = prepare_controls(model.unet, positive.extras, batch=latent_shape[0], cfg=g.cfg,
                                      latent_size=tuple(latent_shape[-2:]), steps=steps, device=device)


def _predict_noise(unet, latents: torch.Tensor, t: torch.Tensor, g: _Guidance,
                   extra_channels: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
    model_input = torch.cat([latents] * 2) if g.cfg else latents
    # controls see the latents only (as in diffusers' ControlNet inpainting), never the inpainting channels
    control = g.controls(step, model_input, t, g.embeds, g.added) if g.controls is not None else {}
    if extra_channels is not None:
        model_input = torch.cat([model_input, extra_channels], dim=1)
    if g.added is not None:
        control = {**control, "added_cond_kwargs": g.added}
    eps = unet(model_input, t, encoder_hidden_states=g.embeds, timestep_cond=g.w_embedding,
               return_dict=False, **control)[0]
    if g.cfg:
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + g.scale * (eps_cond - eps_uncond)
    return eps


def sample(model: Model, positive: Conditioning, latent: Latent, schedule: Schedule, *, seed: int,
           guidance: float, strength: float = 1.0, negative: Conditioning | None = None,
           on_step=None) -> torch.Tensor:
    """Run the LCM loop and return the final latents (the consistency function's last ``denoised``)."""
    if latent.mask is not None:
        return _inpaint(model, positive, latent, schedule, seed=seed, guidance=guidance, strength=strength,
                        negative=negative, on_step=on_step)
    device, dtype = model.device, positive.embeds.dtype
    generator = cpu_generator(seed)
    config = schedule.config
    alphas = config.alphas_cumprod()
    batch = latent.shape[0]
    _check_channels(model, latent, expected=model.unet.config.in_channels)

    if latent.empty:  # text-to-image: pure noise (DRAW 1), the full schedule
        plan = schedule.resolve()
        latents = lcm_math.randn_like_diffusers(latent.shape, generator, dtype=dtype, device=device)
    else:  # image-to-image: strength shortens the distillation schedule (LCM img2img semantics)
        if strength <= 0:
            raise ValueError("strength 0 would leave the image unchanged: use a strength above 0")
        plan = schedule.resolve(strength)
        if latent.posterior is not None:  # DRAW 1: the posterior sample of the encoded image
            init = latent.posterior.sample(_posterior_noise(latent.posterior, generator, dtype))
        else:
            init = latent.samples
        init = init.to(device, dtype)
        noise = lcm_math.randn_like_diffusers(init.shape, generator, dtype=dtype, device=device)  # DRAW 2
        latents = lcm_math.add_noise(init, noise, plan.timesteps[:1], alphas.to(device))

    g = _prepare_guidance(model, positive, negative, guidance, latent.shape, dtype, device)
    _attach_controls(g, model, positive, latent.shape, len(plan), device)
    alphas = alphas.to(device)
    denoised = latents
    with model.applied() as unet, torch.inference_mode(), unet_batch(batch, g.cfg):
        for i, t in enumerate(plan.timesteps):
            latents = latents.to(dtype)
            eps = _predict_noise(unet, latents, torch.tensor(t, dtype=torch.int64, device=device), g, step=i)
            latents, denoised = lcm_math.lcm_step(eps, latents, step_index=i, schedule=plan, alphas_cumprod=alphas,
                                                  config=config, generator=generator)
            if on_step is not None:
                on_step(i, len(plan), denoised)
    return denoised.to(dtype)


def _inpaint(model: Model, positive: Conditioning, latent: Latent, schedule: Schedule, *, seed: int,
             guidance: float, strength: float, negative: Conditioning | None, on_step) -> torch.Tensor:
    """StableDiffusionInpaintPipeline's loop with an LCMScheduler (see the module docstring)."""
    if latent.posterior is None or latent.masked_image is None:
        raise ValueError("inpainting needs a latent from InpaintEncode (the image, its mask and the masked image)")
    device, dtype = model.device, positive.embeds.dtype
    generator = cpu_generator(seed)
    config = schedule.config
    alphas = config.alphas_cumprod().to(device)
    batch = latent.shape[0]
    unet_channels = model.unet.config.in_channels
    latent_channels = latent.shape[1]
    if unet_channels not in (latent_channels, 2 * latent_channels + 1):
        raise ValueError(f"this UNet takes {unet_channels} input channels; inpainting needs {latent_channels} "
                         f"(any model) or {2 * latent_channels + 1} (an inpainting model)")
    blend = unet_channels == latent_channels

    full = schedule.resolve()
    n = full.num_inference_steps
    t_start = n - min(int(n * strength), n)  # strength slices the full schedule, as SD img2img/inpaint do
    if t_start >= len(full.timesteps):
        raise ValueError(f"strength {strength} leaves no step of {len(full.timesteps)}: raise strength or steps")
    plan = lcm_math.Timesteps(full.timesteps[t_start:], n - t_start)

    image_latents = None
    if blend or strength < 1.0:  # DRAW: the image's posterior sample
        image_latents = latent.posterior.sample(_posterior_noise(latent.posterior, generator, dtype)).to(device)
    noise = lcm_math.randn_like_diffusers(latent.shape, generator, dtype=dtype, device=device)  # DRAW: noise
    latents = noise if strength == 1.0 else lcm_math.add_noise(image_latents, noise, plan.timesteps[:1], alphas)
    masked = latent.masked_image.sample(_posterior_noise(latent.masked_image, generator, dtype)).to(device)  # DRAW

    g = _prepare_guidance(model, positive, negative, guidance, latent.shape, dtype, device)
    _attach_controls(g, model, positive, latent.shape, len(plan), device)
    mask = latent.mask.to(device, dtype)
    extra = None
    if not blend:  # an inpainting UNet reads the mask and the masked image as extra input channels
        extra = torch.cat([mask, masked], dim=1)
        if g.cfg:
            extra = torch.cat([extra] * 2)
    denoised = latents
    with model.applied() as unet, torch.inference_mode(), unet_batch(batch, g.cfg):
        for i, t in enumerate(plan.timesteps):
            eps = _predict_noise(unet, latents, torch.tensor(t, dtype=torch.int64, device=device), g, extra,
                                 step=i)
            latents, denoised = lcm_math.lcm_step(eps, latents, step_index=i, schedule=plan, alphas_cumprod=alphas,
                                                  config=config, generator=generator)
            if blend:  # put the known region back, noised to where the next step starts
                known = image_latents
                if i < len(plan) - 1:
                    known = lcm_math.add_noise(known, noise, [plan.timesteps[i + 1]], alphas)
                latents = (1 - mask) * known + mask * latents
            if on_step is not None:
                on_step(i, len(plan), denoised)
    return latents


def _posterior_noise(posterior, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return lcm_math.randn_like_diffusers(posterior.mean.shape, generator, dtype=dtype, device=posterior.mean.device)


def _check_channels(model: Model, latent: Latent, expected: int) -> None:
    if latent.shape[1] != expected:
        raise ValueError(f"the latent has {latent.shape[1]} channels but this UNet takes {expected}: "
                         f"make the latent with this checkpoint's VAE")


def latent_preview(latents: torch.Tensor, size: int = 64):
    """A cheap look at the first image of a latent batch: its first three channels, each stretched to 0-255.
    No VAE runs, so it costs microseconds; colours are only indicative."""
    from PIL import Image

    x = latents[0, :3].float()
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).byte().permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(x)
    image.thumbnail((size, size))
    return image


NODES = [LCMScheduler, LCMSampler]
