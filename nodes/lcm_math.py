"""Latent Consistency Model (LCM) maths as small pure functions on torch tensors.

This module is the numerical core of the LCM sampler nodes. Each function
transcribes one piece of what diffusers' ``LCMScheduler``
(``schedulers/scheduling_lcm.py``) and ``LatentConsistencyModelPipeline``
compute, and a reader can check it line by line against them: the noise
schedule, the timestep selection (B), the guidance embedding (A), one
consistency step (C) and the forward diffusion of image-to-image (D); the
letters name the sections below. The
names follow the LCM paper (Luo et al. 2023, "Latent Consistency Models"):
``c_skip``, ``c_out``, ``denoised``. Given the same inputs, the results are bit-identical to
diffusers in float32, so the floating-point operations are written in
exactly the same order as there; please keep it that way when editing.

Nothing here picks a device: tensors stay on the device of the inputs, and
tables such as ``alphas_cumprod`` are built on torch's default device, as
diffusers builds them. Scheduler tables and coefficients are float32.

Overview:
    alphas_cumprod        noise schedule
    LCMSchedulerConfig    the scheduler_config.json fields LCM uses
    lcm_timesteps         timestep selection  (Primitive B) -> Timesteps
    guidance_embedding    w-conditioning for LCM-distilled UNets  (Primitive A)
    lcm_step              one consistency step  (Primitive C)
    add_noise             forward diffusion for img2img  (Primitive D)
    randn_like_diffusers  the random draws, in diffusers' order  (RANDN)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "SIGMA_DATA",
    "LCMSchedulerConfig",
    "Timesteps",
    "add_noise",
    "alphas_cumprod",
    "boundary_condition_scalings",
    "guidance_embedding",
    "lcm_step",
    "lcm_timesteps",
    "predict_original_sample",
    "randn_like_diffusers",
    "threshold_sample",
]

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# sigma_data of the consistency-model boundary condition (LCM paper, eq. 5).
SIGMA_DATA = 0.5

# One generator for the whole batch, or one per sample (diffusers accepts both).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _as_float(value: object, name: str) -> float:
    """``value`` as a finite Python float; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _as_int(value: object, name: str) -> int:
    """``value`` as a Python int; ValueError naming ``name`` if it is not an integer."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # accepts int, numpy and 0-d torch integers
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


# ---------------------------------------------------------------------------
# Noise schedule (§0)
# ---------------------------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021), in Python floats."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = alphas_bar_sqrt - last
    alphas_bar_sqrt = alphas_bar_sqrt * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    rescale_betas_zero_snr: bool = False,
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """The float32 table ``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)``, t = 0..num_train_timesteps-1.

    ``trained_betas``, when given, replaces the named schedule (as in diffusers).
    """
    if trained_betas is not None:
        betas = torch.tensor(list(trained_betas), dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


# ---------------------------------------------------------------------------
# Scheduler configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LCMSchedulerConfig:
    """The fields of diffusers' ``LCMScheduler`` config that change LCM's results.

    Fields LCM ignores (``set_alpha_to_one``, ``steps_offset``, ``timestep_spacing``) are left
    out; ``from_dict`` drops them and any other unknown key, so the ``scheduler_config.json`` of
    any model folder can be read.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def __post_init__(self) -> None:
        # Normalise types first (JSON gives 10 for 10.0; the frozen config must stay hashable).
        def normalise(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        normalise("num_train_timesteps", _as_int(self.num_train_timesteps, "num_train_timesteps"))
        normalise("original_inference_steps", _as_int(self.original_inference_steps, "original_inference_steps"))
        for name in _FLOAT_FIELDS:
            normalise(name, _as_float(getattr(self, name), name))
        if self.trained_betas is not None:
            normalise("trained_betas", tuple(_as_float(b, "trained_betas") for b in self.trained_betas))

        n = self.num_train_timesteps
        if n < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {n}")
        if not 1 <= self.original_inference_steps <= n:
            raise ValueError(
                f"original_inference_steps must be in [1, num_train_timesteps={n}], "
                f"got {self.original_inference_steps}"
            )
        if self.trained_betas is not None:  # replaces beta_schedule, as in diffusers
            if len(self.trained_betas) != n:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} values, expected {n}")
        elif self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        for name in ("beta_start", "beta_end"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        for name in ("timestep_scaling", "clip_sample_range", "sample_max_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(
                f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio!r}"
            )

    @classmethod
    def from_dict(cls, config: Mapping[str, object]) -> LCMSchedulerConfig:
        """Build from a diffusers scheduler config (e.g. a parsed scheduler_config.json).

        Unknown keys are ignored; missing keys take LCMScheduler's defaults.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def alphas_cumprod(self) -> torch.Tensor:
        """This config's float32 ``alphas_cumprod`` table (see the module-level function)."""
        return alphas_cumprod(
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.beta_schedule,
            self.rescale_betas_zero_snr,
            self.trained_betas,
        )


