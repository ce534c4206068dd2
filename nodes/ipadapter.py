"""IP-Adapter: a reference image as a prompt (Ye et al., 2023), as diffusers' ``load_ip_adapter`` and the LCM
pipelines' ``ip_adapter_image`` do it.

* **LoadIPAdapter** reads an adapter file from the models folder's ``ipadapter/`` subfolder (``image_proj.*`` and
  ``ip_adapter.<n>.to_k_ip/to_v_ip`` weights: the layout of h94's ``ip-adapter_sd15.safetensors``; ``.bin`` pickles
  only with ``--allow-pickle``) and its CLIP vision image encoder from ``clip_vision/`` (a transformers folder with
  config.json, or a single safetensors file of ``vision_model.*`` + ``visual_projection.weight`` whose
  configuration is read from the shapes).
* **IPAdapterApply** encodes the reference image(s) once (CLIP image preprocessing, the encoder's ``image_embeds``,
  the adapter's projection to image tokens) and returns the model with an :class:`IPAdapterPatch`.

While the model samples, the patch gives each cross-attention layer of the UNet a second attention over the image
tokens with the adapter's own key/value projections, added (times ``scale``) to the text attention before the
output projection, exactly as diffusers' ``IPAdapterAttnProcessor2_0``. Under classifier-free guidance the
unconditional half attends to the tokens of a zero image embedding, as diffusers' pipelines do. Several
IP-Adapters chain. Nothing of the cached UNet changes outside a sampling run.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from nodegraph import Combo, Float, Folder, Node, Output, Settings, Socket

from . import devices
from .images import tensor_to_pils
from .loading import CheckpointError, few, read_weights, ready
from .values import IMAGE, MODEL, UNET_BATCH, Model, field_storages, param_bytes

IP_ADAPTER = "IP_ADAPTER"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_IP_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
# CLIP ViT widths whose head count is not width / 64 (OpenCLIP ViT-H/14 and ViT-bigG/14: 16 heads).
_HEADS = {1280: 16, 1664: 16}
# OpenAI's CLIP (ViT-B, ViT-L) uses quick_gelu; the OpenCLIP encoders (ViT-H, ViT-bigG) used by IP-Adapters, gelu.
_QUICK_GELU_WIDTHS = {768, 1024}


class IPAdapterError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class IPAdapter:
    """A loaded IP-Adapter: its image projection, one key/value projection pair per UNet cross-attention layer
    (in diffusers' numbering order), and its CLIP vision encoder with the image preprocessing."""

    name: str
    projection: torch.nn.Module  # diffusers' ImageProjection: image_embeds [N, D] -> tokens [N, T, dim]
    to_k: tuple[torch.nn.Linear, ...]
    to_v: tuple[torch.nn.Linear, ...]
    encoder: torch.nn.Module  # CLIPVisionModelWithProjection
    processor: object  # CLIPImageProcessor

    @property
    def cross_attention_dim(self) -> int:
        return int(self.to_k[0].in_features)

    __nodegraph_model__ = True
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return (param_bytes(self.projection) + param_bytes(self.encoder)
                + sum(param_bytes(m) for m in (*self.to_k, *self.to_v)))


@dataclass(frozen=True, eq=False)
class _Tokens:
    """One IP-Adapter's image tokens and projections for one cross-attention layer."""

    cond: torch.Tensor  # [1, tokens, dim]: the reference image(s)
    uncond: torch.Tensor  # [1, tokens, dim]: a zero image embedding (the unconditional half of CFG)
    scale: float
    to_k: torch.nn.Linear
    to_v: torch.nn.Linear

    def for_batch(self, batch: int) -> torch.Tensor:
        layout = UNET_BATCH.get()
        # [uncond x N, cond x N (x combined prompts)]
        if layout is not None and layout.cfg and batch > layout.images and batch % layout.images == 0:
            n = layout.images
            return torch.cat([self.uncond.expand(n, -1, -1), self.cond.expand(batch - n, -1, -1)])
        return self.cond.expand(batch, -1, -1)


class IPAttnProcessor:
    """Cross-attention over the text plus, per IP-Adapter, attention over its image tokens (diffusers'
    IPAdapterAttnProcessor2_0 without region masks)."""

    def __init__(self, adapters: tuple[_Tokens, ...]):
        self.adapters = adapters

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        def merge(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        query = split(query)
        out = merge(F.scaled_dot_product_attention(query, split(key), split(value), attn_mask=attention_mask,
                                                   dropout_p=0.0, is_causal=False))
        for adapter in self.adapters:
            if adapter.scale == 0:
                continue
            tokens = adapter.for_batch(batch)
            image_attention = F.scaled_dot_product_attention(query, split(adapter.to_k(tokens)),
                                                             split(adapter.to_v(tokens)), attn_mask=None,
                                                             dropout_p=0.0, is_causal=False)
            out = out + adapter.scale * merge(image_attention)

        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass(frozen=True, eq=False)
class IPAdapterPatch:
    """Model patch: the cross-attention layers named in ``layers`` also attend to the adapter's image tokens."""

    adapter_name: str
    layers: tuple[str, ...]  # attention module names, in the adapter's order
    cond: torch.Tensor
    uncond: torch.Tensor
    scale: float
    to_k: tuple[torch.nn.Linear, ...]
    to_v: tuple[torch.nn.Linear, ...]

    @contextlib.contextmanager
    def apply(self, unet: torch.nn.Module) -> Iterator[None]:
        previous = []
        try:
            for name, to_k, to_v in zip(self.layers, self.to_k, self.to_v):
                attn = unet.get_submodule(name)
                old = attn.processor
                mine = _Tokens(self.cond, self.uncond, self.scale, to_k, to_v)
                chained = old.adapters if isinstance(old, IPAttnProcessor) else ()
                attn.set_processor(IPAttnProcessor((*chained, mine)))
                previous.append((attn, old))
            yield
        finally:
            for attn, old in reversed(previous):
                attn.set_processor(old)

    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return self.cond.nbytes + self.uncond.nbytes


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


IPADAPTERS = Folder("ipadapter", what="IP-Adapters", suffixes=WEIGHT_SUFFIXES, flag="--models")
# CLIP vision encoders: transformers folders (with config.json) or single .safetensors files
CLIP_VISION = Folder("clip_vision", what="image encoders", suffixes=(".safetensors",),
                     entry_dir=lambda path: True if (path / "config.json").is_file() else None, flag="--models")


def _split(tensors: Mapping[str, torch.Tensor], path: Path) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("ip_adapter."):
            m = _IP_KEY.match(key[len("ip_adapter."):])
            if m is None:
                raise IPAdapterError(f"{path.name}: unexpected IP-Adapter weight {key!r}")
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not proj or not layers:
        raise IPAdapterError(f"{path.name}: not an IP-Adapter file (it needs image_proj.* and "
                             f"ip_adapter.<n>.to_k_ip/to_v_ip weights; found {few(sorted(tensors))})")
    if set(proj) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        kind = "IP-Adapter Plus (a resampler)" if "latents" in proj else "an IP-Adapter variant"
        raise IPAdapterError(f"{path.name}: {kind} with image projection weights {few(sorted(proj))} is not "
                             f"supported; use a basic IP-Adapter (such as ip-adapter_sd15.safetensors)")
    for n, pair in layers.items():
        if set(pair) != {"k", "v"}:
            raise IPAdapterError(f"{path.name}: layer {n} lacks its to_{'v' if 'k' in pair else 'k'}_ip weight")
    return proj, layers


def load_adapter_weights(path: Path, allow_pickle: bool = False):
    """(ImageProjection, to_k Linears, to_v Linears) of an adapter file, on the CPU in float32."""
    from diffusers.models.embeddings import ImageProjection

    proj, layers = _split(read_weights(path, allow_pickle=allow_pickle), path)
    dim = proj["norm.weight"].shape[0]
    out_features, embed_dim = proj["proj.weight"].shape
    if out_features % dim:
        raise IPAdapterError(f"{path.name}: image projection of {out_features} features is not a whole number of "
                             f"{dim}-wide tokens")
    projection = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=dim,
                                 num_image_text_embeds=out_features // dim)
    projection.load_state_dict({"image_embeds.weight": proj["proj.weight"], "image_embeds.bias": proj["proj.bias"],
                                "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]})
    to_k, to_v = [], []
    for n in sorted(layers):
        for store, weight in ((to_k, layers[n]["k"]), (to_v, layers[n]["v"])):
            if weight.ndim != 2 or weight.shape[1] != dim:
                raise IPAdapterError(f"{path.name}: layer {n}'s projection {tuple(weight.shape)} does not take "
                                     f"{dim}-wide image tokens")
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data = weight.float()
            store.append(linear)
    return projection, tuple(to_k), tuple(to_v)


def derive_vision_config(shapes: Mapping[str, Sequence[int]], where: str) -> dict:
    """A CLIPVisionConfig for a single-file CLIP vision encoder, from its tensor shapes."""
    p = "vision_model."
    try:
        hidden = shapes[p + "embeddings.class_embedding"][0]
        out_channels, channels, patch, _ = shapes[p + "embeddings.patch_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        projection = shapes["visual_projection.weight"][0]
        intermediate = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise IPAdapterError(f"{where}: not a CLIP vision encoder with projection (no {e.args[0]!r})") from None
    side = math.isqrt(positions - 1)
    layers = len({int(k.split(".")[3]) for k in shapes if k.startswith(p + "encoder.layers.")})
    return {"hidden_size": hidden, "intermediate_size": intermediate, "projection_dim": projection,
            "num_hidden_layers": layers, "num_attention_heads": _HEADS.get(hidden, max(1, hidden // 64)),
            "num_channels": channels, "image_size": side * patch, "patch_size": patch,
            "hidden_act": "quick_gelu" if hidden in _QUICK_GELU_WIDTHS else "gelu"}


def load_image_encoder(path: Path, settings: Settings):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) from a transformers folder or a single safetensors
    file, ready to run, loaded as checkpoints are (streamed into the run's dtype, or mapped where used as stored and
    guarded: ``checkpoint.standalone_options``). Without a preprocessor_config.json the preprocessing is diffusers'
    default for IP-Adapters: resize and centre-crop to the encoder's image size, CLIP's mean and std."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from .checkpoint import standalone_options
    from .loading.assemble import _pretrained, empty_weights
    from .loading.weights import file_kind, read_header, read_pickle

    files = sorted(path.glob("model*.safetensors")) if path.is_dir() else [path]
    opts = standalone_options(settings, [f for f in files if file_kind(f) == "safetensors"])
    if path.is_dir():
        encoder = _pretrained("CLIPVisionModelWithProjection", path, None, opts)  # errors name the folder
        if (path / "preprocessor_config.json").is_file():
            return encoder, CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    else:
        if file_kind(path) == "safetensors":
            shapes = read_header(path)
            tensors = opts.streamed(path)  # each read once, in its dtype, on its device
        else:
            tensors = read_pickle(path, settings.allow_pickle)
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        config = CLIPVisionConfig(**derive_vision_config(shapes, path.name))
        with empty_weights():  # no random initialisation of weights about to be replaced
            encoder = CLIPVisionModelWithProjection(config)
        wanted = set(encoder.state_dict())
        state = {k: tensors[k] for k in tensors if k in wanted}
        missing = sorted(wanted - set(state) - {"vision_model.embeddings.position_ids"})
        if missing:
            raise CheckpointError(f"{path}: the weights do not fit a CLIP vision encoder: missing {few(missing)}")
        encoder.load_state_dict(state, strict=False, assign=True)
        ready(encoder, opts.device, opts.dtype, clone=False)  # read into memory of its own, or mapped as asked
    size = int(encoder.config.image_size)
    return encoder, CLIPImageProcessor(size=size, crop_size=size)


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class LoadIPAdapter(Node):
    """Load an IP-Adapter (image prompt adapter) from the models folder's ipadapter/ subfolder, with its CLIP
    vision image encoder from clip_vision/ (a transformers folder, or a single .safetensors file). Basic
    IP-Adapters (ip-adapter_sd15 and the like) are supported; Plus and FaceID variants are refused. .bin pickles
    load only when nodegraph runs with --allow-pickle."""

    category = "loaders"
    ip_adapter = Combo(options=IPADAPTERS)
    image_encoder = Combo(options=CLIP_VISION)
    outputs = (Output("ip_adapter", IP_ADAPTER),)

    def run(self, ctx, ip_adapter, image_encoder):
        settings = ctx.settings
        projection, to_k, to_v = load_adapter_weights(IPADAPTERS.locate(settings, ip_adapter), settings.allow_pickle)
        encoder, processor = load_image_encoder(CLIP_VISION.locate(settings, image_encoder), settings)
        width = encoder.config.projection_dim
        if projection.image_embeds.in_features != width:
            raise IPAdapterError(f"the IP-Adapter {ip_adapter!r} takes {projection.image_embeds.in_features}-wide "
                                 f"image embeddings but the encoder {image_encoder!r} gives {width}: use the "
                                 f"image encoder the adapter was trained with")
        device = devices.device(settings)
        place = lambda module: ready(module, device, devices.dtype(settings, device))  # noqa: E731
        return IPAdapter(ip_adapter, place(projection), tuple(place(m) for m in to_k), tuple(place(m) for m in to_v),
                         encoder, processor)


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """The UNet's cross-attention modules in the order IP-Adapter files number them (diffusers' attn_processors
    order: down, up, then mid blocks)."""
    return [name[: -len(".processor")] for name in unet.attn_processors
            if name.endswith("attn2.processor") and "motion_modules" not in name]


class IPAdapterApply(Node):
    """Prompt with an image: the model also attends to the reference image through the IP-Adapter, as diffusers'
    ip_adapter_image does. scale weighs the image against the text (1.0 = as trained; 0.5 is a common mix).
    Several images in the batch are used together; chain IPAdapterApply nodes to combine adapters."""

    category = "model patches"
    model = Socket(MODEL)
    ip_adapter = Socket(IP_ADAPTER)
    image = Socket(IMAGE)
    scale = Float(default=1.0, min=0.0, max=3.0, step=0.01)
    outputs = (Output("model", MODEL),)

    def run(self, ctx, model: Model, ip_adapter: IPAdapter, image, scale):
        unet = model.unet
        width = int(unet.config.cross_attention_dim)
        if ip_adapter.cross_attention_dim != width:
            raise IPAdapterError(f"the IP-Adapter {ip_adapter.name!r} is made for models with "
                                 f"{ip_adapter.cross_attention_dim}-wide text features, but this model's are "
                                 f"{width} wide: use an IP-Adapter of the checkpoint's family")
        layers = cross_attention_layers(unet)
        if len(layers) != len(ip_adapter.to_k):
            raise IPAdapterError(f"the IP-Adapter {ip_adapter.name!r} has {len(ip_adapter.to_k)} attention layers but "
                                 f"this model has {len(layers)}: it was made for another model family")
        for name, to_k in zip(layers, ip_adapter.to_k):
            expected = unet.get_submodule(name).to_k.weight.shape
            if to_k.weight.shape != expected:
                raise IPAdapterError(f"the IP-Adapter {ip_adapter.name!r} does not fit layer {name}: "
                                     f"{tuple(to_k.weight.shape)} vs {tuple(expected)}")
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"the image must be an IMAGE [batch, height, width, 3], got {tuple(image.shape)}")
        cond, uncond = encode_reference(ip_adapter, image)
        return model.with_patch(IPAdapterPatch(ip_adapter.name, tuple(layers), cond, uncond, float(scale),
                                               ip_adapter.to_k, ip_adapter.to_v))


def encode_reference(ip_adapter: IPAdapter, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens [1, images x tokens, dim] of the reference images, and those of zero image embeddings."""
    encoder = ip_adapter.encoder
    param = next(encoder.parameters())
    pixels = ip_adapter.processor(tensor_to_pils(image), return_tensors="pt").pixel_values
    with torch.inference_mode():
        embeds = encoder(pixels.to(param.device, param.dtype)).image_embeds
        proj_dtype = next(ip_adapter.projection.parameters()).dtype
        cond = ip_adapter.projection(embeds.to(proj_dtype))
        uncond = ip_adapter.projection(torch.zeros_like(embeds, dtype=proj_dtype))
    dim = cond.shape[-1]
    return cond.reshape(1, -1, dim), uncond.reshape(1, -1, dim)


NODES = [LoadIPAdapter, IPAdapterApply]
