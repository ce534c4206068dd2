"""Spatial control: ControlNet and T2I-Adapter, and the Canny edge preprocessor.

LoadControlNet / LoadT2IAdapter read models from the models folder's ``controlnet/`` subfolder (ComfyUI keeps both
kinds there). ControlNetApply / T2IAdapterApply return a new CONDITIONING with the control appended to its
``extras`` (several chain); nothing runs until the sampler, which knows the latent's size and the schedule.

In the sampler (:func:`prepare_controls`, called once per sampling run) the controls follow diffusers'
``StableDiffusionControlNetPipeline`` / ``MultiControlNetModel`` and ``StableDiffusionAdapterPipeline`` exactly:

* control image: IMAGE [B, H, W, 3] in [0, 1] -> NCHW float. When its size differs from the latent's pixel size
  (latent size x the control model's downscale factor), it is resized to that size with PIL's Lanczos filter,
  as diffusers' control image preprocessing (``VaeImageProcessor.preprocess(image, height, width)``, and the
  adapter pipeline's ``_preprocess_adapter_image``) resizes PIL images, going through 8-bit pixels as diffusers'
  PIL input does. One image serves every latent of the batch (repeated); otherwise give one image per latent.
  With classifier-free guidance the image (or the adapter's features) is repeated for the unconditional half.
* ControlNet: at step i of n, each control whose window holds the step (diffusers' ``controlnet_keep``: kept
  unless i/n < start or (i+1)/n > end) runs on the UNet's input (both CFG halves, guess mode off) with the
  prompt embeddings and ``conditioning_scale = strength``; the residuals of all controls are summed in order and
  passed as ``down_block_additional_residuals`` / ``mid_block_additional_residual``. A control outside its window
  adds zeros in diffusers; here it is skipped, which gives the same numbers. The ControlNet is called without the
  LCM guidance embedding, as diffusers calls it. A ControlNet with pooled conditions (``global_pool_conditions``,
  e.g. shuffle) runs in diffusers' guess mode: on the conditional half of CFG only.
* T2I-Adapter: the adapter runs once on the control image; its features times strength (summed over chained
  adapters, as ``MultiAdapter`` does) are passed as ``down_intrablock_additional_residuals`` at every step.

The controls of the positive conditioning apply to the whole batch, both halves of classifier-free guidance
included, as in diffusers; controls attached to a negative conditioning are not used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from nodegraph import Combo, Float, Folder, Int, Node, Output, Settings, Socket

from . import devices
from .images import pil_to_tensor, tensor_to_pils
from .loading import (
    CheckpointError,
    config_class,
    head_count,
    indices,
    norm_groups,
    unet_layout,
)
from .values import CONDITIONING, IMAGE, field_storages, param_bytes

CONTROL_NET, T2I_ADAPTER = "CONTROL_NET", "T2I_ADAPTER"
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "controlnet-sd1"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_ORIGINAL_PREFIX = "control_model."
# Text feature widths of the known families, for error messages.
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def _family(width: Any) -> str:
    return f"{_FAMILIES[width]}, {width}" if width in _FAMILIES else str(width)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ControlNet:
    """A loaded ControlNetModel (shared weights) and its name."""

    net: torch.nn.Module
    name: str

    @property
    def cross_attention_dim(self) -> int:
        return int(self.net.config.cross_attention_dim)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell the hint encoder assumes (one stride-2 convolution per level after the first)."""
        return 2 ** (len(self.net.config.conditioning_embedding_out_channels) - 1)

    __nodegraph_model__ = True
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return param_bytes(self.net)


@dataclass(frozen=True, eq=False)
class Adapter:
    """A loaded T2IAdapter (shared weights) and its name."""

    adapter: torch.nn.Module
    name: str

    @property
    def downscale(self) -> int:
        return int(self.adapter.config.downscale_factor)

    __nodegraph_model__ = True
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return param_bytes(self.adapter)


