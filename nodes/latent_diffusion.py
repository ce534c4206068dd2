"""Latent Diffusion (CompVis LDM) models, read from diffusers folders in the models folder's latent_diffusion/:
4x super-resolution as ``LDMSuperResolutionPipeline`` runs it, and text-to-image as ``LDMTextToImagePipeline``.

Super-resolution has a loop of its own (``upscale``): its UNet takes the low-resolution image as three extra input
channels beside the latents, which are at the image's own resolution, and the scheduler scales that concatenation.
The VQ autoencoder's decoder turns the latents into an image 4x larger (CompVis's model; a model's factor is its
autoencoder's). Text-to-image needs nothing of its own but the loader: the folder's UNet, LDMBert text encoder and
KL autoencoder travel as the usual MODEL, CLIP and VAE, and CLIPEncode, EmptyLatent, the general Sampler (ddim)
and VAEDecode then run ``LDMTextToImagePipeline``'s loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from nodegraph import Combo, Float, Folder, Int, Node, Output, Settings, Socket

from . import devices
from .images import resize_to_multiple
from .sampling import latent_preview
from .schedulers import SAMPLERS, SchedulerSteps, make_scheduler
from .values import CLIP, IMAGE, MODEL, VAE, Clip, Model, Vae, field_storages, param_bytes

SUPER_RESOLUTION, TEXT_TO_IMAGE = "LDMSuperResolutionPipeline", "LDMTextToImagePipeline"
#: The classes each component of an LDM folder may be (model_index.json names them); the UNet's depends on the
#: pipeline: the upscaler's reads the image, the text-to-image one attends to the prompt.
COMPONENT_CLASSES = {
    "unet": {SUPER_RESOLUTION: {"UNet2DModel"}, TEXT_TO_IMAGE: {"UNet2DConditionModel"}},
    "vqvae": {"VQModel", "AutoencoderKL"},
    "bert": {"LDMBertModel", "CLIPTextModel"},  # diffusers' own LDM test uses a CLIP text encoder
    "tokenizer": {"BertTokenizer", "BertTokenizerFast", "CLIPTokenizer", "CLIPTokenizerFast"},
}
#: The super-resolution pipeline rounds the image's sides down to multiples of this (its preprocess).
SIDE_MULTIPLE = 32
#: LDMTextToImagePipeline tokenises to 77 tokens whatever its tokenizer's model_max_length says.
PROMPT_TOKENS = 77


def pipeline_class(path: Path) -> str | None:
    """The pipeline a diffusers folder's model_index.json names, or None."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return index.get("_class_name") if isinstance(index, dict) else None


def _is_ldm_folder(path: Path) -> bool | None:
    return True if pipeline_class(path) in (SUPER_RESOLUTION, TEXT_TO_IMAGE) else None


LDM = Folder("latent_diffusion", what="latent diffusion models (diffusers folders)", suffixes=None,
             entry_dir=_is_ldm_folder, flag="--models")


class LDMModels:
    """The latent_diffusion folder's models of one pipeline (the choices of a loader's combo): the upscaler's
    loader lists only super-resolution folders, the text-to-image loader only text-to-image ones."""

    folder = LDM

    def __init__(self, pipeline: str):
        self.pipeline = pipeline

    def names(self, settings: Settings) -> list[str]:
        return [name for name in LDM.names(settings) if pipeline_class(LDM.path(settings, name)) == self.pipeline]

    def identity(self, settings: Settings, name: str):
        return LDM.identity(settings, name)

    def hint(self, settings: Settings) -> str:
        return f"{LDM.hint(settings)}; this loader takes {self.pipeline} folders"


# --- loading ------------------------------------------------------------------------------------------------


