"""Sampler: denoise with any of diffusers' schedulers (DDIM, Euler, DPM++, UniPC, Heun, ...) through the same loop
as LCMSampler (``nodes.sampling``), so ControlNets, T2I-Adapters, IP-Adapters, LoRAs and FreeU work with it as
they do there.

Each sampler name is one diffusers scheduler class (with options), built from the checkpoint's own scheduler
configuration as ``Cls.from_config(config, **options)``; the schedule choice adds the sigma spacing (Karras,
exponential, beta) or the timestep spacing (trailing, which ComfyUI calls sgm_uniform). The loop is that of
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (text-to-image), ``StableDiffusionImg2ImgPipeline``
(strength slices the schedule) and ``StableDiffusionInpaintPipeline``, with the ``eta`` and ``generator`` step
arguments they pass: the same seed gives their image.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from nodegraph import Combo, Float, Int, Node, Output, Socket

from .previews import preview
from .sampling import sample
from .values import CONDITIONING, LATENT, MODEL, Latent, Model

#: sampler name -> (diffusers scheduler class, options)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
#: schedule name -> the scheduler option that gives it
SCHEDULES: dict[str, tuple[str, Any]] = {
    "default": ("", None),
    "karras": ("use_karras_sigmas", True),
    "exponential": ("use_exponential_sigmas", True),
    "beta": ("use_beta_sigmas", True),
    "trailing": ("timestep_spacing", "trailing"),
}


def make_scheduler(scheduler_config, sampler: str, schedule: str = "default"):
    """The diffusers scheduler for ``sampler`` and ``schedule`` over a checkpoint's scheduler configuration; a clear
    error for a pair diffusers does not offer."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    class_name, options = SAMPLERS[sampler]
    cls = getattr(diffusers, class_name)
    option, value = SCHEDULES[schedule]
    if option:
        if not _offers(cls, option):
            offered = [name for name, (opt, _) in SCHEDULES.items() if not opt or _offers(cls, opt)]
            raise ValueError(f"the {sampler} sampler ({class_name}) has no {schedule} schedule; it offers "
                             f"{', '.join(offered)}")
        options = {**options, option: value}
    return cls.from_config(dict(scheduler_config), **options)


def _offers(cls, option: str) -> bool:
    return option in inspect.signature(cls.__init__).parameters


class SchedulerSteps:
    """The ``Steps`` of a run with a diffusers scheduler, taken as the SD pipelines take them."""

    def __init__(self, scheduler, mode: str, steps: int, strength: float, generator: torch.Generator,
                 device: torch.device, eta: float):
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        if mode != "text":  # img2img / inpaint: strength slices the schedule (the pipelines' get_timesteps)
            t_start = max(steps - min(int(steps * strength), steps), 0)
            timesteps = timesteps[t_start * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
        self.scheduler, self.timesteps = scheduler, timesteps
        self.init_noise_sigma = scheduler.init_noise_sigma
        accepted = inspect.signature(scheduler.step).parameters
        self.step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

    def scale(self, latents: torch.Tensor, t) -> torch.Tensor:
        return self.scheduler.scale_model_input(latents, t)

    def unet_timestep(self, t) -> torch.Tensor:
        return t

    def step(self, i: int, eps: torch.Tensor, t, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.scheduler.step(eps, t, latents, **self.step_kwargs, return_dict=True)
        denoised = getattr(out, "pred_original_sample", None)
        return out.prev_sample, out.prev_sample if denoised is None else denoised

    def noise_start(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x, noise, self.timesteps[:1].repeat(x.shape[0]))

    def noise_to(self, x: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return self.scheduler.add_noise(x, noise, torch.tensor([self.timesteps[i]]))

    def output(self, latents: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return latents


class Sampler(Node):
    """Denoise a latent with a diffusion sampler: the one to use with ordinary (not LCM-distilled) models, such as
    the demo teacher at 25 DDIM steps, or SD1.5/SDXL checkpoints at 20-30 steps with guidance 5-8.

    sampler: ddim (eta: 0 = deterministic), euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, unipc, heun, lms,
    pndm, ddpm, tcd (eta is its gamma), lcm. schedule: the sampler's default spacing, or karras / exponential /
    beta noise levels (euler, dpmpp_2m(_sde), unipc, heun, lms), or trailing timesteps (ComfyUI's sgm_uniform).
    Classifier-free guidance with the negative prompt (or an empty one) when guidance > 1.
    From an EmptyLatent this is text-to-image, from VAEEncode image-to-image (strength: how much is redrawn), from
    InpaintEncode inpainting. The same seed gives the image diffusers' Stable Diffusion pipelines give."""

    category = "sampling"
    model = Socket(MODEL)
    positive = Socket(CONDITIONING)
    negative = Socket(CONDITIONING, optional=True)
    latent = Socket(LATENT)
    seed = Int(default=0, min=0, max=2**64 - 1)
    steps = Int(default=25, min=1, max=200)
    guidance = Float(default=7.5, min=0.0, max=30.0, step=0.01)
    strength = Float(default=1.0, min=0.0, max=1.0, step=0.01)
    sampler = Combo(options=list(SAMPLERS), default="euler")
    schedule = Combo(options=list(SCHEDULES), default="default")
    eta = Float(default=0.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("latent", LATENT),)

    def run(self, ctx, model: Model, positive, latent, seed, steps, guidance, strength, sampler, schedule, eta,
            negative=None):
        if negative is not None and model.lcm_distilled:
            ctx.log.warning("an LCM-distilled model takes no negative prompt: the negative input is ignored")
        scheduler = make_scheduler(model.scheduler_config, sampler, schedule)  # a bad pair fails before any work

        def make_steps(mode: str, strength: float, generator: torch.Generator, device: torch.device):
            return SchedulerSteps(scheduler, mode, steps, strength, generator, device, eta)

        previews = ctx.settings.previews

        def on_step(i: int, total: int, denoised: torch.Tensor) -> None:
            ctx.progress(i + 1, total, preview(model, denoised) if previews else None)

        out = sample(model, positive, latent, make_steps, seed=seed, guidance=guidance, strength=strength,
                     negative=negative, on_step=on_step, compile_unet=ctx.settings.compile)
        return Latent(samples=out)


NODES = [Sampler]