@dataclass(frozen=True, eq=False)
class ControlNetControl:
    """One ControlNetApply, carried in ``Conditioning.extras``."""

    control: ControlNet
    image: torch.Tensor  # IMAGE [B, H, W, 3]
    strength: float
    start: float
    end: float


@dataclass(frozen=True, eq=False)
class AdapterControl:
    """One T2IAdapterApply, carried in ``Conditioning.extras``."""

    adapter: Adapter
    image: torch.Tensor
    strength: float


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _class_is(wanted: str):
    """``Folder.entry_dir`` for diffusers folders of class ``wanted``: other models' folders are skipped, folders
    without a config are searched (folders of models)."""
    def kind(path: Path) -> bool | None:
        found = config_class(path)
        return None if found is None else found == wanted
    return kind


# ControlNets and T2I-Adapters share the controlnet/ folder, as in ComfyUI: one declaration each.
CONTROLNETS = Folder("controlnet", what="ControlNets (diffusers folders or single weight files)",
                     suffixes=WEIGHT_SUFFIXES, entry_dir=_class_is("ControlNetModel"), flag="--models")
T2I_ADAPTERS = Folder("t2i_adapter", subdir="controlnet", what="T2I-Adapter folders", suffixes=None,
                      entry_dir=_class_is("T2IAdapter"), flag="--models")


def load_controlnet(path: Path, settings: Settings) -> torch.nn.Module:
    """A ControlNetModel from a diffusers folder or a single original-layout file, loaded as a
    checkpoint's UNet is (nodes/checkpoint.py): streamed tensor by tensor into the run's dtype and layout, or kept
    in guarded maps of the file where used as stored; on the CPU in the UNet's fast layout, which pays the same
    beside it (it runs at every step)."""
    from . import fastpaths
    from .checkpoint import standalone_options
    from .loading.assemble import _pretrained
    from .loading.weights import file_kind

    device = devices.device(settings)
    fast = devices.channels_last(settings, device, "unet")
    packed = fast and not settings.compile and fastpaths.packing_works(devices.dtype(settings, device))
    if path.is_dir():
        kind = config_class(path)
        if kind != "ControlNetModel":
            raise CheckpointError(f"{path}: not a ControlNet folder (its config.json names {kind!r}, expected "
                                  f"'ControlNetModel')")
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    else:
        files = [path] if file_kind(path) == "safetensors" else []
    opts = standalone_options(settings, files, channels_last=frozenset({"controlnet"} if fast else ()),
                              packed=frozenset({"controlnet"} if packed else ()))
    model = (_pretrained("ControlNetModel", path, None, opts, part="controlnet") if path.is_dir()
             else _controlnet_from_file(path, opts))
    if fast:
        fastpaths.pack(model, now=opts.clone)  # a mapped kernel at its first call (its map goes then)
        fastpaths.to_channels_last(model)
        fastpaths.use_banded(model)
        fastpaths.trim_stages(model)
    return model


def _controlnet_from_file(path: Path, opts) -> torch.nn.Module:
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from .loading.weights import StreamedSafetensors, file_kind, read_header, read_pickle
    from .loading.assemble import _build

    if file_kind(path) == "safetensors":
        shapes = read_header(path)
        # each tensor read once, in the run's dtype and layout (or mapped), as it is converted
        tensors = opts.streamed(path, part="controlnet")
    else:
        tensors = read_pickle(path, opts.allow_pickle)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    prefixed = any(k.startswith(_ORIGINAL_PREFIX) for k in shapes)
    if prefixed:
        shapes = {k[len(_ORIGINAL_PREFIX):]: v for k, v in shapes.items() if k.startswith(_ORIGINAL_PREFIX)}
    config = derive_controlnet_config(shapes, str(path))  # refuses diffusers' layout (it needs its config.json)

    def convert(model: torch.nn.Module) -> dict:
        own = ({k[len(_ORIGINAL_PREFIX):]: tensors[k] for k in tensors if k.startswith(_ORIGINAL_PREFIX)}
               if prefixed else {k: tensors[k] for k in tensors})
        return {k: v for k, v in convert_controlnet_checkpoint(own, config).items() if v is not None}

    return _build("ControlNetModel", config, convert, "ControlNet", str(path), opts,
                  streamed=isinstance(tensors, StreamedSafetensors),
                  hint="If it has a non-standard architecture, use its diffusers folder.")


def derive_controlnet_config(shapes: Mapping[str, Sequence[int]], where: str = "the file") -> dict:
    """A ControlNetModel configuration for original-layout weights (keys without ``control_model.``).

    Starts from the shipped SD 1.5 configuration (``configs/controlnet-sd1``) and replaces every size the tensor
    shapes reveal: input and hint channels, widths and layers per level, which levels attend to text, the text
    width, transformer depth, linear or convolutional projections, the hint encoder's widths, SDXL's added
    embedding. What shapes cannot reveal (attention heads, norm groups) follows the SD conventions: 8 heads for
    768-wide text (SD 1.x), 64-wide heads otherwise, 32 norm groups (or the largest divisor of the widths below).
    A tiny test model with other values needs its diffusers folder.
    """
    if "time_embedding.linear_1.weight" in shapes:
        raise CheckpointError(f"{where}: a ControlNet in diffusers' layout: put it in a folder next to its "
                              f"config.json")
    if "input_hint_block.0.weight" not in shapes or "input_blocks.0.0.weight" not in shapes:
        raise CheckpointError(f"{where}: not a ControlNet (no input_hint_block / input_blocks weights)")
    base = json.loads((CONFIG_DIR / "config.json").read_text(encoding="utf-8"))
    try:
        layout = unet_layout(shapes, "", decoder=False)  # a ControlNet is a copy of the UNet's encoder half
        hint = indices(shapes, "input_hint_block.")
        hint_channels = [shapes["input_hint_block.0.weight"][0]]
        hint_channels += [shapes[f"input_hint_block.{i}.weight"][0] for i in hint[2:-1:2]]
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{where}: unrecognised ControlNet layout (missing {e})") from e
    if len(hint) != 8 or hint[-1] != 14:
        raise CheckpointError(f"{where}: a hint encoder of {len(hint)} layers; only the standard 8-layer one (4 "
                              f"levels) can be read from a single file: use the ControlNet's diffusers folder")
    channels = list(layout.channels)
    depths = [level[0] if level else 0 for level in layout.down]  # transformer blocks of each level's first layer
    blocks = [max(d, 1) for d in depths]  # diffusers wants a depth even where a level does not attend
    config = dict(base)
    config.update(
        in_channels=layout.in_channels,
        conditioning_channels=shapes["input_hint_block.0.weight"][1],
        conditioning_embedding_out_channels=hint_channels,
        block_out_channels=channels,
        layers_per_block=layout.layers,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        transformer_layers_per_block=blocks[0] if len(set(blocks)) == 1 else blocks,
        mid_block_type="UNetMidBlock2DCrossAttn" if layout.mid is not None else "UNetMidBlock2D",
        use_linear_projection=layout.linear_projection,
    )
    if layout.cross_attention_dim is not None:
        config["cross_attention_dim"] = layout.cross_attention_dim
    if layout.cross_attention_dim != 768:
        config["attention_head_dim"] = [head_count(c, 64) for c in channels]
    if channels != base["block_out_channels"]:
        config["norm_num_groups"] = norm_groups(base["norm_num_groups"], channels)
    if layout.addition_in is not None:  # SDXL: pooled text and size conditioning
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=layout.addition_in)
    return config


class LoadControlNet(Node):
    """Load a ControlNet from the models folder's controlnet/ subfolder: a diffusers folder (config.json and
    weights) or a single weights file in the original layout (lllyasviel's key names, with or without the
    "control_model." prefix; its configuration is read from the tensor shapes). .pth/.ckpt pickles are refused
    unless nodegraph runs with --allow-pickle."""

    category = "loaders"
    control_net = Combo(options=CONTROLNETS)
    outputs = (Output("control_net", CONTROL_NET),)

    def run(self, ctx, control_net):
        return ControlNet(load_controlnet(CONTROLNETS.locate(ctx.settings, control_net), ctx.settings), control_net)


