"""LoadCheckpoint: a checkpoint from the models folder (or a hub id) as MODEL, CLIP and VAE handles.

The format is detected from the content (:mod:`nodes.loading`); the device and dtype are chosen at run time. The
result is cached by the file's identity like any node result, so the same file loaded by two nodes, or in two runs,
is read once, and replacing the file loads it afresh.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nodegraph import Combo, Folder, Node, Output, Settings, file_identity, filemaps

from . import devices, previews
from .loading import CHECKPOINT_SUFFIXES, is_checkpoint_folder, load_components, looks_like_hub_id
from .values import CLIP, MODEL, VAE, Clip, Model, Vae

log = logging.getLogger(__name__)

NO_BASE = "none"
DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
# The embedded demo model: the LCM-distilled UNet, and its diffusion teacher (a plain UNet, for LCM-LoRA-style use).
EMBEDDED = {"demo-lcm": (DEMO_DIR, None), "demo-teacher": (DEMO_DIR / "teacher_unet", DEMO_DIR)}


CHECKPOINTS = Folder("checkpoints", what="checkpoints", suffixes=CHECKPOINT_SUFFIXES,
                     entry_dir=is_checkpoint_folder, flag="--models")


class Checkpoints:
    """The checkpoints a LoadCheckpoint offers: the embedded demo models, then the checkpoints folder's (the
    ``Choices`` of its combo). ``with_none`` adds "none" first, for an optional base."""

    folder = CHECKPOINTS

    def __init__(self, with_none: bool = False):
        self.with_none = with_none

    def names(self, settings: Settings) -> list[str]:
        embedded = [name for name, (path, _) in EMBEDDED.items() if path.is_dir()]
        return [NO_BASE] * self.with_none + embedded + CHECKPOINTS.names(settings)

    def identity(self, settings: Settings, name: str):
        if name == NO_BASE:
            return name
        path, base = locate(settings, name)
        return name if isinstance(path, str) else (file_identity(path), base and file_identity(base))

    def hint(self, settings: Settings) -> str:
        return CHECKPOINTS.hint(settings)


def is_hub_id(name: str, settings: Settings) -> bool:
    """Whether ``name`` is a hub repository id rather than an embedded model or an entry of the checkpoints folder."""
    return looks_like_hub_id(name) and name not in EMBEDDED and not (CHECKPOINTS.root(settings) / name).exists()


def locate(settings: Settings, name: str) -> tuple[Path | str, Path | None]:
    """Where checkpoint ``name`` is, and the base it needs (embedded models know theirs)."""
    if name in EMBEDDED:
        return EMBEDDED[name]
    if is_hub_id(name, settings):
        return name, None
    return CHECKPOINTS.path(settings, name), None


def load(settings: Settings, name: str, base: str = NO_BASE):
    """The components of checkpoint ``name`` (embedded, in the checkpoints folder, or a hub id), with the UNet-only
    folders loaded over ``base``."""
    started = time.perf_counter()
    path, own_base = locate(settings, name)
    if base != NO_BASE:
        own_base = locate(settings, base)[0]
    device = devices.device(settings)
    dtype = devices.dtype(settings, device)
    channels_last = {part for part in ("unet", "vae") if devices.channels_last(settings, device, part)}
    mapped = base == NO_BASE and maps_weights(settings, device, dtype, stored_dtype(path),
                                             lambda: weight_files(path))
    from . import fastpaths  # imports diffusers: not at start-up

    # blocked weights once instead of a reorder per call (--compile packs its own), packed from the layout the file
    # stores (a mapped file's pages then leave the process)
    packed = "unet" in channels_last and not settings.compile and fastpaths.packing_works(dtype)
    components = load_components(path, device=device, dtype=dtype, base=own_base,
                                 allow_pickle=settings.allow_pickle, checkpoints_dir=CHECKPOINTS.root(settings),
                                 channels_last=channels_last, clone_weights=not mapped,
                                 guarded_only=settings.map_weights is None,
                                 packed=("unet",) if packed else ())
    import torch

    if (components.family in ("sdxl", "ssd1b") and components.vae.dtype == torch.float16
            and getattr(components.vae.config, "force_upcast", False)):
        # SDXL's VAE overflows in float16 (black or NaN images); its pipelines upcast it to decode, so it stays in
        # float32 here (VAEs that are fine in float16, such as sdxl-vae-fp16-fix, say force_upcast: false)
        components.vae.to(torch.float32)
    for part, module in (("unet", components.unet), ("vae", components.vae)):
        # the phase form of upsampling for the VAE only: in the UNet it saves 1% of a step for 118 MB more weights
        fastpaths.apply(module, upsample=part == "vae" and part in channels_last, attention=part in channels_last)
        if part == "unet" and packed:
            # a copied load packs now, from kernels it read straight from the file's map (no copy in between, and
            # the file is no longer mapped once loaded); a mapped one at the first call
            fastpaths.pack(module, now=not mapped)
        if part in channels_last:  # a no-op for kernels streamed in that layout already
            fastpaths.to_channels_last(module)
    how = ("copied" if not mapped else "mapped" if settings.map_weights else
           "mapped, guarded against being rewritten in place")
    log.info("%s loaded in %.1f s (%s, %s, weights %s)", name, time.perf_counter() - started, device,
             str(dtype).removeprefix("torch."), how)
    return components


def maps_weights(settings: Settings, device, dtype, stored, files) -> bool:
    """Whether a load keeps its weights in maps of their files (``load_components(clone_weights=False)``): on the
    CPU, when the main file stores ``dtype`` (a cast copies every tensor anyway, and the map's pages would count
    beside the copies), and where a lease guards every file of ``files()`` against being rewritten in place
    (nodegraph.filemaps), or everywhere if asked (--map-weights); never with --no-map-weights."""
    return (settings.map_weights is not False and device.type == "cpu" and stored == dtype
            and (settings.map_weights or all(filemaps.guard(f) is not None for f in files())))


def standalone_options(settings: Settings, files: list[Path], channels_last: frozenset[str] = frozenset(),
                       packed: frozenset[str] = frozenset()):
    """How to load a model of its own (a ControlNet, an image encoder) from ``files`` (its safetensors), as
    checkpoints load: on the run's device in its dtype, streamed, or mapped where :func:`maps_weights` says so
    (then ``not options.clone``)."""
    from .loading.assemble import _Options

    device = devices.device(settings)
    dtype = devices.dtype(settings, device)
    mapped = maps_weights(settings, device, dtype, _stored_dtype(files), lambda: files)
    return _Options(device, dtype, settings.allow_pickle, clone=not mapped, channels_last=channels_last,
                    packed=packed, guarded_only=settings.map_weights is None)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files a local checkpoint's load reads (a single file, or a diffusers folder's components)."""
    if path.is_file():
        return [path]
    return [f for part in ("unet", "vae", "text_encoder", "text_encoder_2") for f in sorted((path / part).glob(
        "*.safetensors"))]


def stored_dtype(path):
    """The dtype a checkpoint's safetensors store (a single file, or a diffusers folder's UNet); None otherwise.
    --map-weights maps only what is used as stored: a cast copies every tensor anyway, and the map's pages would
    count beside the copies."""
    if not isinstance(path, Path):  # a hub id
        return None
    return _stored_dtype([path] if path.is_file() else
                         sorted((path / "unet").glob("diffusion_pytorch_model*.safetensors")))


def _stored_dtype(files: list[Path]):
    """The dtype the one safetensors file of ``files`` stores; None for several files, a pickle or none."""
    from .loading import StreamedSafetensors, is_safetensors

    if len(files) != 1 or not is_safetensors(files[0]):
        return None
    return StreamedSafetensors(files[0]).file_dtype()


class LoadCheckpoint(Node):
    """Load a Stable Diffusion or LCM checkpoint: a diffusers folder, a single .safetensors file (SD1.x, SD2.x,
    SDXL, SSD-1B), or a hub id such as "SimianLuo/LCM_Dreamshaper_v7" when the hub is reachable. Files go in the
    models folder's checkpoints/ subfolder. "demo-lcm" is the embedded demo model (it draws coloured shapes).
    A UNet-only folder (such as the unet/ of an LCM-distilled model) needs a base: the checkpoint that gives the
    text encoder and the VAE. .ckpt pickles are refused unless nodegraph runs with --allow-pickle."""

    category = "loaders"
    ckpt = Combo(options=Checkpoints(), accepts_other=is_hub_id, default="demo-lcm",
                 other_hint="a hub repository id (owner/name)")
    base = Combo(options=Checkpoints(with_none=True), default=NO_BASE)
    outputs = (Output("model", MODEL), Output("clip", CLIP), Output("vae", VAE))

    def run(self, ctx, ckpt, base):
        c = load(ctx.settings, ckpt, base)
        vae = Vae(c.vae, ckpt)
        model = Model(c.unet, c.scheduler_config, c.family, ckpt, latent_scale=vae.scale_factor)
        previews.attach(model, vae)  # sampler previews in this VAE's colours (nodes/previews.py)
        return (model,
                Clip(c.tokenizer, c.text_encoder, c.family, ckpt, tokenizer_2=c.tokenizer_2,
                     text_encoder_2=c.text_encoder_2),
                vae)


NODES = [LoadCheckpoint]