def _load_folder(settings: Settings, name: str, pipeline: str) -> tuple[Path, dict[str, Any], dict]:
    """(the folder, its components loaded on the run's device and dtype, its scheduler configuration)."""
    from .checkpoint import standalone_options
    from .loading import CheckpointError, first_line
    from .loading.assemble import _pretrained
    from .loading.configs import read_json

    folder = LDM.locate(settings, name)
    index = read_json(folder / "model_index.json")
    if index.get("_class_name") != pipeline:
        raise CheckpointError(f"{folder}: a {index.get('_class_name')} folder, not a {pipeline} one")
    device = devices.device(settings)
    wanted = ("unet", "vqvae") + (("bert", "tokenizer") if pipeline == TEXT_TO_IMAGE else ())
    loaded: dict[str, Any] = {}
    for component in wanted:
        entry = index.get(component)
        class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        accepted = COMPONENT_CLASSES[component]
        accepted = accepted[pipeline] if isinstance(accepted, dict) else accepted
        if class_name not in accepted:
            raise CheckpointError(f"{folder}: model_index.json's {component} is {class_name!r}; expected one of "
                                  f"{', '.join(sorted(accepted))}")
        where = folder / component
        if component == "tokenizer":
            try:
                loaded[component] = _class(class_name).from_pretrained(where, local_files_only=True,
                                                                       model_max_length=PROMPT_TOKENS)
            except Exception as e:  # noqa: BLE001 - every library error becomes one clear message
                raise CheckpointError(f"{where}: cannot load the {class_name}: {first_line(e)}") from e
            continue
        # streamed, or mapped where guarded, as checkpoints load
        stem = "model" if component == "bert" else "diffusion_pytorch_model"
        opts = standalone_options(settings, sorted(where.glob(f"{stem}*.safetensors")))
        module = _pretrained(_class(class_name), folder, component, opts)  # errors name the folder
        part = "unet" if component == "unet" else "vae"
        if devices.channels_last(settings, device, part) and component != "bert":
            from . import attention, fastpaths

            if part == "unet":
                module = fastpaths.channels_last_packed(module)
            else:
                attention.use_banded(module.to(memory_format=torch.channels_last))
        loaded[component] = module
    return folder, loaded, read_json(folder / "scheduler" / "scheduler_config.json")


def _class(name: str) -> type:
    if name == "LDMBertModel":
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

        return LDMBertModel
    import diffusers
    import transformers

    return getattr(diffusers, name, None) or getattr(transformers, name)


# --- super-resolution ---------------------------------------------------------------------------------------

LDM_UPSCALER = "LDM_UPSCALER"


@dataclass(frozen=True, eq=False)
class Upscaler:
    """A latent diffusion super-resolution model: the UNet conditioned on the low-resolution image, the VQ
    autoencoder whose decoder upscales, and the scheduler configuration it was trained with."""

    unet: torch.nn.Module
    vqvae: torch.nn.Module
    scheduler_config: Mapping[str, Any]
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler_config", MappingProxyType(dict(self.scheduler_config)))

    @property
    def factor(self) -> int:
        """How many times larger the output is: the autoencoder's downscale factor."""
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    __nodegraph_model__ = True
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return param_bytes(self.unet) + param_bytes(self.vqvae)


class LoadLDMUpscaler(Node):
    """Load a latent diffusion super-resolution model, such as CompVis's ldm-super-resolution-4x-openimages: its
    diffusers folder (model_index.json, unet/, vqvae/, scheduler/) goes in the models folder's latent_diffusion/.
    Feed it to LDMUpscale."""

    category = "loaders"
    model = Combo(options=LDMModels(SUPER_RESOLUTION))
    outputs = (Output("upscaler", LDM_UPSCALER),)

    def run(self, ctx, model):
        _, c, scheduler_config = _load_folder(ctx.settings, model, SUPER_RESOLUTION)
        return Upscaler(c["unet"], c["vqvae"], scheduler_config, model)


def upscale(model: Upscaler, image: torch.Tensor, *, seed: int, steps: int, eta: float, sampler: str = "ddim",
            on_step=None) -> torch.Tensor:
    """``LDMSuperResolutionPipeline.__call__``: IMAGE [B, H, W, 3] -> IMAGE [B, f*H', f*W', 3], H' and W' the
    sides rounded down to multiples of 32. Every random draw comes from a CPU generator seeded with ``seed``."""
    scheduler = make_scheduler(model.scheduler_config, sampler)
    param = next(model.unet.parameters())
    device, dtype = param.device, param.dtype
    generator = devices.cpu_generator(seed)
    # the pipeline's preprocess: sides down to multiples of 32 (Lanczos), [0, 1] -> [-1, 1], channels first
    low = 2.0 * resize_to_multiple(image, SIDE_MULTIPLE).permute(0, 3, 1, 2) - 1.0
    batch, _, height, width = low.shape
    # latents at the low-resolution image's size: the UNet's input channels are half latents, half image
    shape = (batch, model.unet.config.in_channels // 2, height, width)
    from .lcm_math import randn_like_diffusers

    latents = randn_like_diffusers(shape, generator, dtype=dtype, device=device)  # DRAW 1, before anything else
    low = low.to(device, dtype)
    # the eta and generator the step accepts: the pipeline passes no generator, so its DDIM eta > 0 draws from
    # torch's global generator; here they come from the seeded one, right after the latents
    walk = SchedulerSteps(scheduler, "text", steps, 1.0, generator, device, eta)
    latents = latents * walk.init_noise_sigma
    total = len(walk.timesteps)
    with torch.inference_mode():
        for i, t in enumerate(walk.timesteps):
            # the scheduler scales latents and image together (it matters for the sigma-based samplers)
            x = walk.scale(torch.cat([latents, low], dim=1), t)
            eps = model.unet(x, walk.unet_timestep(t), return_dict=False)[0]
            latents, denoised = walk.step(i, eps, t, latents)
            if on_step is not None:
                on_step(i, total, denoised)
        decoded = model.vqvae.decode(latents).sample  # the VQ decoder quantizes first, as in the pipeline
    decoded = torch.clamp(decoded, -1.0, 1.0) / 2 + 0.5
    return decoded.permute(0, 2, 3, 1).float().cpu()


class LDMUpscale(Node):
    """Upscale images 4x with a latent diffusion super-resolution model (LoadLDMUpscaler): the model redraws the
    image at 4 times its size, guided by the low-resolution one (a model's factor is its autoencoder's: 4 for
    CompVis's). Sides are first rounded down to multiples of 32. The same seed gives the image diffusers'
    LDMSuperResolutionPipeline gives.

    steps: 100 as the pipeline (fewer is faster and softer); sampler: ddim is the model's own (eta: 0 =
    deterministic, up to 1 adds fresh noise each step), the others are the general Sampler's. Memory: the UNet
    runs on latents as large as the input (Stable Diffusion's are 8 times smaller per side) and on the whole batch
    at once, its attention layers' memory growing with the square of the pixel count: upscale large images in
    pieces (there is no tiling)."""

    category = "image"
    upscaler = Socket(LDM_UPSCALER)
    image = Socket(IMAGE)
    seed = Int(default=0, min=0, max=2**64 - 1)
    steps = Int(default=100, min=1, max=1000)
    eta = Float(default=0.0, min=0.0, max=1.0, step=0.01)
    sampler = Combo(options=list(SAMPLERS), default="ddim")
    outputs = (Output("image", IMAGE),)

    def run(self, ctx, upscaler, image, seed, steps, eta, sampler):
        previews = ctx.settings.previews

        def on_step(i: int, total: int, denoised: torch.Tensor) -> None:
            ctx.progress(i + 1, total, latent_preview(denoised) if previews else None)

        return upscale(upscaler, image, seed=seed, steps=steps, eta=eta, sampler=sampler, on_step=on_step)


# --- text-to-image ------------------------------------------------------------------------------------------


class LoadLatentDiffusion(Node):
    """Load a latent diffusion text-to-image model, such as CompVis's ldm-text2im-large-256: its diffusers folder
    (model_index.json, bert/, tokenizer/, unet/, vqvae/, scheduler/) goes in the models folder's latent_diffusion/.
    The outputs work like LoadCheckpoint's: encode prompts with CLIPEncode (the LDMBert text encoder), start from
    EmptyLatent (with this VAE), sample with the Sampler (ddim, as the model's pipeline; guidance 6 to 10) and
    decode with VAEDecode. LoRAs and textual inversion do not apply to these models."""

    category = "loaders"
    model = Combo(options=LDMModels(TEXT_TO_IMAGE))
    outputs = (Output("model", MODEL), Output("clip", CLIP), Output("vae", VAE))

    def run(self, ctx, model):
        _, c, scheduler_config = _load_folder(ctx.settings, model, TEXT_TO_IMAGE)
        vae = Vae(c["vqvae"], model)
        return (Model(c["unet"], scheduler_config, "ldm", model, latent_scale=vae.scale_factor),
                Clip(c["tokenizer"], c["bert"], "ldm", model),
                vae)


NODES = [LoadLDMUpscaler, LDMUpscale, LoadLatentDiffusion]