class LoadT2IAdapter(Node):
    """Load a T2I-Adapter (a diffusers folder with a T2IAdapter config.json) from the models folder's
    controlnet/ subfolder."""

    category = "loaders"
    adapter = Combo(options=T2I_ADAPTERS)
    outputs = (Output("adapter", T2I_ADAPTER),)

    def run(self, ctx, adapter):
        from .checkpoint import standalone_options
        from .loading.assemble import _pretrained

        path = T2I_ADAPTERS.locate(ctx.settings, adapter)
        if not path.is_dir() or config_class(path) != "T2IAdapter":
            raise CheckpointError(f"{path}: not a T2I-Adapter folder (config.json of a T2IAdapter + weights)")
        opts = standalone_options(ctx.settings, sorted(path.glob("diffusion_pytorch_model*.safetensors")))
        return Adapter(_pretrained("T2IAdapter", path, None, opts), adapter)  # errors name the folder


# --------------------------------------------------------------------------------------------
# Apply
# --------------------------------------------------------------------------------------------


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"the control image must be an IMAGE [batch, height, width, 3], got {tuple(image.shape)}")


class ControlNetApply(Node):
    """Attach a ControlNet to a conditioning: the sampler then steers the image with the control image (an edge
    map, a depth map, a pose...), as diffusers' ControlNet pipeline does.

    strength scales what the ControlNet adds (0 = no effect). start_percent and end_percent limit it to part of
    the steps (0 and 1: all of them). Chain several to combine ControlNets; their effects add up. The control
    image is resized (Lanczos) to the latent's size in pixels when it differs; one image serves every image of
    the batch."""

    category = "conditioning"
    conditioning = Socket(CONDITIONING)
    control_net = Socket(CONTROL_NET)
    image = Socket(IMAGE)
    strength = Float(default=1.0, min=0.0, max=2.0, step=0.01)
    start_percent = Float(default=0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(default=1.0, min=0.0, max=1.0, step=0.001)
    outputs = (Output("conditioning", CONDITIONING),)

    def run(self, ctx, conditioning, control_net, image, strength, start_percent, end_percent):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
        _check_image(image)
        width = conditioning.embeds.shape[-1]
        if control_net.cross_attention_dim != width:
            raise ValueError(
                f"the ControlNet {control_net.name!r} is made for models whose text features are "
                f"{_family(control_net.cross_attention_dim)} wide, but this conditioning's are {_family(width)} "
                f"wide: use a ControlNet of the checkpoint's family")
        control = ControlNetControl(control_net, image, float(strength), float(start_percent), float(end_percent))
        return replace(conditioning, extras=(*conditioning.extras, control))


class T2IAdapterApply(Node):
    """Attach a T2I-Adapter to a conditioning: a light alternative to ControlNet that steers the image with a
    control image (computed once, not at every step), as diffusers' T2I-Adapter pipeline does. strength scales
    its features; chain several to combine them. The image is resized (Lanczos) to the latent's size in pixels."""

    category = "conditioning"
    conditioning = Socket(CONDITIONING)
    adapter = Socket(T2I_ADAPTER)
    image = Socket(IMAGE)
    strength = Float(default=1.0, min=0.0, max=2.0, step=0.01)
    outputs = (Output("conditioning", CONDITIONING),)

    def run(self, ctx, conditioning, adapter, image, strength):
        _check_image(image)
        return replace(conditioning, extras=(*conditioning.extras, AdapterControl(adapter, image, float(strength))))


# --------------------------------------------------------------------------------------------
# Preprocessor
# --------------------------------------------------------------------------------------------


class Canny(Node):
    """Canny edge map of an image (white edges on black), the control image of canny ControlNets and adapters.

    Gradients weaker than low_threshold are never edges, stronger than high_threshold always are, and those in
    between only where they continue a strong edge (OpenCV's Canny on the 8-bit RGB image)."""

    category = "image"
    image = Socket(IMAGE)
    low_threshold = Int(default=100, min=0, max=255)
    high_threshold = Int(default=200, min=0, max=255)
    outputs = (Output("image", IMAGE),)

    def run(self, ctx, image, low_threshold, high_threshold):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) is above high_threshold ({high_threshold})")
        return canny(image, low_threshold, high_threshold)


