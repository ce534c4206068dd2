"""What a checkpoint is, read from its content: the kind of path (diffusers folder, UNet folder, single file,
pickle, hub id), and for an original-layout (LDM / sgm) single file its model family and UNet architecture, from
the tensor names and shapes of its header alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from nodegraph.folders import list_entries

from .errors import CheckpointError
from .hub import looks_like_hub_id
from .weights import CHECKPOINT_SUFFIXES, file_kind

# Key prefixes of the original single-file layout.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
_CLIP_SD = "cond_stage_model.transformer.text_model."  # OpenAI CLIP ViT-L (transformers layout): SD 1.x
_OPENCLIP_SD = "cond_stage_model.model."  # OpenCLIP ViT-H: SD 2.x
_CLIP_XL = "conditioner.embedders.0.transformer.text_model."  # SDXL's first text encoder (CLIP ViT-L)
_OPENCLIP_XL = "conditioner.embedders.1.model."  # SDXL's second text encoder (OpenCLIP ViT-bigG)
#: Text encoders of each family: component name -> (key prefix, "clip" (transformers layout) | "openclip").
TEXT_ENCODERS = {
    "sd1": {"text_encoder": (_CLIP_SD, "clip")},
    "sd2": {"text_encoder": (_OPENCLIP_SD, "openclip")},
    "sdxl": {"text_encoder": (_CLIP_XL, "clip"), "text_encoder_2": (_OPENCLIP_XL, "openclip")},
}
TEXT_ENCODERS["ssd1b"] = TEXT_ENCODERS["sdxl"]


# --------------------------------------------------------------------------------------------
# Kinds of checkpoint
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
        if config_class(p) == "UNet2DConditionModel":
            return "unet_folder"
        raise CheckpointError(
            f"{p}: this folder is neither a diffusers pipeline (no model_index.json) nor a UNet folder (config.json "
            f"of a UNet2DConditionModel). Point to the pipeline folder itself, or to a single checkpoint file.")
    if p.is_file():
        return file_kind(p)
    if looks_like_hub_id(path):
        return "hub"
    raise CheckpointError(f"{p}: no such file or folder")


def config_class(folder: Path) -> str | None:
    """The ``_class_name`` of a diffusers model folder's config.json; None without a readable one."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def is_checkpoint_folder(path: Path) -> bool | None:
    """True for a folder :func:`load_components` loads whole (a diffusers pipeline or a UNet folder); None for
    any other folder, which may hold checkpoints (``Folder.entry_dir``)."""
    return True if (path / "model_index.json").is_file() or config_class(path) == "UNet2DConditionModel" else None


def list_checkpoints(folder: Path | str) -> list[str]:
    """Names, relative to ``folder`` and with "/" separators, of what :func:`load_components` may load there:
    diffusers and UNet folders as folders, other files by extension (.safetensors, .ckpt, .pt, .pth)."""
    return list_entries(Path(folder), CHECKPOINT_SUFFIXES, is_checkpoint_folder)


# --------------------------------------------------------------------------------------------
# UNet architecture from tensor shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """The architecture of an original-layout UNet, read from tensor shapes."""

    in_channels: int
    out_channels: int | None  # None: the encoder half only (a ControlNet)
    channels: tuple[int, ...]  # per level
    layers: int  # resnets per down level
    down: tuple[tuple[int, ...], ...]  # transformer blocks per down level and layer (0: no attention)
    up: tuple[tuple[int, ...], ...]  # per up level (diffusers order: deepest first) and layer; () for the encoder
    mid: int | None  # transformer blocks of the middle block; None: no attention there
    has_mid_block: bool
    cross_attention_dim: int | None
    linear_projection: bool  # SD 2.x / SDXL use Linear proj_in/out, SD 1.x 1x1 convolutions
    addition_in: int | None  # SDXL's label_emb input width (micro-conditioning + pooled text)