_FLOAT_FIELDS = (
    "beta_start",
    "beta_end",
    "timestep_scaling",
    "clip_sample_range",
    "dynamic_thresholding_ratio",
    "sample_max_value",
)


# ---------------------------------------------------------------------------
# Primitive B: timestep selection
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Timesteps:
    """The timesteps an LCM sampler visits, in order, and diffusers' ``num_inference_steps``.

    ``num_inference_steps`` is ``len(timesteps)`` except for custom timesteps sliced by
    strength < 1, where it keeps the full custom length (as diffusers does). It decides which
    step is final, i.e. returns ``denoised`` without drawing noise (see ``is_final``).
    """

    timesteps: tuple[int, ...]
    num_inference_steps: int

    def __len__(self) -> int:
        return len(self.timesteps)

    def is_final(self, step_index: int) -> bool:
        """Whether step ``step_index`` is the last one (no noise is drawn after it).

        For a strength-sliced custom schedule no step is final: every step draws noise.
        """
        return step_index == self.num_inference_steps - 1

    def prev_timestep(self, step_index: int) -> int:
        """The timestep after step ``step_index``; the current one at the end of the schedule."""
        nxt = step_index + 1
        return self.timesteps[nxt] if nxt < len(self.timesteps) else self.timesteps[step_index]


def _lcm_origin_timesteps(config: LCMSchedulerConfig, original_inference_steps: int, strength: float) -> list[int]:
    """The ascending distillation timesteps k-1, 2k-1, ... that LCM was trained on, cut by strength."""
    k = config.num_train_timesteps // original_inference_steps
    # int() truncates the float product, exactly as diffusers does (e.g. 50 * 0.3 -> 15).
    return [i * k - 1 for i in range(1, int(original_inference_steps * strength) + 1)]


def _custom_schedule(
    config: LCMSchedulerConfig, timesteps: Sequence[int], origin: list[int], original_steps: int, strength: float
) -> Timesteps:
    ts = [_as_int(t, f"timesteps[{i}]") for i, t in enumerate(timesteps)]
    if not ts:
        raise ValueError("timesteps must not be empty")
    for i in range(1, len(ts)):
        if ts[i] >= ts[i - 1]:
            raise ValueError(
                f"custom timesteps must be strictly descending, but timesteps[{i}]={ts[i]} "
                f">= timesteps[{i - 1}]={ts[i - 1]}"
            )
    n_train = config.num_train_timesteps
    if ts[0] >= n_train:
        raise ValueError(f"custom timesteps must be < num_train_timesteps={n_train}, got timesteps[0]={ts[0]}")
    if ts[-1] < 0:
        raise ValueError(f"custom timesteps must be >= 0, got {ts[-1]}")

    # The same advisories diffusers logs: legal, but outside what the model was distilled on.
    if strength == 1.0 and ts[0] != n_train - 1:
        logger.warning("custom timesteps start at %d, not %d; results may be unexpected", ts[0], n_train - 1)
    on_grid = set(origin)
    off_grid = [t for t in ts[1:] if t not in on_grid]
    if off_grid:
        logger.warning("custom timesteps %s are not on the LCM distillation schedule", off_grid)
    if len(ts) > original_steps:
        logger.warning("%d custom timesteps exceed original_inference_steps=%d", len(ts), original_steps)

    n_full = len(ts)
    init = min(int(n_full * strength), n_full)
    t_start = max(n_full - init, 0)
    if t_start >= n_full:
        raise ValueError(f"strength={strength} leaves none of the {n_full} custom timesteps")
    # num_inference_steps stays n_full even after slicing (diffusers' behaviour).
    return Timesteps(tuple(ts[t_start:]), n_full)