def canny(image: torch.Tensor, low: int, high: int) -> torch.Tensor:
    try:
        import cv2
    except ImportError:
        raise RuntimeError("the Canny node needs OpenCV: pip install opencv-python-headless") from None
    edges = []
    for pil in tensor_to_pils(image):
        e = cv2.Canny(np.array(pil), low, high)
        edges.append(np.repeat(e[..., None], 3, axis=-1).astype(np.float32) / 255.0)
    return torch.from_numpy(np.stack(edges))


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _control_image(image: torch.Tensor, size: tuple[int, int], batch: int, cfg: bool, device, dtype,
                   grey: bool = False) -> torch.Tensor:
    """IMAGE -> [batch (x2 with CFG), C, h, w] at ``size`` (height, width), as diffusers prepares control images."""
    height, width = size
    if image.shape[0] not in (1, batch):
        raise ValueError(f"{image.shape[0]} control images for a batch of {batch}: give one, or one per image")
    if tuple(image.shape[1:3]) != (height, width):  # resized as diffusers resizes PIL control images
        image = torch.cat([pil_to_tensor(p.resize((width, height), Image.LANCZOS)) for p in tensor_to_pils(image)])
    if grey:  # a one-channel adapter reads the grey level, as of a PIL "L" image
        image = torch.cat([torch.from_numpy(np.array(p.convert("L")).astype(np.float32) / 255.0)[None, ..., None]
                           for p in tensor_to_pils(image)])
    x = image.permute(0, 3, 1, 2)
    if x.shape[0] == 1 and batch > 1:
        x = x.repeat_interleave(batch, dim=0)
    x = x.to(device=device, dtype=dtype)
    return torch.cat([x] * 2) if cfg else x


def _check_fits(unet, control: ControlNet | Adapter) -> None:
    cfg = unet.config
    if isinstance(control, ControlNet):
        net = control.net.config
        if net.cross_attention_dim != cfg.cross_attention_dim:
            raise ValueError(
                f"the ControlNet {control.name!r} is made for models whose text features are "
                f"{_family(net.cross_attention_dim)} wide; this model's are {_family(cfg.cross_attention_dim)}: use "
                f"a ControlNet of the checkpoint's family")
        if net.addition_embed_type != getattr(cfg, "addition_embed_type", None):
            raise ValueError(f"the ControlNet {control.name!r} takes added conditioning {net.addition_embed_type!r} "
                             f"but this model's UNet takes {getattr(cfg, 'addition_embed_type', None)!r}: use a "
                             f"ControlNet of the checkpoint's family")
        if list(net.block_out_channels) != list(cfg.block_out_channels) or net.layers_per_block != cfg.layers_per_block:
            raise ValueError(f"the ControlNet {control.name!r} does not fit this model's UNet (widths "
                             f"{list(net.block_out_channels)} vs {list(cfg.block_out_channels)}): use a ControlNet "
                             f"made for the checkpoint's family")
    else:
        channels = list(control.adapter.config.channels)
        if channels != list(cfg.block_out_channels)[:len(channels)]:
            raise ValueError(f"the T2I-Adapter {control.name!r} gives features of widths {channels}, which do not "
                             f"fit this model's UNet (widths {list(cfg.block_out_channels)}): use an adapter made "
                             f"for the checkpoint's family")