def strip(shapes: Mapping[str, Sequence[int]], prefix: str) -> dict[str, tuple[int, ...]]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def indices(keys: Iterable[str], prefix: str) -> list[int]:
    """The integers that follow ``prefix`` in ``keys`` (block or layer numbers), sorted."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def unet_layout(shapes: Mapping[str, Sequence[int]], prefix: str = UNET, *, decoder: bool = True) -> UNetLayout:
    """The UNet architecture of the weights under ``prefix``. ``decoder=False`` reads the encoder half only (input
    and middle blocks), which is all a ControlNet has."""
    s = strip(shapes, prefix)
    try:
        in_channels = s["input_blocks.0.0.weight"][1]
        out_channels = s["out.2.weight"][0] if decoder else None
        blocks = indices(s, "input_blocks.")
        downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in s]
        # Level i holds `layers` resnets (input blocks 1 + i*(layers+1) + j) and then a downsampler.
        layers = downsamplers[0] - 1 if downsamplers else max(blocks)
        n = layers + 1
        levels = len(downsamplers) + 1
        channels = tuple(s[f"input_blocks.{1 + i * n}.0.out_layers.3.weight"][0] for i in range(levels))
    except (KeyError, IndexError, ValueError) as e:
        under = f" under {prefix}*" if prefix else ""
        raise CheckpointError(f"unrecognised {'UNet' if decoder else 'ControlNet'} layout{under} (missing {e})") from e

    def depth(block: str) -> int:
        return len(indices(s, f"{block}.transformer_blocks."))

    return UNetLayout(
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        layers=layers,
        down=tuple(tuple(depth(f"input_blocks.{1 + i * n + j}.1") for j in range(layers)) for i in range(levels)),
        up=tuple(tuple(depth(f"output_blocks.{i * n + j}.1") for j in range(n)) for i in range(levels)) if decoder
        else (),
        mid=depth("middle_block.1") if "middle_block.1.proj_in.weight" in s else None,
        has_mid_block=any(k.startswith("middle_block.") for k in s),
        cross_attention_dim=next((v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight")), None),
        linear_projection=any(k.endswith(".proj_in.weight") and len(v) == 2 for k, v in s.items()),
        addition_in=s["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in s else None,
    )


def _is_reduced_sdxl(layout: UNetLayout) -> bool:
    """SSD-1B and kin: SDXL with transformer blocks removed, so the up path no longer mirrors the down path."""
    mirrored = all(set(up) <= {layout.down[-1 - i][0] if layout.down[-1 - i] else 0}
                   for i, up in enumerate(layout.up))
    uniform = all(len(set(level)) <= 1 for level in layout.down)
    return not (mirrored and uniform and layout.mid == (layout.down[-1][0] if layout.down[-1] else None))


# --------------------------------------------------------------------------------------------
# Model family of a single file
# --------------------------------------------------------------------------------------------


def _text_width(shapes: Mapping[str, Sequence[int]], prefix: str, layout: str) -> int | None:
    key = prefix + ("embeddings.token_embedding.weight" if layout == "clip" else "token_embedding.weight")
    return tuple(shapes[key])[1] if key in shapes else None


def has(shapes: Mapping[str, Any], prefix: str) -> bool:
    """Whether any key starts with ``prefix``."""
    return any(k.startswith(prefix) for k in shapes)


def detect_family(shapes: Mapping[str, Sequence[int]]) -> str:
    """The model family ("sd1", "sd2", "sdxl", "ssd1b") of an original-layout checkpoint, from keys and shapes.

    The text encoder layout decides (OpenAI CLIP under ``cond_stage_model.transformer``: SD 1.x; OpenCLIP under
    ``cond_stage_model.model``: SD 2.x; two ``conditioner.embedders``: SDXL, or SSD-1B when the UNet's transformer
    blocks are reduced), checked against the UNet's cross-attention width. Without a text encoder, that width
    decides (768: SD 1.x, 1024: SD 2.x, 2048: SDXL). Anything else raises :class:`CheckpointError` naming what the
    file seems to be (a VAE, a LoRA, a ControlNet...) and what it holds.
    """
    layout = unet_layout(shapes) if has(shapes, UNET) else None
    if has(shapes, "conditioner.embedders."):
        if not (has(shapes, _CLIP_XL) and has(shapes, _OPENCLIP_XL)):
            if has(shapes, "conditioner.embedders.0.model."):
                raise CheckpointError("an SDXL refiner (a single OpenCLIP text encoder), which is not supported")
            raise CheckpointError(f"an SDXL-like checkpoint with unknown text encoders: {_summary(shapes)}")
        family = "ssd1b" if layout is not None and _is_reduced_sdxl(layout) else "sdxl"
    elif has(shapes, _OPENCLIP_SD):
        family = "sd2"
    elif has(shapes, _CLIP_SD):
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
        widths = [_text_width(shapes, prefix, kind) for prefix, kind in TEXT_ENCODERS[family].values()]
        if all(widths) and sum(widths) != layout.cross_attention_dim:
            raise CheckpointError(
                f"a {family} checkpoint whose UNet attends to {layout.cross_attention_dim}-wide text features but "
                f"whose text encoder(s) give {' + '.join(map(str, widths))}: the parts do not belong together")
    return family


def _what_is_it(shapes: Mapping[str, Sequence[int]]) -> str:
    keys = list(shapes)
    if any("lora_" in k or ".lora_A." in k or ".lora_down." in k for k in keys):
        what = "a LoRA (low-rank adapter weights), to be applied on top of a checkpoint"
    elif keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE)) for k in keys):
        what = "a standalone VAE (encoder/decoder weights only), not a full checkpoint"
    elif any(has(shapes, p) for p in ("control_model.", "input_hint_block.", "controlnet_cond_embedding.")):
        what = "a ControlNet, not a full checkpoint"
    elif "conv_in.weight" in shapes and has(shapes, "down_blocks."):
        what = ("diffusers-format model weights (down_blocks.*): put the file in a folder next to its config.json, or "
                "use the whole diffusers pipeline folder")
    elif has(shapes, "text_model.") or has(shapes, "embeddings.token_embedding."):
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


def require_parts(shapes: Mapping[str, Any], family: str, where: str) -> None:
    """A clear error for a single file that lacks a part (UNet, VAE, text encoders) or has one it cannot name."""
    wanted = {"UNet": UNET, "VAE": VAE}
    wanted.update({name.replace("_", " "): prefix for name, (prefix, _) in TEXT_ENCODERS[family].items()})
    missing = [f"{name} ({prefix}*)" for name, prefix in wanted.items() if not has(shapes, prefix)]
    if missing:
        raise CheckpointError(
            f"{where}: this {family} checkpoint has no {', '.join(missing)}; it holds {_summary(shapes)}. "
            f"A single file must contain the UNet, the VAE and the text encoder(s).")
    if UNET + "time_embed.cond_proj.weight" in shapes:
        raise CheckpointError(
            f"{where}: the UNet has an LCM guidance embedding (time_embed.cond_proj), which the original single-file "
            f"layout has no name for. Load an LCM-distilled UNet from its diffusers unet folder (config.json + "
            f"diffusion_pytorch_model.safetensors) over a base checkpoint, or use a checkpoint with the LCM-LoRA "
            f"fused in.")