def lcm_timesteps(
    config: LCMSchedulerConfig,
    steps: int | None = None,
    *,
    original_inference_steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    strength: float = 1.0,
) -> Timesteps:
    """The LCM timestep schedule, as ``LCMScheduler.set_timesteps`` builds it (Primitive B).

    Give exactly one of ``steps`` (pick that many timesteps evenly, by index, from the
    distillation schedule of ``original_inference_steps`` points, default from the config) or
    ``timesteps`` (a strictly descending custom list). ``strength`` < 1 (img2img) shortens the
    distillation schedule before picking, or drops the first custom timesteps.
    Invalid combinations raise ValueError naming the offending value.
    """
    if (steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of steps or timesteps")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    n_train = config.num_train_timesteps
    if original_inference_steps is None:
        original_steps = config.original_inference_steps
    else:
        original_steps = _as_int(original_inference_steps, "original_inference_steps")
    if not 1 <= original_steps <= n_train:
        raise ValueError(
            f"original_inference_steps must be in [1, num_train_timesteps={n_train}], got {original_steps}"
        )
    origin = _lcm_origin_timesteps(config, original_steps, strength)

    if timesteps is not None:
        return _custom_schedule(config, timesteps, origin, original_steps, strength)

    n = _as_int(steps, "steps")
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    if n > original_steps:
        raise ValueError(f"steps={n} cannot exceed original_inference_steps={original_steps}")
    if len(origin) < n:
        raise ValueError(
            f"strength={strength} keeps only {len(origin)} of original_inference_steps={original_steps} "
            f"timesteps, fewer than steps={n}; lower steps or raise strength to at least {n / original_steps}"
        )
    origin.reverse()
    span = len(origin)
    # Float floor(i * (L / n)) == numpy.floor(linspace(0, L, n, endpoint=False)); integer
    # i * L // n differs for many (L, n), e.g. L=30, n=22.
    return Timesteps(tuple(origin[math.floor(i * (span / n))] for i in range(n)), n)


# ---------------------------------------------------------------------------
# Primitive A: guidance-scale embedding
# ---------------------------------------------------------------------------


def guidance_embedding(
    guidance: float, dim: int, batch: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """The ``[batch, dim]`` sinusoidal embedding of w = guidance - 1 fed to an LCM-distilled UNet.

    This is the UNet's ``timestep_cond`` (``dim = unet.config.time_cond_proj_dim``). Computed in
    float32 on torch's default device, as diffusers does, then moved to ``device``/``dtype``.
    """
    dim = _as_int(dim, "dim")
    batch = _as_int(batch, "batch")
    if dim < 4:
        raise ValueError(f"dim must be >= 4 (the frequency spacing divides by dim // 2 - 1), got {dim}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    w = torch.tensor(float(guidance) - 1, dtype=torch.float32).repeat(batch)  # float64 subtraction first
    w = w * 1000.0
    half = dim // 2
    log_spacing = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -log_spacing)
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # sin first
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------
# RANDN: random draws in diffusers' order
# ---------------------------------------------------------------------------


def randn_like_diffusers(
    shape: Sequence[int],
    generator: Generators,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Standard normal noise drawn exactly as ``diffusers.utils.torch_utils.randn_tensor``.

    One generator (or a list of one) draws the whole ``shape`` at once; a list of
    ``shape[0]`` generators draws sample b from ``generator[b]``. A CPU generator draws on
    the CPU and the result is moved to ``device``, so seeds reproduce across devices.
    """
    device = torch.device(device)
    shape = tuple(shape)
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]

    rand_device = device
    if generator is not None:
        first = generator if isinstance(generator, torch.Generator) else generator[0]
        if first.device.type != device.type:
            if first.device.type != "cpu":
                raise ValueError(f"cannot draw a {device} tensor from a {first.device} generator")
            rand_device = torch.device("cpu")

    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        draws = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# ---------------------------------------------------------------------------
# Primitive C: one LCM step
# ---------------------------------------------------------------------------


def boundary_condition_scalings(
    timestep: torch.Tensor, timestep_scaling: float, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of the consistency boundary condition at integer ``timestep``.

    ``timestep`` is an int64 tensor; scaling it gives float32, which is what makes c_skip and
    c_out float32 (a Python float timestep would compute them in float64).
    """
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def predict_original_sample(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The model's estimate x0 of the clean sample, from its output at noise level ``alpha_prod_t``."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
    if prediction_type == "v_prediction":
        return alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022): clamp each sample to its ``ratio``
    quantile of |x0| (at least 1, at most ``max_value``) and divide by that quantile."""
    dtype = x0.dtype
    batch, channels, *rest = x0.shape
    if dtype not in (torch.float32, torch.float64):
        x0 = x0.float()  # quantile needs float32/64
    flat = x0.reshape(batch, channels * math.prod(rest))
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def lcm_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    step_index: int,
    schedule: Timesteps,
    alphas_cumprod: torch.Tensor,
    config: LCMSchedulerConfig,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LCM step at ``schedule.timesteps[step_index]``, as ``LCMScheduler.step`` (Primitive C).

    Returns ``(prev_sample, denoised)``: ``denoised`` is the consistency function's output
    f(x, t) = c_skip * x + c_out * x0; ``prev_sample`` re-noises it to the next timestep with
    fresh noise, or equals it on the final step. That noise is ``noise`` if given, else drawn
    from ``generator`` exactly as diffusers draws it; the final step draws nothing (and
    ignores ``noise``).
    """
    t = schedule.timesteps[step_index]
    prev_t = schedule.prev_timestep(step_index)
    # int64 0-d like diffusers' timesteps, so the scalings come out in float32.
    timestep = torch.tensor(t, dtype=torch.int64, device=alphas_cumprod.device)
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t]
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    c_skip, c_out = boundary_condition_scalings(timestep, config.timestep_scaling)

    x0 = predict_original_sample(model_output, sample, alpha_prod_t, config.prediction_type)
    if config.thresholding:
        x0 = threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    elif config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

    denoised = c_out * x0 + c_skip * sample
    if schedule.is_final(step_index):
        return denoised, denoised
    if noise is None:
        noise = randn_like_diffusers(model_output.shape, generator, dtype=denoised.dtype, device=model_output.device)
    prev_sample = alpha_prod_t_prev.sqrt() * denoised + beta_prod_t_prev.sqrt() * noise
    return prev_sample, denoised


# ---------------------------------------------------------------------------
# Primitive D: forward diffusion
# ---------------------------------------------------------------------------


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: int | Sequence[int] | torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Noise clean samples ``x0`` to timestep ``t`` (one for all, or one per sample):
    sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, with ``** 0.5`` and in ``x0``'s dtype like diffusers."""
    acd = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    t = torch.as_tensor(t, dtype=torch.int64, device=x0.device).reshape(-1)
    # [B] -> [B, 1, 1, ...] so each sample gets its own coefficient.
    coeff_shape = (-1,) + (1,) * (x0.ndim - 1)
    sqrt_alpha_prod = (acd[t] ** 0.5).reshape(coeff_shape)
    sqrt_one_minus_alpha_prod = ((1 - acd[t]) ** 0.5).reshape(coeff_shape)
    return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise
