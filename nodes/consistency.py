"""Consistency Models: openai's consistency-distilled (CD) and consistency-trained (CT) image models, which make an
image in one step, or a few, straight in pixel space (no text encoder, no VAE).

The graph of diffusers' ``ConsistencyModelPipeline``: LoadConsistencyModel reads a pipeline folder from the models
folder's ``consistency_models/`` (``unet/``: a ``UNet2DModel``, class-conditional on ImageNet's 1000 classes for
openai/diffusers-cd_imagenet64_l2, unconditional for the LSUN ones; ``scheduler/``: a
``CMStochasticIterativeScheduler``), and ConsistencySampler runs the paper's multistep sampling (Algorithm 1) with
that scheduler: from noise at sigma_max the model gives a clean image in one evaluation; each further timestep
re-noises it to a lower sigma and denoises again. The result is the pipeline's, pixel for pixel, for the same seed.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from nodegraph import Combo, Folder, Int, Node, Output, Settings, Socket, String

from . import devices
from .devices import cpu_generator
from .images import tensor_to_pils
from .lcm import parse_timesteps
from .lcm_math import randn_like_diffusers
from .values import IMAGE, field_storages, param_bytes

CONSISTENCY_MODEL = "CONSISTENCY_MODEL"
PIPELINE = "ConsistencyModelPipeline"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASS = "CMStochasticIterativeScheduler"


def _class_name(path: Path) -> str | None:
    """The ``_class_name`` of a diffusers JSON file (a config or a model_index); None without a readable one."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def is_consistency_folder(path: Path) -> bool | None:
    """True for one consistency model (a ConsistencyModelPipeline folder, or a UNet2DModel with a scheduler/ beside
    it); None for any other folder, which may hold some (``Folder.entry_dir``)."""
    if (path / "model_index.json").is_file():
        return True if _class_name(path / "model_index.json") == PIPELINE else None
    if _class_name(path / "unet" / "config.json") == UNET_CLASS and (path / "scheduler").is_dir():
        return True
    return None


CONSISTENCY = Folder("consistency_models", what="consistency models (diffusers folders)", suffixes=None,
                     entry_dir=is_consistency_folder, flag="--models")


def _unlisted_folder(name: str, settings: Settings) -> bool:
    # A folder of consistency_models/ that is not listed (a Stable Diffusion checkpoint put there, a half-copied
    # model) still reaches the loader, whose error then says what it is rather than "not one of the choices".
    try:
        return CONSISTENCY.path(settings, name).is_dir()
    except ValueError:  # a name that leaves the folder: the combo's own check refuses it
        return False


@dataclass(frozen=True, eq=False)
class ConsistencyModel:
    """A consistency model's UNet (a UNet2DModel, shared weights), the scheduler config it was distilled or trained
    with, and its number of classes (None: unconditional)."""

    unet: torch.nn.Module
    scheduler_config: Mapping[str, Any]
    num_classes: int | None
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler_config", MappingProxyType(dict(self.scheduler_config)))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    __nodegraph_model__ = True
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return param_bytes(self.unet)


def check_folder(path: Path) -> None:
    """Refuse, naming both families, a folder that is not a consistency model (a Stable Diffusion checkpoint above
    all, the likeliest mistake)."""
    from .loading import CheckpointError

    index = path / "model_index.json"
    pipeline = _class_name(index) if index.is_file() else None
    unet = _class_name(path / "unet" / "config.json")
    if unet == "UNet2DConditionModel" or (pipeline or "").startswith(("StableDiffusion", "LatentConsistency")):
        raise CheckpointError(
            f"{path}: a Stable Diffusion checkpoint ({pipeline or 'its unet is a UNet2DConditionModel'}), not a "
            f"Consistency Model. Load it with LoadCheckpoint from the checkpoints folder; LoadConsistencyModel reads "
            f"{PIPELINE} folders (a {UNET_CLASS} and a {SCHEDULER_CLASS}), such as openai/diffusers-cd_imagenet64_l2.")
    if index.is_file() and pipeline != PIPELINE:
        raise CheckpointError(f"{path}: a diffusers {pipeline or '(unreadable model_index.json)'} folder, not a "
                              f"{PIPELINE}")
    if unet != UNET_CLASS:
        raise CheckpointError(f"{path}: not a consistency model: it needs unet/config.json of a {UNET_CLASS}, "
                              f"found {unet or 'none'}")
    scheduler = _class_name(path / "scheduler" / "scheduler_config.json")
    if scheduler != SCHEDULER_CLASS:
        raise CheckpointError(f"{path}: scheduler/ must hold the {SCHEDULER_CLASS} config a consistency model samples "
                              f"with, found {scheduler or 'none'}")


def load(settings: Settings, name: str) -> ConsistencyModel:
    """Consistency model ``name`` of the consistency_models folder, on the run-time device and dtype."""
    from .checkpoint import standalone_options
    from .loading.assemble import _pretrained
    from .loading.configs import read_json

    path = CONSISTENCY.locate(settings, name)
    check_folder(path)
    # streamed, or mapped where guarded, as checkpoints load; errors name the folder (a .bin needs --allow-pickle)
    opts = standalone_options(settings, sorted((path / "unet").glob("diffusion_pytorch_model*.safetensors")))
    unet = _pretrained(UNET_CLASS, path, "unet", opts)
    device = devices.device(settings)
    if devices.channels_last(settings, device, "unet"):
        from . import fastpaths

        fastpaths.channels_last_packed(unet)
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    return ConsistencyModel(unet, scheduler_config, unet.config.num_class_embeds, name)


class LoadConsistencyModel(Node):
    """Load a Consistency Model: a diffusers ConsistencyModelPipeline folder (such as
    openai/diffusers-cd_imagenet64_l2, class-conditional on ImageNet, or openai/diffusers-cd_bedroom256_lpips,
    unconditional) from the models folder's consistency_models/. It makes images in one or a few steps with
    ConsistencySampler. Stable Diffusion checkpoints load with LoadCheckpoint instead."""

    category = "loaders"
    model = Combo(options=CONSISTENCY, accepts_other=_unlisted_folder, other_hint="a folder in consistency_models/")
    outputs = (Output("model", CONSISTENCY_MODEL),)

    def run(self, ctx, model):
        return load(ctx.settings, model)


def class_labels(model: ConsistencyModel, class_label: int, batch: int, seed: int) -> torch.Tensor | None:
    """The class of each image: ``class_label`` for all of them, or (-1) one drawn at random per image."""
    n = model.num_classes
    if n is None:
        if class_label >= 0:
            raise ValueError(f"{model.name!r} is unconditional: it takes no class label (set class_label to -1)")
        return None
    if class_label >= n:
        raise ValueError(f"class_label {class_label} is out of range: {model.name!r} has {n} classes (0 to {n - 1}; "
                         f"-1 draws one at random for each image)")
    if class_label >= 0:
        return torch.full((batch,), class_label, dtype=torch.int)  # the pipeline's int label, for every image
    # The pipeline draws them with torch.randint from torch's *global* generator (its own TODO says it should take
    # the generator). A node must be a function of its inputs, so they come from a generator of their own seeded
    # with the seed: the labels the pipeline draws after torch.manual_seed(seed). The noise stream is untouched.
    return torch.randint(0, n, size=(batch,), generator=cpu_generator(seed))


def pixel_preview(sample: torch.Tensor, size: int = 64):
    """The first image of a [-1, 1] pixel batch as a small PIL image."""
    image = tensor_to_pils((sample[:1].float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))[0]
    image.thumbnail((size, size))
    return image


class ConsistencySampler(Node):
    """Generate images with a Consistency Model, as diffusers' ConsistencyModelPipeline does.

    steps: 1 is one-step generation, what consistency models are made for; more steps re-noise and denoise again
    at evenly spaced timesteps. timesteps: an optional comma-separated descending list that replaces steps, such
    as "22, 0" (openai's two-step setting for the ImageNet 64 CD model) or "17, 0" (LSUN); each must be below the
    model's number of training timesteps (40). class_label: the ImageNet class of a class-conditional model
    (145 = king penguin), or -1 for a random class per image drawn from the seed; an unconditional model takes -1.
    The same seed gives the pipeline's image (on a GPU up to float rounding)."""

    category = "sampling"
    model = Socket(CONSISTENCY_MODEL)
    seed = Int(default=0, min=0, max=2**64 - 1)
    batch = Int(default=1, min=1, max=64)
    steps = Int(default=1, min=1, max=1000)
    timesteps = String(default="")
    class_label = Int(default=-1, min=-1)
    outputs = (Output("image", IMAGE),)

    def run(self, ctx, model: ConsistencyModel, seed, batch, steps, timesteps, class_label):
        from diffusers import CMStochasticIterativeScheduler

        scheduler = CMStochasticIterativeScheduler.from_config(dict(model.scheduler_config))
        train_steps = scheduler.config.num_train_timesteps
        custom = parse_timesteps(timesteps)
        if custom and (any(b >= a for a, b in itertools.pairwise(custom)) or custom[-1] < 0):
            raise ValueError(f"timesteps must be strictly descending and not negative, got {timesteps!r}")
        if custom and custom[0] >= train_steps:
            raise ValueError(f"timesteps must be below {train_steps}, the number of timesteps {model.name!r} was "
                             f"trained with; got {custom[0]}")
        if not custom and steps > train_steps:
            raise ValueError(f"{steps} steps: {model.name!r} was trained with {train_steps} timesteps, the most it "
                             f"can take")
        device, dtype = model.device, model.dtype
        labels = class_labels(model, class_label, batch, seed)
        labels = labels.to(device) if labels is not None else None

        # Algorithm 1: start from noise at sigma_max (init_noise_sigma); the generator then gives each step's noise.
        generator = cpu_generator(seed)
        unet = model.unet
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (batch, unet.config.in_channels, height, width)
        sample = randn_like_diffusers(shape, generator, dtype=dtype, device=device) * scheduler.init_noise_sigma
        if custom:
            scheduler.set_timesteps(timesteps=list(custom), device=device)
        else:
            scheduler.set_timesteps(steps)  # as the pipeline: the timesteps stay on the CPU
        total = len(scheduler.timesteps)
        channels_last = devices.prefers_channels_last(unet)
        previews = ctx.settings.previews
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                scaled = scheduler.scale_model_input(sample, t)
                if channels_last:
                    scaled = scaled.contiguous(memory_format=torch.channels_last)
                # the scheduler's timesteps are float64, which MPS lacks (diffusers casts them there only when
                # set_timesteps is given the device)
                model_t = t.to(torch.float32) if device.type == "mps" else t
                model_output = unet(scaled, model_t, class_labels=labels, return_dict=False)[0]
                sample = scheduler.step(model_output, t, sample, generator=generator, return_dict=False)[0]
                ctx.progress(i + 1, total, pixel_preview(sample) if previews else None)
        # The pipeline's postprocessing: [-1, 1] -> [0, 1]; then IMAGE's layout [B, H, W, 3], on the CPU
        image = (sample / 2 + 0.5).clamp(0, 1)
        return image.permute(0, 2, 3, 1).float().cpu().contiguous()


NODES = [LoadConsistencyModel, ConsistencySampler]
