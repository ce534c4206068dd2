"""Diffusers configurations for original-layout single files, which hold weights but no configuration.

``configs/<family>/`` ships each family's diffusers configuration as small JSON files (no weights). The size fields
(channels, layers, widths, vocabulary...) are derived from the header's shapes (:func:`derive_configs`), so
non-standard sizes, such as the tiny test models, load too; fields that shapes cannot reveal (attention heads, norm
groups, activations) come from the family's configuration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from .detect import TEXT_ENCODERS, VAE, UNetLayout, detect_family, has, indices, strip, unet_layout
from .errors import CheckpointError

FAMILIES = ("sd1", "sd2", "sdxl", "ssd1b")
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a :class:`CheckpointError` naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


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
    layout = unet_layout(shapes)
    configs = {}
    pooled = None
    for name, (prefix, kind) in TEXT_ENCODERS[family].items():
        configs[name] = _derive_text(read_json(folder / name / "config.json"), shapes, prefix, kind)
        if name == "text_encoder_2":
            pooled = configs[name]["projection_dim"]
    configs["unet"] = _derive_unet(read_json(folder / "unet" / "config.json"), layout, pooled)
    configs["vae"] = _derive_vae(read_json(folder / "vae" / "config.json"), shapes)
    return configs


def head_count(width: int, head_width: int) -> int:
    """Attention heads for a non-standard width: the family's head width if it divides, else 8-wide heads."""
    for w in (head_width, 8):
        if width % w == 0:
            return width // w
    return 1


def norm_groups(preferred: int, channels: Sequence[int]) -> int:
    """GroupNorm groups: the family's value if it divides every channel count, else the largest divisor below it."""
    common = math.gcd(*channels)
    return max(d for d in range(1, min(preferred, common) + 1) if common % d == 0)


def _derive_unet(base: dict, lay: UNetLayout, pooled_width: int | None) -> dict:
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
                head_count(c, 64) for c in lay.channels]
        else:  # SD 2.x / SDXL: heads of a fixed width (64)
            head_width = base["block_out_channels"][0] // heads[0]
            cfg["attention_head_dim"] = [head_count(c, head_width) for c in lay.channels]
        cfg["norm_num_groups"] = norm_groups(base["norm_num_groups"], lay.channels)
    if lay.addition_in is not None:
        # label_emb takes 6 embedded size/crop numbers plus the pooled text embedding of the second text encoder.
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=lay.addition_in)
        if pooled_width is not None:
            cfg["addition_time_embed_dim"] = (lay.addition_in - pooled_width) // 6
    return cfg


def _derive_vae(base: dict, shapes: Mapping[str, Sequence[int]]) -> dict:
    s = strip(shapes, VAE)
    try:
        levels = len(indices(s, "encoder.down."))
        channels = [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
        cfg = dict(base)
        cfg.update(
            in_channels=s["encoder.conv_in.weight"][1],
            out_channels=s["decoder.conv_out.weight"][0],
            latent_channels=s["decoder.conv_in.weight"][1],
            block_out_channels=channels,
            layers_per_block=len(indices(s, "encoder.down.0.block.")),
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            use_quant_conv="quant_conv.weight" in s,
            use_post_quant_conv="post_quant_conv.weight" in s,
            mid_block_add_attention=has(s, "encoder.mid.attn_1."),
        )
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"unrecognised VAE layout under {VAE}* (missing {e})") from e
    if channels != list(base["block_out_channels"]):
        cfg["norm_num_groups"] = norm_groups(base["norm_num_groups"], channels)
    return cfg


def _derive_text(base: dict, shapes: Mapping[str, Sequence[int]], prefix: str, layout: str) -> dict:
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    try:
        if layout == "clip":
            vocab, hidden = shapes[prefix + "embeddings.token_embedding.weight"]
            positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
            layers = len(indices(shapes, prefix + "encoder.layers."))
            intermediate = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
            projection = None
        else:
            vocab, hidden = shapes[prefix + "token_embedding.weight"]
            positions = shapes[prefix + "positional_embedding"][0]
            # diffusers' converter drops SD 2's last OpenCLIP layer (SD 2 conditions on the penultimate one).
            kept = [k for k in shapes if k not in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE]
            layers = len(indices(kept, prefix + "transformer.resblocks."))
            intermediate = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
            projection = tuple(shapes[prefix + "text_projection"])[1] if prefix + "text_projection" in shapes else None
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"unrecognised text encoder layout under {prefix}* (missing {e})") from e
    cfg = dict(base)
    if hidden != base["hidden_size"]:
        cfg.update(num_attention_heads=head_count(hidden, 64), projection_dim=hidden)
    if projection is not None and "CLIPTextModelWithProjection" in base.get("architectures", ()):
        cfg["projection_dim"] = projection
    cfg.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions, num_hidden_layers=layers,
               intermediate_size=intermediate)
    return cfg
