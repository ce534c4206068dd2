"""Turn a checkpoint (a file, a folder or a hub repository id) into model components, offline.

What the checkpoints folder may hold, recognised by *content*, never by file extension (:func:`detect`):

* ``"diffusers"``: a diffusers pipeline folder (``model_index.json``). Each component is loaded with its own
  ``from_pretrained(..., local_files_only=True)``; the tokenizer folder may lack ``tokenizer.json``.
* ``"unet_folder"``: a lone UNet folder (``config.json`` of a ``UNet2DConditionModel`` + weights), such as the
  ``unet/`` of an LCM-distilled model. It is loaded over a full ``base=`` checkpoint, which gives the rest.
* ``"safetensors"``: an original-layout (LDM / sgm) single file of the SD 1.x, SD 2.x, SDXL or SSD-1B family.
* ``"pickle"``: a ``.ckpt``/``.pt`` torch pickle. Refused unless ``allow_pickle=True``, then read with
  ``torch.load(weights_only=True)`` and treated like a single file.
* ``"hub"``: an ``owner/name`` that is no local path. Fetched only when the hub is reachable; offline, the error
  says where to put the files instead.

Single files hold weights but no configuration. ``configs/<family>/`` ships the family's diffusers configuration
as small JSON files (no weights; the tokenizers reuse the CLIP BPE in ``data/clip_tokenizer``). The family is
detected from the safetensors header (:func:`detect_family`: the text encoder layout, the UNet's cross-attention
width and block counts) and the size fields of the configuration (channels, layers, widths, vocabulary...) are
derived from the header's shapes (:func:`derive_configs`), so non-standard sizes, such as the tiny test models,
load too. Fields that shapes cannot reveal (attention heads, norm groups, activations) come from the family's
configuration, or from ``config=<a diffusers folder>`` when the defaults do not fit. diffusers' own converters
(``convert_ldm_*``) rename the weights; models are built on the meta device and take the tensors with a strict
``load_state_dict``, so a missing or unexpected weight is an error, never a silent random initialisation.

Memory and bit-exactness: safetensors are memory-mapped, and a tensor viewed in the map sits at the file offset of
its data, 8-byte aligned at best. CPU kernels give results that differ at the 1e-7 level depending on that
alignment. Measured on the tiny SD model: our components loaded from a diffusers folder *without* copying are
bit-identical to ``LatentConsistencyModelPipeline.from_pretrained(folder)``'s (which also maps the same files); after
cloning (aligned memory) the UNet output differs from that pipeline by 6.6e-7, and equals it exactly once the
pipeline's weights are cloned too. ``clone_weights=True`` (the default) copies every mapped tensor into memory of its
own: results then depend only on the weights, not on the file layout (a single file and the diffusers folder it
was written from give identical images), and the loaded model no longer depends on the file staying unchanged.
Pass ``clone_weights=False`` to keep the mapped tensors (bit-identical to diffusers' ordinary loading).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from nodegraph.folders import list_entries

FAMILIES = ("sd1", "sd2", "sdxl", "ssd1b")
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
CLIP_BPE_DIR = Path(__file__).resolve().parent / "data" / "clip_tokenizer"
#: Files of a loadable checkpoint, by extension, for listings only (loading goes by content).
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

# Key prefixes of the original single-file layout.
_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_CLIP_SD = "cond_stage_model.transformer.text_model."  # OpenAI CLIP ViT-L (transformers layout): SD 1.x
_OPENCLIP_SD = "cond_stage_model.model."  # OpenCLIP ViT-H: SD 2.x
_CLIP_XL = "conditioner.embedders.0.transformer.text_model."  # SDXL's first text encoder (CLIP ViT-L)
_OPENCLIP_XL = "conditioner.embedders.1.model."  # SDXL's second text encoder (OpenCLIP ViT-bigG)
# Text encoders of each family: component name -> (key prefix, "clip" (transformers layout) | "openclip").
_TEXT_ENCODERS = {
    "sd1": {"text_encoder": (_CLIP_SD, "clip")},
    "sd2": {"text_encoder": (_OPENCLIP_SD, "openclip")},
    "sdxl": {"text_encoder": (_CLIP_XL, "clip"), "text_encoder_2": (_OPENCLIP_XL, "openclip")},
}
_TEXT_ENCODERS["ssd1b"] = _TEXT_ENCODERS["sdxl"]
_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Stored by some checkpoints but recomputed by the models: never an error when left over.
_IGNORABLE = ("position_ids", "logit_scale")

# The CLIP BPE vocabulary: 512 byte symbols, one token per merge, then <|startoftext|> and <|endoftext|>.
_CLIP_VOCAB = 49408
_BYTE_TOKENS = 512
_SPECIAL_TOKENS = 2

_SAFETENSORS_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
_MAGIC = [
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"), (b"RIFF", "a RIFF file"),
    (b"GGUF", "a GGUF file"), (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"),
    (b"7z\xbc\xaf", "a 7z archive"),
    (b"%PDF", "a PDF document"), (b"<", "an HTML or XML document"), (b"{", "a JSON document"),
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a hub download fetches: configs, tokenizers and the default (non-variant) safetensors weights.
_HUB_FILES = [
    "model_index.json", "config.json", "*/*.json", "*/*.txt",
    "diffusion_pytorch_model.safetensors", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors",
    "*/*-of-*.safetensors",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded. The message names the file, what was found there and what to do."""


@dataclass(frozen=True)
class Components:
    """The parts of a Stable Diffusion model, ready to run: eval mode, no gradients, on the requested device/dtype."""

    unet: torch.nn.Module  # UNet2DConditionModel
    vae: torch.nn.Module  # AutoencoderKL
    text_encoder: torch.nn.Module  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler_config: dict  # the model's scheduler configuration (betas, prediction type...)
    family: str  # "sd1", "sd2", "sdxl" or "ssd1b"
    source: str  # where it came from, for people
    text_encoder_2: torch.nn.Module | None = None  # SDXL / SSD-1B: CLIPTextModelWithProjection
    tokenizer_2: Any = None  # SDXL / SSD-1B


# --------------------------------------------------------------------------------------------
# Detection by content
# --------------------------------------------------------------------------------------------


def detect(path: Path | str) -> str:
    """The kind of checkpoint at ``path``: "diffusers", "unet_folder", "safetensors", "pickle" or "hub".

    Decided by content: ``model_index.json`` / a UNet ``config.json`` for folders; the safetensors header or the
    zip / pickle magic bytes for files. Anything else raises :class:`CheckpointError` saying what it is.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return "diffusers"
        if _is_unet_folder(p):
            return "unet_folder"
        raise CheckpointError(
            f"{p}: this folder is neither a diffusers pipeline (no model_index.json) nor a UNet folder (config.json "
            f"of a UNet2DConditionModel). Point to the pipeline folder itself, or to a single checkpoint file.")
    if p.is_file():
        return _detect_file(p)
    if _looks_like_hub_id(path):
        return "hub"
    raise CheckpointError(f"{p}: no such file or folder")


def _detect_file(p: Path) -> str:
    with p.open("rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{p}: the file is empty")
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format: a zip holding <name>/data.pkl
        if _is_torch_zip(p):
            return "pickle"
        raise CheckpointError(f"{p}: a zip archive, not a checkpoint (no data.pkl inside). Unpack it first.")
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle protocol 2-5: legacy torch.save
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header, which starts with "{".
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2:
        return "safetensors"
    what = next((name for magic, name in _MAGIC if head.startswith(magic)), f"unrecognised content {head[:8]!r}")
    raise CheckpointError(
        f"{p}: not a checkpoint ({what}). Expected a .safetensors file, a diffusers folder, or a .ckpt pickle.")


def _is_torch_zip(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{p}: a corrupt or truncated zip/torch file ({e})") from e


def _looks_like_hub_id(path: Path | str) -> bool:
    text = Path(path).as_posix() if isinstance(path, Path) else str(path)
    # "checkpoints/x.safetensors" is a missing file, not a repository.
    return bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith((*CHECKPOINT_SUFFIXES, ".bin"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _is_unet_folder(p: Path) -> bool:
    config = p / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "UNet2DConditionModel"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def read_header(path: Path | str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a safetensors file, read from its header without loading any tensor.

    The header is validated against the file size, so a truncated download or a corrupt file is reported here,
    with the reason, rather than as a crash deep inside a loader.
    """
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: only {size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(
                f"{p}: corrupt or truncated safetensors file: the header length field says {n} bytes but only "
                f"{size - 8} follow it. Download the file again.")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{p}: corrupt safetensors file: a {n}-byte header exceeds the 100 MB limit")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt safetensors file: the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupt safetensors file: the header is not a JSON object")
    data_size = size - 8 - n
    shapes: dict[str, tuple[int, ...]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{p}: corrupt safetensors header: bad entry for tensor {name!r}") from e
        item = _SAFETENSORS_DTYPE_SIZES.get(dtype)
        if not 0 <= begin <= end or (item is not None and end - begin != math.prod(shape) * item):
            raise CheckpointError(
                f"{p}: corrupt safetensors header: tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                f"[{begin}, {end}] that do not match its size")
        if end > data_size:
            raise CheckpointError(
                f"{p}: truncated safetensors file: tensor {name!r} needs bytes up to {end} of the data section but "
                f"the file holds only {data_size}. The download is probably incomplete; fetch the file again.")
        shapes[name] = shape
    return shapes


# --------------------------------------------------------------------------------------------
# Family detection and configuration from a single file's header
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _UNetLayout:
    """The architecture of an original-layout UNet, read from tensor shapes."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]  # per level
    layers: int  # resnets per down level
    down: tuple[tuple[int, ...], ...]  # transformer blocks per down level and layer (0: no attention)
    up: tuple[tuple[int, ...], ...]  # per up level (diffusers order: deepest first) and layer
    mid: int | None  # transformer blocks of the middle block; None: no attention there
    has_mid_block: bool
    cross_attention_dim: int | None
    linear_projection: bool  # SD 2.x / SDXL use Linear proj_in/out, SD 1.x 1x1 convolutions
    addition_in: int | None  # SDXL's label_emb input width (micro-conditioning + pooled text)


def _strip(shapes: Mapping[str, Sequence[int]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _indices(keys: Iterable[str], prefix: str) -> set[int]:
    """The integers that follow ``prefix`` in ``keys`` (block or layer numbers)."""
    out = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return out


def _unet_layout(shapes: Mapping[str, Sequence[int]]) -> _UNetLayout:
    s = _strip(shapes, _UNET)
    try:
        in_channels = s["input_blocks.0.0.weight"][1]
        out_channels = s["out.2.weight"][0]
        blocks = _indices(s, "input_blocks.")
        downsamplers = sorted(i for i in blocks if f"input_blocks.{i}.0.op.weight" in s)
        # Level i holds `layers` resnets (input blocks 1 + i*(layers+1) + j) and then a downsampler.
        layers = downsamplers[0] - 1 if downsamplers else max(blocks)
        n = layers + 1
        levels = len(downsamplers) + 1
        channels = tuple(s[f"input_blocks.{1 + i * n}.0.out_layers.3.weight"][0] for i in range(levels))
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"unrecognised UNet layout under {_UNET}* (missing {e})") from e

    def depth(block: str) -> int:
        return len(_indices(s, f"{block}.transformer_blocks."))

    return _UNetLayout(
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        layers=layers,
        down=tuple(tuple(depth(f"input_blocks.{1 + i * n + j}.1") for j in range(layers)) for i in range(levels)),
        up=tuple(tuple(depth(f"output_blocks.{i * n + j}.1") for j in range(n)) for i in range(levels)),
        mid=depth("middle_block.1") if "middle_block.1.proj_in.weight" in s else None,
        has_mid_block=any(k.startswith("middle_block.") for k in s),
        cross_attention_dim=next((v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight")), None),
        linear_projection=any(k.endswith(".proj_in.weight") and len(v) == 2 for k, v in s.items()),
        addition_in=s["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in s else None,
    )


def _is_reduced_sdxl(layout: _UNetLayout) -> bool:
    """SSD-1B and kin: SDXL with transformer blocks removed, so the up path no longer mirrors the down path."""
    mirrored = all(set(up) <= {layout.down[-1 - i][0] if layout.down[-1 - i] else 0}
                   for i, up in enumerate(layout.up))
    uniform = all(len(set(level)) <= 1 for level in layout.down)
    return not (mirrored and uniform and layout.mid == (layout.down[-1][0] if layout.down[-1] else None))


def _text_width(shapes: Mapping[str, Sequence[int]], prefix: str, layout: str) -> int | None:
    key = prefix + ("embeddings.token_embedding.weight" if layout == "clip" else "token_embedding.weight")
    return tuple(shapes[key])[1] if key in shapes else None


def _has(shapes: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def detect_family(shapes: Mapping[str, Sequence[int]]) -> str:
    """The model family ("sd1", "sd2", "sdxl", "ssd1b") of an original-layout checkpoint, from keys and shapes.

    The text encoder layout decides (OpenAI CLIP under ``cond_stage_model.transformer``: SD 1.x; OpenCLIP under
    ``cond_stage_model.model``: SD 2.x; two ``conditioner.embedders``: SDXL, or SSD-1B when the UNet's transformer
    blocks are reduced), checked against the UNet's cross-attention width. Without a text encoder, that width
    decides (768: SD 1.x, 1024: SD 2.x, 2048: SDXL). Anything else raises :class:`CheckpointError` naming what the
    file seems to be (a VAE, a LoRA, a ControlNet...) and what it holds.
    """
    has_unet = _has(shapes, _UNET)
    layout = _unet_layout(shapes) if has_unet else None
    if _has(shapes, "conditioner.embedders."):
        if not (_has(shapes, _CLIP_XL) and _has(shapes, _OPENCLIP_XL)):
            if _has(shapes, "conditioner.embedders.0.model."):
                raise CheckpointError("an SDXL refiner (a single OpenCLIP text encoder), which is not supported")
            raise CheckpointError(f"an SDXL-like checkpoint with unknown text encoders: {_summary(shapes)}")
        family = "ssd1b" if layout is not None and _is_reduced_sdxl(layout) else "sdxl"
    elif _has(shapes, _OPENCLIP_SD):
        family = "sd2"
    elif _has(shapes, _CLIP_SD):
        family = "sd1"
    elif layout is not None:
        width = layout.cross_attention_dim
        family = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
        if family is None:
            raise CheckpointError(
                f"a UNet without text encoder whose cross-attention width ({width}) matches no known family "
                f"(768: SD 1.x, 1024: SD 2.x, 2048: SDXL)")
        if family == "sdxl" and _is_reduced_sdxl(layout):
            family = "ssd1b"
    else:
        raise CheckpointError(f"not a Stable Diffusion checkpoint: it looks like {_what_is_it(shapes)}")
    if layout is not None and layout.cross_attention_dim is not None:
        widths = [_text_width(shapes, prefix, kind) for prefix, kind in _TEXT_ENCODERS[family].values()]
        if all(widths) and sum(widths) != layout.cross_attention_dim:
            raise CheckpointError(
                f"a {family} checkpoint whose UNet attends to {layout.cross_attention_dim}-wide text features but "
                f"whose text encoder(s) give {' + '.join(map(str, widths))}: the parts do not belong together")
    return family


def _what_is_it(shapes: Mapping[str, Sequence[int]]) -> str:
    keys = list(shapes)
    if any("lora_" in k or ".lora_A." in k or ".lora_down." in k for k in keys):
        what = "a LoRA (low-rank adapter weights), to be applied on top of a checkpoint"
    elif keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", _VAE)) for k in keys):
        what = "a standalone VAE (encoder/decoder weights only), not a full checkpoint"
    elif any(_has(shapes, p) for p in ("control_model.", "input_hint_block.", "controlnet_cond_embedding.")):
        what = "a ControlNet, not a full checkpoint"
    elif "conv_in.weight" in shapes and _has(shapes, "down_blocks."):
        what = ("diffusers-format model weights (down_blocks.*): put the file in a folder next to its config.json, or "
                "use the whole diffusers pipeline folder")
    elif _has(shapes, "text_model.") or _has(shapes, "embeddings.token_embedding."):
        what = "a text encoder on its own, not a full checkpoint"
    else:
        what = "an unknown model"
    return f"{what}; it holds {_summary(shapes)}"


def _summary(shapes: Mapping[str, Any], limit: int = 6) -> str:
    """``"412 tensors: decoder.up.* (120), encoder.down.* (96), ..."``: the key groups a checkpoint holds."""
    groups: dict[str, int] = {}
    for k in shapes:
        parts = k.split(".")
        group = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        groups[group] = groups.get(group, 0) + 1
    top = sorted(groups.items(), key=lambda item: (-item[1], item[0]))[:limit]
    more = ", ..." if len(groups) > limit else ""
    return f"{len(shapes)} tensors: " + ", ".join(f"{g}.* ({n})" for g, n in top) + more


def _require_parts(shapes: Mapping[str, Any], family: str, where: str) -> None:
    wanted = {"UNet": _UNET, "VAE": _VAE}
    wanted.update({name.replace("_", " "): prefix for name, (prefix, _) in _TEXT_ENCODERS[family].items()})
    missing = [f"{name} ({prefix}*)" for name, prefix in wanted.items() if not _has(shapes, prefix)]
    if missing:
        raise CheckpointError(
            f"{where}: this {family} checkpoint has no {', '.join(missing)}; it holds {_summary(shapes)}. "
            f"A single file must contain the UNet, the VAE and the text encoder(s).")
    if _UNET + "time_embed.cond_proj.weight" in shapes:
        raise CheckpointError(
            f"{where}: the UNet has an LCM guidance embedding (time_embed.cond_proj), which the original single-file "
            f"layout has no name for. Load an LCM-distilled UNet from its diffusers unet folder (config.json + "
            f"diffusion_pytorch_model.safetensors) over a base checkpoint, or use a checkpoint with the LCM-LoRA "
            f"fused in.")


def _head_count(width: int, head_width: int) -> int:
    """Attention heads for a non-standard width: the family's head width if it divides, else 8-wide heads."""
    for w in (head_width, 8):
        if width % w == 0:
            return width // w
    return 1


def _groups(preferred: int, channels: Sequence[int]) -> int:
    """GroupNorm groups: the family's value if it divides every channel count, else the largest divisor below it."""
    common = math.gcd(*channels)
    return max(d for d in range(1, min(preferred, common) + 1) if common % d == 0)


def _derive_unet(base: dict, lay: _UNetLayout, pooled_width: int | None) -> dict:
    cfg = dict(base)
    levels, n = len(lay.channels), lay.layers + 1
    compact = lambda depths: depths[0] if len(set(depths)) == 1 else list(depths)  # noqa: E731
    down = [compact(d) if any(d) else 1 for d in lay.down]
    if lay.mid is not None:
        mid_type = "UNetMidBlock2DCrossAttn"
        if not any(lay.down[-1]):
            down[-1] = lay.mid  # diffusers gives the middle block the depth of the last level
        elif down[-1] != lay.mid:
            raise CheckpointError(f"a middle block with {lay.mid} transformer blocks after a level with {down[-1]}, "
                                  f"which diffusers' UNet2DConditionModel cannot express")
    else:
        mid_type = "UNetMidBlock2D" if lay.has_mid_block else None
    up = [compact(u) if any(u) else 1 for u in lay.up]
    mirrored = all(up[i] == down[-1 - i] for i in range(levels) if any(lay.up[i]))
    symmetric = mirrored and all(isinstance(d, int) for d in down)
    if symmetric and len(set(down)) == 1:
        down = down[0]  # one int, as in the SD 1.x / 2.x configurations
    cfg.update(
        in_channels=lay.in_channels,
        out_channels=lay.out_channels,
        block_out_channels=list(lay.channels),
        layers_per_block=lay.layers,
        down_block_types=["CrossAttnDownBlock2D" if any(d) else "DownBlock2D" for d in lay.down],
        up_block_types=["CrossAttnUpBlock2D" if any(u) else "UpBlock2D" for u in lay.up],
        mid_block_type=mid_type,
        transformer_layers_per_block=down,
        reverse_transformer_layers_per_block=None if symmetric else [list(u) if any(u) else [1] * n for u in lay.up],
        use_linear_projection=lay.linear_projection,
        time_cond_proj_dim=None,
    )
    if lay.cross_attention_dim is not None:
        cfg["cross_attention_dim"] = lay.cross_attention_dim
    if list(lay.channels) != list(base["block_out_channels"]):
        heads = base["attention_head_dim"]
        if isinstance(heads, int):  # SD 1.x: the same number of heads at every level
            cfg["attention_head_dim"] = heads if all(c % heads == 0 for c in lay.channels) else [
                _head_count(c, 64) for c in lay.channels]
        else:  # SD 2.x / SDXL: heads of a fixed width (64)
            head_width = base["block_out_channels"][0] // heads[0]
            cfg["attention_head_dim"] = [_head_count(c, head_width) for c in lay.channels]
        cfg["norm_num_groups"] = _groups(base["norm_num_groups"], lay.channels)
    if lay.addition_in is not None:
        # label_emb takes 6 embedded size/crop numbers plus the pooled text embedding of the second text encoder.
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=lay.addition_in)
        if pooled_width is not None:
            cfg["addition_time_embed_dim"] = (lay.addition_in - pooled_width) // 6
    return cfg


def _derive_vae(base: dict, shapes: Mapping[str, Sequence[int]]) -> dict:
    s = _strip(shapes, _VAE)
    try:
        levels = len(_indices(s, "encoder.down."))
        channels = [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
        cfg = dict(base)
        cfg.update(
            in_channels=s["encoder.conv_in.weight"][1],
            out_channels=s["decoder.conv_out.weight"][0],
            latent_channels=s["decoder.conv_in.weight"][1],
            block_out_channels=channels,
            layers_per_block=len(_indices(s, "encoder.down.0.block.")),
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            use_quant_conv="quant_conv.weight" in s,
            use_post_quant_conv="post_quant_conv.weight" in s,
            mid_block_add_attention=_has(s, "encoder.mid.attn_1."),
        )
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"unrecognised VAE layout under {_VAE}* (missing {e})") from e
    if channels != list(base["block_out_channels"]):
        cfg["norm_num_groups"] = _groups(base["norm_num_groups"], channels)
    return cfg


def _derive_text(base: dict, shapes: Mapping[str, Sequence[int]], prefix: str, layout: str) -> dict:
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    try:
        if layout == "clip":
            vocab, hidden = shapes[prefix + "embeddings.token_embedding.weight"]
            positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
            layers = len(_indices(shapes, prefix + "encoder.layers."))
            intermediate = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
            projection = None
        else:
            vocab, hidden = shapes[prefix + "token_embedding.weight"]
            positions = shapes[prefix + "positional_embedding"][0]
            # diffusers' converter drops SD 2's last OpenCLIP layer (SD 2 conditions on the penultimate one).
            kept = [k for k in shapes if k not in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE]
            layers = len(_indices(kept, prefix + "transformer.resblocks."))
            intermediate = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
            projection = tuple(shapes[prefix + "text_projection"])[1] if prefix + "text_projection" in shapes else None
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"unrecognised text encoder layout under {prefix}* (missing {e})") from e
    cfg = dict(base)
    if hidden != base["hidden_size"]:
        cfg.update(num_attention_heads=_head_count(hidden, 64), projection_dim=hidden)
    if projection is not None and "CLIPTextModelWithProjection" in base.get("architectures", ()):
        cfg["projection_dim"] = projection
    cfg.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions, num_hidden_layers=layers,
               intermediate_size=intermediate)
    return cfg