class UNetControls:
    """The controls of one sampling run, prepared once; called before each UNet pass for its extra arguments."""

    def __init__(self, nets: list[tuple[ControlNetControl, torch.Tensor]], features: list[torch.Tensor] | None,
                 steps: int, cfg: bool):
        self.nets = nets
        self.features = features
        self.steps = steps
        self.cfg = cfg

    def __call__(self, step: int, model_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                 added: dict | None = None) -> dict:
        kwargs: dict[str, Any] = {}
        down = mid = None
        n = self.steps
        for c, image in self.nets:
            if step / n < c.start or (step + 1) / n > c.end:  # diffusers' controlnet_keep == 0: adds nothing
                continue
            guess = _guess_mode(c.control)
            conditional_only = guess and self.cfg  # guess mode: the ControlNet sees the conditional half only
            x, e = (model_input.chunk(2)[1], embeds.chunk(2)[1]) if conditional_only else (model_input, embeds)
            extra = {}
            if added is not None:  # SDXL: the pooled prompt and size conditioning, as the UNet gets them
                extra["added_cond_kwargs"] = ({k: v.chunk(2)[1] for k, v in added.items()} if conditional_only
                                              else added)
            d, m = c.control.net(x, t, encoder_hidden_states=e, controlnet_cond=image,
                                 conditioning_scale=c.strength, guess_mode=guess, return_dict=False, **extra)
            if conditional_only:  # and adds nothing to the unconditional half
                d = [torch.cat([torch.zeros_like(r), r]) for r in d]
                m = torch.cat([torch.zeros_like(m), m])
            if down is None:
                down, mid = d, m
            else:  # MultiControlNetModel's merge, in the same order
                down = [prev + cur for prev, cur in zip(down, d)]
                mid = mid + m
        if down is not None:
            kwargs["down_block_additional_residuals"] = down
            kwargs["mid_block_additional_residual"] = mid
        if self.features is not None:  # the UNet consumes the list: a fresh one, of fresh tensors, each step
            kwargs["down_intrablock_additional_residuals"] = [f.clone() for f in self.features]
        return kwargs


def _guess_mode(control: ControlNet) -> bool:
    """ControlNets with pooled conditions (such as shuffle) run in diffusers' guess mode."""
    return bool(getattr(control.net.config, "global_pool_conditions", False))


def prepare_controls(unet, extras: Sequence[Any], *, batch: int, cfg: bool, latent_size: tuple[int, int],
                     steps: int, device: torch.device) -> UNetControls | None:
    """The controls among a positive conditioning's ``extras``, ready for a run of ``steps`` UNet passes over
    latents of ``latent_size`` (None when there are none)."""
    nets = [e for e in extras if isinstance(e, ControlNetControl)]
    adapters = [e for e in extras if isinstance(e, AdapterControl)]
    if not nets and not adapters:
        return None
    h, w = latent_size
    prepared = []
    for c in nets:
        _check_fits(unet, c.control)
        if c.strength == 0:  # adds zeros at every step
            continue
        param = next(c.control.net.parameters())
        size = (h * c.control.downscale, w * c.control.downscale)
        doubled = cfg and not _guess_mode(c.control)
        prepared.append((c, _control_image(c.image, size, batch, doubled, device, param.dtype)))
    features = None
    with torch.inference_mode():
        for c in adapters:
            _check_fits(unet, c.adapter)
            model = c.adapter.adapter
            param = next(model.parameters())
            size = (h * c.adapter.downscale, w * c.adapter.downscale)
            image = _control_image(c.image, size, 1 if c.image.shape[0] == 1 else batch, False, device, param.dtype,
                                   grey=model.config.in_channels == 1)
            state = [f * c.strength for f in model(image)]
            if features is None:
                features = state
            else:  # MultiAdapter: the weighted sum of every adapter's features
                features = [a + b for a, b in zip(features, state)]
        if features is not None:
            if features[0].shape[0] == 1 and batch > 1:
                features = [f.repeat(batch, 1, 1, 1) for f in features]
            if cfg:
                features = [torch.cat([f] * 2, dim=0) for f in features]
    if not prepared and features is None:
        return None
    return UNetControls(prepared, features, steps, cfg)


NODES = [LoadControlNet, ControlNetApply, LoadT2IAdapter, T2IAdapterApply, Canny]
