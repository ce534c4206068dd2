"""LCM's nodes: LCMScheduler picks the timesteps exactly as diffusers' LCMScheduler does, LCMSampler runs the shared
loop (``nodes.sampling``) with LCM's consistency step (``nodes.lcm_math``), bit-exact with
``LatentConsistencyModelPipeline``, its image-to-image pipeline (strength shortens the distillation schedule before
steps are picked) and ``StableDiffusionInpaintPipeline`` + ``LCMScheduler`` (strength slices the full schedule).
"""

from __future__ import annotations

import torch

from nodegraph import Float, Int, Node, Output, Socket, String

from . import lcm_math
from .lcm_math import LCMSchedulerConfig
from .previews import preview
from .sampling import sample
from .values import CONDITIONING, LATENT, MODEL, SCHEDULE, Latent, Schedule


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
            ctx.progress(i + 1, total, preview(model, denoised) if previews else None)

        out = sample(model, positive, latent, lcm_steps(schedule), seed=seed, guidance=guidance, strength=strength,
                     negative=negative, on_step=on_step, compile_unet=ctx.settings.compile)
        return Latent(samples=out)


class LCMSteps:
    """The ``Steps`` of an LCM run: the consistency step of ``lcm_math`` over resolved timesteps."""

    init_noise_sigma = 1.0  # LCMScheduler's

    def __init__(self, plan: lcm_math.Timesteps, config: LCMSchedulerConfig, generator: torch.Generator,
                 device: torch.device):
        self.plan, self.config, self.generator, self.device = plan, config, generator, device
        self.timesteps = plan.timesteps
        self.alphas = config.alphas_cumprod().to(device)

    def scale(self, latents: torch.Tensor, t) -> torch.Tensor:
        return latents

    def unet_timestep(self, t) -> torch.Tensor:
        return torch.tensor(t, dtype=torch.int64, device=self.device)

    def step(self, i: int, eps: torch.Tensor, t, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lcm_math.lcm_step(eps, latents, step_index=i, schedule=self.plan, alphas_cumprod=self.alphas,
                                 config=self.config, generator=self.generator)

    def noise_start(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return lcm_math.add_noise(x, noise, self.timesteps[:1], self.alphas)

    def noise_to(self, x: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return lcm_math.add_noise(x, noise, [self.timesteps[i]], self.alphas)

    def output(self, latents: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return denoised  # the consistency function's last estimate, as LCM's pipelines decode


def lcm_steps(schedule: Schedule):
    """The ``MakeSteps`` of an LCMScheduler's schedule."""

    def make(mode: str, strength: float, generator: torch.Generator, device: torch.device) -> LCMSteps:
        if mode == "text":
            plan = schedule.resolve()
        elif mode == "image":  # LCM img2img: strength shortens the distillation schedule, then steps are picked
            plan = schedule.resolve(strength)
        else:  # inpainting: strength slices the full schedule, as SD img2img / inpaint do
            full = schedule.resolve()
            n = full.num_inference_steps
            t_start = n - min(int(n * strength), n)
            plan = lcm_math.Timesteps(full.timesteps[t_start:], n - t_start)
        return LCMSteps(plan, schedule.config, generator, device)

    return make


NODES = [LCMScheduler, LCMSampler]