def family_config_dir(family: str) -> Path:
    """The shipped configuration folder of a family (JSON only)."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return CONFIGS_DIR / family


def derive_configs(shapes: Mapping[str, Sequence[int]], family: str | None = None) -> dict[str, dict]:
    """Component configurations ("unet", "vae", "text_encoder"[, "text_encoder_2"]) for an original-layout file.

    Starts from the family's shipped configuration and replaces every size field the tensor shapes reveal, so
    a checkpoint of the standard size gets exactly the shipped configuration.
    """
    family = family or detect_family(shapes)
    folder = family_config_dir(family)
    layout = _unet_layout(shapes)
    configs = {}
    pooled = None
    for name, (prefix, kind) in _TEXT_ENCODERS[family].items():
        configs[name] = _derive_text(_read_json(folder / name / "config.json"), shapes, prefix, kind)
        if name == "text_encoder_2":
            pooled = configs[name]["projection_dim"]
    configs["unet"] = _derive_unet(_read_json(folder / "unet" / "config.json"), layout, pooled)
    configs["vae"] = _derive_vae(_read_json(folder / "vae" / "config.json"), shapes)
    return configs


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def is_checkpoint_folder(path: Path) -> bool | None:
    """True for a folder :func:`load_components` loads whole (a diffusers pipeline or a UNet folder); None for
    any other folder, which may hold checkpoints (``Folder.entry_dir``)."""
    return True if (path / "model_index.json").is_file() or _is_unet_folder(path) else None


def list_checkpoints(folder: Path | str) -> list[str]:
    """Names, relative to ``folder`` and with "/" separators, of what :func:`load_components` may load there:
    diffusers and UNet folders as folders, other files by extension (.safetensors, .ckpt, .pt, .pth)."""
    return list_entries(Path(folder), CHECKPOINT_SUFFIXES, is_checkpoint_folder)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    device: torch.device
    dtype: torch.dtype
    allow_pickle: bool
    clone: bool


@dataclass
class _Parts:
    """Loaded components before they become :class:`Components`; ``unet`` stays None when only the base is wanted."""

    family: str
    unet_config: Mapping[str, Any]
    unet: torch.nn.Module | None
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict
    source: str
    extra: dict[str, Any] = field(default_factory=dict)  # text_encoder_2 / tokenizer_2


def load_components(
    path: Path | str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    checkpoints_dir: Path | None = None,
    base: Path | str | None = None,
    config: Path | str | None = None,
    clone_weights: bool = True,
) -> Components:
    """Load the checkpoint at ``path`` (see the module docstring for the formats) on ``device`` in ``dtype``.

    * ``base``: for a UNet folder, the full checkpoint (any format) that gives the VAE, text encoder, tokenizer and
      scheduler configuration. Ignored for full checkpoints.
    * ``config``: for single files, a diffusers folder whose configurations (and tokenizer, scheduler) replace the
      family's shipped ones, as diffusers' ``from_single_file(config=...)``. Needed only for non-standard models whose
      head counts or norm groups the defaults do not fit.
    * ``clone_weights``: copy memory-mapped weights into memory of their own (see the module docstring).
    * ``checkpoints_dir``: where local checkpoints are read from, named when a hub id cannot be had.

    Never touches the network except for a hub repository id while the hub is online. Every failure is a
    :class:`CheckpointError` that names the file and the reason.
    """
    opts = _Options(torch.device(device), dtype, allow_pickle, clone_weights)
    config_dir = Path(config) if config is not None else None
    if config_dir is not None and detect(config_dir) != "diffusers":
        raise CheckpointError(f"{config_dir}: config= must be a diffusers folder (with model_index.json)")
    source_path, kind = _resolve(path, checkpoints_dir)
    if kind == "unet_folder":
        if base is None:
            raise CheckpointError(
                f"{source_path}: a UNet-only folder (e.g. an LCM-distilled unet/); it needs a base checkpoint (base=) "
                f"for the VAE, the text encoder and the tokenizer, such as the SD 1.5 model it was distilled from.")
        base_path, base_kind = _resolve(base, checkpoints_dir)
        if base_kind == "unet_folder":
            raise CheckpointError(f"{base_path}: the base must be a full checkpoint, not another UNet folder")
        parts = _load_full(base_path, base_kind, opts, config_dir, with_unet=False)
        unet = _pretrained("UNet2DConditionModel", source_path, None, opts)
        _check_unet_fits(unet.config, parts.unet_config, source_path, base_path)
        parts.unet, parts.unet_config = unet, unet.config
        parts.source = f"UNet folder {source_path} over {parts.source}"
    else:
        parts = _load_full(source_path, kind, opts, config_dir, with_unet=True)
    return Components(unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                      scheduler_config=parts.scheduler_config, family=parts.family, source=parts.source,
                      text_encoder_2=parts.extra.get("text_encoder_2"), tokenizer_2=parts.extra.get("tokenizer_2"))


def _resolve(path: Path | str, checkpoints_dir: Path | None) -> tuple[Path, str]:
    """A local path and its kind; hub ids are fetched (or refused offline) first."""
    kind = detect(path)
    if kind != "hub":
        return Path(path), kind
    local = _fetch_from_hub(str(path), checkpoints_dir or Path("models") / "checkpoints")
    return local, detect(local)


def _load_full(path: Path, kind: str, opts: _Options, config_dir: Path | None, *, with_unet: bool) -> _Parts:
    if kind == "diffusers":
        return _load_diffusers(path, opts, with_unet=with_unet)
    if kind == "safetensors":
        shapes = read_header(path)
        return _load_single_file(path, shapes, lambda: _read_safetensors(path), opts, config_dir, with_unet)
    if kind == "pickle":
        tensors = _read_pickle(path, opts.allow_pickle)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        return _load_single_file(path, shapes, lambda: tensors, opts, config_dir, with_unet)
    raise CheckpointError(f"{path}: a {kind} cannot be loaded here")


def _check_unet_fits(unet_config: Mapping, base_config: Mapping, path: Path, base: Path) -> None:
    fields = ("cross_attention_dim", "in_channels", "addition_embed_type")
    mismatched = [f for f in fields if _plain(unet_config.get(f)) != _plain(base_config.get(f))]
    if mismatched:
        detail = ", ".join(f"{f} {unet_config.get(f)} vs {base_config.get(f)}" for f in mismatched)
        raise CheckpointError(f"{path}: this UNet does not fit the base {base} ({detail}); choose a base of the same "
                              f"family (an LCM-distilled SD 1.5 UNet needs an SD 1.5 base).")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# --- diffusers folders ----------------------------------------------------------------------


def _load_diffusers(folder: Path, opts: _Options, *, with_unet: bool) -> _Parts:
    index = _read_json(folder / "model_index.json")
    pipeline = index.get("_class_name", "?")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not _listed(index, c)]
    if missing:
        raise CheckpointError(
            f"{folder}: a diffusers {pipeline} without {', '.join(missing)}. Only Stable Diffusion style pipelines "
            f"(UNet, VAE, CLIP text encoder) can be loaded.")
    unet_config = _read_json(folder / "unet" / "config.json")
    parts = _Parts(
        family="",
        unet_config=unet_config,
        unet=_pretrained("UNet2DConditionModel", folder, "unet", opts) if with_unet else None,
        vae=_pretrained("AutoencoderKL", folder, "vae", opts),
        text_encoder=_pretrained(_text_class(index, "text_encoder", folder), folder, "text_encoder", opts),
        tokenizer=_load_tokenizer(folder / "tokenizer", None),
        scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"),
        source=f"diffusers folder {folder}",
    )
    if _listed(index, "text_encoder_2"):
        parts.extra["text_encoder_2"] = _pretrained(_text_class(index, "text_encoder_2", folder), folder,
                                                    "text_encoder_2", opts)
        parts.extra["tokenizer_2"] = _load_tokenizer(folder / "tokenizer_2", None)
    parts.family = _family_of_configs(unet_config, parts.text_encoder.config, "text_encoder_2" in parts.extra)
    return parts


def _listed(index: Mapping, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _text_class(index: Mapping, component: str, folder: Path) -> str:
    name = index[component][1]
    if name not in _TEXT_CLASSES:
        raise CheckpointError(f"{folder}: the {component} is a {name}; only {' / '.join(_TEXT_CLASSES)} are supported")
    return name


def _family_of_configs(unet_config: Mapping, text_config: Any, has_second_encoder: bool) -> str:
    if unet_config.get("addition_embed_type") == "text_time" or has_second_encoder:
        reduced = (unet_config.get("reverse_transformer_layers_per_block") is not None
                   or unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn")
        return "ssd1b" if reduced else "sdxl"
    # OpenCLIP text towers (SD 2.x) use exact GELU, OpenAI's CLIP (SD 1.x) quick GELU.
    return "sd2" if getattr(text_config, "hidden_act", None) == "gelu" else "sd1"


def _model_class(name: str) -> type:
    if name in ("UNet2DConditionModel", "AutoencoderKL"):
        import diffusers

        return getattr(diffusers, name)
    import transformers

    return getattr(transformers, name)


def _variant(folder: Path) -> str | None:
    """The weights variant ("fp16"...) to ask for when a component folder only holds variant files."""
    names = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    if any(len(n.split(".")) == 2 or "-of-" in n for n in names):
        return None
    variants = sorted({n.split(".")[-2] for n in names if len(n.split(".")) == 3})
    return variants[0] if variants else None


def _pretrained(class_name: str, folder: Path, subfolder: str | None, opts: _Options) -> torch.nn.Module:
    """One component of a diffusers folder (or a lone UNet folder when ``subfolder`` is None), ready to run."""
    where = folder / subfolder if subfolder else folder
    if not where.is_dir():
        raise CheckpointError(f"{folder}: model_index.json lists {subfolder!r} but there is no {subfolder}/ folder")
    cls = _model_class(class_name)
    kwargs: dict[str, Any] = {"local_files_only": True, "variant": _variant(where)}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if not opts.allow_pickle:
        kwargs["use_safetensors"] = True  # never unpickle a .bin silently
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - every library error becomes one clear message
        hint = ""
        if not opts.allow_pickle and any(where.glob("*.bin")) and not any(where.glob("*.safetensors")):
            hint = " Its weights are a pickle (.bin): convert them to safetensors, or allow pickles (--allow-pickle)."
        raise CheckpointError(f"{where}: cannot load the {class_name}: {_first_line(e)}.{hint}") from e
    return _ready(model, opts)


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar from transformers: it would interleave with the run's own progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _ready(model: torch.nn.Module, opts: _Options) -> torch.nn.Module:
    """Move to the device/dtype, eval mode, no gradients; copy tensors still viewing the file (see module docstring)."""
    loaded = {name: t.data_ptr() for name, t in _tensors(model)}
    if getattr(model, "_keep_in_fp32_modules", None):
        model.to(device=opts.device, dtype=opts.dtype)  # the library's own .to() knows what must stay float32
    else:  # diffusers' .to() warns about keeping float32 modules even when there are none
        torch.nn.Module.to(model, device=opts.device, dtype=opts.dtype)
    if opts.clone:
        for name, t in _tensors(model):
            if t.data_ptr() == loaded.get(name):  # .to() did not copy it: still the loaded (mapped) memory
                t.data = t.data.clone()
    model.eval()
    model.requires_grad_(False)
    return model


def _tensors(model: torch.nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


# --- tokenizers -----------------------------------------------------------------------------


def _load_tokenizer(folder: Path, vocab_size: int | None):
    """A CLIPTokenizer from ``folder``; its vocabulary comes from the shipped CLIP BPE when the folder has none.

    A vocabulary of ``vocab_size`` < 49,408 tokens is the CLIP one cut after its first ``vocab_size - 514`` merges
    (still a valid BPE), which is what tiny test models use.
    """
    from transformers import CLIPTokenizer

    has_vocab = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
    try:
        if has_vocab:
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        else:
            with tempfile.TemporaryDirectory(prefix="nodegraph-tokenizer-") as tmp:
                tokenizer = CLIPTokenizer.from_pretrained(_assemble_tokenizer(folder, Path(tmp), vocab_size),
                                                          local_files_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {_first_line(e)}") from e
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the text encoder only "
                              f"{vocab_size}; pass config= with the model's own tokenizer")
    return tokenizer


def _assemble_tokenizer(settings_dir: Path, out: Path, vocab_size: int | None) -> Path:
    from .tokenizers import write_clip_tokenizer_subset

    vocab_size = vocab_size or _CLIP_VOCAB
    merges = vocab_size - _BYTE_TOKENS - _SPECIAL_TOKENS
    if not 0 <= merges <= _CLIP_VOCAB - _BYTE_TOKENS - _SPECIAL_TOKENS:
        raise CheckpointError(f"a text encoder vocabulary of {vocab_size} tokens is not a CLIP BPE vocabulary "
                              f"(at most {_CLIP_VOCAB}); pass config= with the model's own tokenizer")
    write_clip_tokenizer_subset(out, merges, CLIP_BPE_DIR)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the family's special tokens (pad "!"...)
        if (settings_dir / name).is_file():
            shutil.copyfile(settings_dir / name, out / name)
    return out


# --- single files ---------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read the safetensors data: {_first_line(e)}") from e


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: a pickle checkpoint (.ckpt/.pt), which can run arbitrary code when loaded, so it is refused. "
            f"Use a .safetensors version of the model, or allow pickles explicitly (--allow-pickle) if you trust "
            f"the file.")
    try:
        with path.open("rb") as f:  # a file object: torch.load would pick its reader from a path's extension
            data = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: cannot read the pickle with weights_only=True ({_first_line(e)}). It may hold objects other "
            f"than tensors, or be corrupt; a .safetensors version of the model avoids the problem.") from e
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):  # Lightning checkpoints wrap the weights
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(data).__name__}, not a dictionary of weights")
    return _flat_tensors(data)


def _flat_tensors(data: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a (possibly nested) dictionary, nested keys joined with dots (IP-Adapter .bin files keep
    {"image_proj": {...}, "ip_adapter": {...}})."""
    out: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value
        elif isinstance(value, Mapping):
            out.update(_flat_tensors(value, f"{prefix}{key}."))
    return out


def read_weights(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a single weights file, recognised by content: safetensors, or a pickle only when pickles are
    allowed (then with ``weights_only=True``)."""
    kind = detect(path)  # raises CheckpointError saying what the file is when it holds no weights
    if kind == "pickle":
        return _read_pickle(path, allow_pickle)
    return _read_safetensors(path)


def _load_single_file(path: Path, shapes: Mapping[str, Sequence[int]], read: Callable[[], dict[str, torch.Tensor]],
                      opts: _Options, config_dir: Path | None, with_unet: bool) -> _Parts:
    try:
        family = detect_family(shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    _require_parts(shapes, family, str(path))
    settings_dir = config_dir or family_config_dir(family)
    index = _read_json(settings_dir / "model_index.json")
    if config_dir is None:
        try:
            configs = derive_configs(shapes, family)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
    else:
        configs = {name: _read_json(config_dir / name / "config.json")
                   for name in ("unet", "vae", *_TEXT_ENCODERS[family])}
    tensors = read()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    settings_origin = f"from {config_dir}" if config_dir else "derived from the header"
    origin = f"{path} ({family}, configuration {settings_origin})"
    text: dict[str, Any] = {}  # text_encoder, tokenizer[, text_encoder_2, tokenizer_2]
    for name, (prefix, kind) in _TEXT_ENCODERS[family].items():
        text[name] = _build(_text_class(index, name, settings_dir), configs[name],
                            lambda model, p=prefix, k=kind: _convert_text(tensors, model, p, k), name.replace("_", " "),
                            origin, opts)
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        text[tokenizer_name] = _load_tokenizer(settings_dir / tokenizer_name, configs[name]["vocab_size"])
    unet = None
    if with_unet:
        unet = _build("UNet2DConditionModel", configs["unet"],
                      lambda _: convert_ldm_unet_checkpoint(tensors, configs["unet"]), "UNet", origin, opts)
    return _Parts(
        family=family,
        unet_config=configs["unet"],
        unet=unet,
        vae=_build("AutoencoderKL", configs["vae"], lambda _: convert_ldm_vae_checkpoint(tensors, configs["vae"]),
                   "VAE", origin, opts),
        text_encoder=text.pop("text_encoder"),
        tokenizer=text.pop("tokenizer"),
        scheduler_config=_read_json(settings_dir / "scheduler" / "scheduler_config.json"),
        source=f"single file {origin}",
        extra=text,
    )


def _convert_text(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module, prefix: str, kind: str) -> dict:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    if kind == "openclip":
        return convert_open_clip_checkpoint(model, tensors, prefix=prefix)
    # The transformers layout needs only the prefix removed (keep "text_model."; _build fits it to the model).
    strip = prefix[: -len("text_model.")]
    return {k[len(strip):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _build(class_name: str, config: Mapping, convert: Callable[[torch.nn.Module], dict], what: str, origin: str,
           opts: _Options) -> torch.nn.Module:
    """Build a model from ``config`` without allocating weights, then give it the converted tensors (strictly)."""
    from accelerate import init_empty_weights

    cls = _model_class(class_name)
    try:
        with init_empty_weights():  # parameters on the meta device; buffers (position ids) real
            if hasattr(cls, "from_config"):
                model = cls.from_config(dict(config))
            else:
                model = cls(cls.config_class.from_dict(dict(config)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{origin}: cannot build the {what} from its configuration: {_first_line(e)}") from e
    try:
        state = convert(model)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{origin}: cannot convert the {what} weights: {_first_line(e)}") from e
    expected = set(model.state_dict())
    # transformers >= 5 flattened CLIPTextModel (no "text_model." level); checkpoints keep it.
    state = {(k if k in expected or not k.startswith("text_model.") else k[len("text_model."):]): v
             for k, v in state.items()}
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in set(state) - expected if not k.endswith(_IGNORABLE))
    if missing or unexpected:
        raise CheckpointError(
            f"{origin}: the {what} weights do not fit a {class_name} of the expected configuration: "
            f"missing {_few(missing)}; unexpected {_few(unexpected)}. If the model has a non-standard architecture, "
            f"pass config= with its diffusers folder.")
    try:
        model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    except Exception as e:  # noqa: BLE001 - shape mismatches
        raise CheckpointError(f"{origin}: the {what} weights do not fit: {_first_line(e)}") from e
    return _ready(model, opts)


def _few(keys: Sequence[str], limit: int = 4) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --- hub ------------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a later change too.
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _fetch_from_hub(repo_id: str, where: Path) -> Path:
    """The local snapshot of hub repository ``repo_id``: from the hub cache, or downloaded when the hub is online;
    ``where``: the checkpoints folder, named in the error when neither can be had."""
    from huggingface_hub import snapshot_download

    hint = (f"Put the model in {where / repo_id.split('/')[-1]}/ as a diffusers folder (model_index.json, unet/, "
            f"vae/, text_encoder/, tokenizer/, scheduler/), or as a single .safetensors file in {where}/.")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache: download below, if allowed
        pass
    if _offline():
        raise CheckpointError(
            f"{repo_id!r} is not a local file or folder; as a hub repository it is not in the local hub cache, and "
            f"the hub is offline (HF_HUB_OFFLINE). {hint}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{repo_id!r}: could not download it from the hub ({_first_line(e)}). {hint}") from e
