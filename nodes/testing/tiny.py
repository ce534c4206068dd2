"""Tiny random-weight Stable-Diffusion-1.x model sets for tests and benchmarks.

The models have SD-1.x *geometry* (4 latent channels, VAE downscale 8, CLIP text encoder, LCM
scheduler) but only a few hundred thousand parameters, so a whole set builds in well under two
seconds on CPU and a 64x64 image takes milliseconds. Weights are random, seeded and deterministic:
the same arguments give byte-identical files.

* :func:`build_tiny_sd` writes a diffusers folder that loads offline with
  ``LatentConsistencyModelPipeline`` (``lcm=True``: the UNet has a guidance embedding,
  ``time_cond_proj_dim``) or ``StableDiffusionPipeline`` (``lcm=False``).
* :func:`write_single_file` turns such a folder into an original-LDM single-file checkpoint
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``),
  with a generic diffusers -> LDM key mapping (:func:`unet_to_ldm`, :func:`vae_to_ldm`,
  :func:`text_encoder_to_ldm`).
* :func:`write_clip_tokenizer_subset` (from :mod:`nodes.tokenizers`) writes a small CLIP tokenizer: the shipped one
  (``nodes/data/clip_tokenizer``) restricted to its first N merges.

Files follow the layout real SD checkpoints use, not whatever the installed libraries happen to
write: the text encoder's weights are stored under ``text_model.*`` (transformers 5 saves a
flattened layout that transformers 4 would silently ignore), and the tokenizer folder holds
``vocab.json`` + ``merges.txt`` (transformers 5 alone would write only ``tokenizer.json``).

diffusers and transformers are imported inside the builders: importing them takes seconds, and the
key mapping and tokenizer helpers need neither.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from ..tokenizers import (  # noqa: F401 (re-exported for the tests)
    SHIPPED_CLIP_TOKENIZER,
    TINY_TOKENIZER_MERGES,
    write_clip_tokenizer_subset,
)

#: Width of the tiny text encoder, hence the UNet's cross-attention width.
TEXT_HIDDEN = 32
#: Safetensors header metadata diffusers and transformers write ("pt" marks torch tensors).
_ST_METADATA = {"format": "pt"}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Diffusers folder
# --------------------------------------------------------------------------------------------


def _lcm_scheduler():
    """The LCMScheduler configuration of SimianLuo/LCM_Dreamshaper_v7 (SD-1.5 betas)."""
    from diffusers import LCMScheduler

    return LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=50,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
        timestep_scaling=10.0,
    )


def _tiny_unet(*, lcm: bool, layers_per_block: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
        # LCM-distilled UNets embed the guidance scale w through this projection.
        time_cond_proj_dim=32 if lcm else None,
    )


def _tiny_vae(*, sample_size: int):
    from diffusers import AutoencoderKL

    # Four blocks = three 2x downsamplings: the SD VAE scale factor of 8.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def tiny_text_encoder(tokenizer, hidden: int = TEXT_HIDDEN, intermediate: int = 37):
    """A random 2-layer CLIPTextModel whose vocabulary and special tokens are the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _save_text_encoder(model, out_dir: Path) -> None:
    """Save like ``save_pretrained``, but with the weights under ``text_model.*`` as in every SD checkpoint.

    transformers >= 5 flattens CLIPTextModel (``embeddings.*``, ``encoder.*``) and reads either
    layout; transformers 4 only reads ``text_model.*`` and would silently re-initialise the rest.
    """
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    weights = text_encoder_to_ldm(model.state_dict())
    save_file({k: v.contiguous() for k, v in weights.items()}, out_dir / "model.safetensors", metadata=_ST_METADATA)


def _with_prefix(key: str, prefix: str) -> str:
    return key if key.startswith(prefix) else prefix + key


def build_tiny_sd(
    out_dir: Path | str,
    *,
    lcm: bool,
    seed: int = 0,
    layers_per_block: int = 1,
    sample_size: int = 8,
    tokenizer_merges: int = TINY_TOKENIZER_MERGES,
) -> Path:
    """Write a tiny SD-1.x diffusers folder with random weights and return its path.

    ``lcm=True`` gives a ``LatentConsistencyModelPipeline`` whose UNet has ``time_cond_proj_dim=32``
    (guidance embedding); ``lcm=False`` a ``StableDiffusionPipeline`` (the LCM-LoRA setting). Both
    use an LCMScheduler, no safety checker and no feature extractor. ``sample_size`` is the UNet's
    latent size, so the default image is ``8 * sample_size`` pixels square (64).

    Deterministic: the global torch RNG is forked, seeded with ``seed`` and restored, and the same
    arguments produce byte-identical files.
    """
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_subset(out / "tokenizer", tokenizer_merges))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(lcm=lcm, layers_per_block=layers_per_block, sample_size=sample_size)
        vae = _tiny_vae(sample_size=8 * sample_size)
        text_encoder = tiny_text_encoder(tokenizer)
    scheduler = _lcm_scheduler()

    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    scheduler.save_pretrained(out / "scheduler")
    _save_text_encoder(text_encoder, out / "text_encoder")
    # The pipeline object only serves to write model_index.json in diffusers' own format.
    pipeline_class = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
    pipeline = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_config(out)
    return out


def build_tiny_sdxl(out_dir: Path | str, *, lcm: bool = False, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny SDXL diffusers folder (StableDiffusionXLPipeline layout) with random weights.

    Two text encoders (a CLIPTextModel and a CLIPTextModelWithProjection, hidden 32 each, so the UNet attends to
    64-wide embeddings), a UNet with SDXL's ``text_time`` added conditioning (the second encoder's pooled
    embedding and six size/crop numbers), and ``time_cond_proj_dim`` when ``lcm`` (an LCM-distilled SDXL UNet).
    Deterministic like :func:`build_tiny_sd`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_subset(out / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer_subset(out / "tokenizer_2"))
    time_dim, pooled = 8, TEXT_HIDDEN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            cross_attention_dim=2 * TEXT_HIDDEN, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled,
            time_cond_proj_dim=32 if lcm else None,
        )
        vae = _tiny_vae(sample_size=8 * sample_size)
        text_encoder = tiny_text_encoder(tokenizer)
        config = CLIPTextConfig(**{**text_encoder.config.to_dict(), "projection_dim": pooled})
        text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    scheduler = _lcm_scheduler()
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    scheduler.save_pretrained(out / "scheduler")
    _save_text_encoder(text_encoder, out / "text_encoder")
    text_encoder_2.save_pretrained(out / "text_encoder_2")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler).save_config(out)
    return out


# --------------------------------------------------------------------------------------------
# diffusers -> original LDM single file
# --------------------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    # No LDM equivalent (LCM-distilled UNets only). Kept under a name of our own so no weight is lost;
    # diffusers' LDM converter ignores the key (see write_single_file).
    "time_embedding.cond_proj": "time_embed.cond_proj",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_RESAMPLERS = {"downsamplers": "downsample", "upsamplers": "upsample"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_BLOCK_KEY = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_KEY = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename_module(rest: str, table: Mapping[str, str], key: str) -> str:
    """Rename the leading module path of ``rest`` (``"norm1.weight"``, ``"to_out.0.bias"``) via ``table``."""
    module, _, param = rest.rpartition(".")
    if module not in table:
        raise KeyError(f"no LDM name for {key!r}")
    return f"{table[module]}.{param}"


def _unet_key_to_ldm(key: str, layers: int, up_has_attention: list[bool]) -> str:
    module, _, param = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    n = layers + 1  # LDM slots per level: down = layers + 1 downsampler; up = layers + 1 resnets
    if m := _BLOCK_KEY.fullmatch(key):
        kind, i, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if part in ("downsamplers", "upsamplers"):
            if not rest.startswith("conv."):
                raise KeyError(f"no LDM name for {key!r}")
            if part == "downsamplers":
                return f"input_blocks.{(i + 1) * n}.0.op.{rest[len('conv.'):]}"
            # The upsampler sits after the last resnet (and its attention, if the level has one).
            return f"output_blocks.{i * n + layers}.{2 if up_has_attention[i] else 1}.{rest}"
        slot = f"input_blocks.{1 + i * n + j}" if kind == "down_blocks" else f"output_blocks.{i * n + j}"
        if part == "attentions":  # SpatialTransformer: diffusers kept the LDM names inside
            return f"{slot}.1.{rest}"
        return f"{slot}.0.{_rename_module(rest, _UNET_RESNET, key)}"
    if m := _MID_KEY.fullmatch(key):
        part, j, rest = m[1], int(m[2]), m[3]
        if part == "attentions":
            return f"middle_block.{2 * j + 1}.{rest}"
        return f"middle_block.{2 * j}.{_rename_module(rest, _UNET_RESNET, key)}"
    raise KeyError(f"no LDM name for {key!r}")


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to LDM ``openaimodel`` keys (no prefix).

    Generic over the number of levels and ``layers_per_block`` (an int, as in every SD-1.x/2.x
    UNet). ``time_embedding.cond_proj`` becomes ``time_embed.cond_proj`` (no LDM equivalent).
    Raises ``KeyError`` for modules the SD-1.x layout cannot hold (class/addition embeddings).
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("LDM layout needs a single int layers_per_block")
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    return {_unet_key_to_ldm(k, layers, up_has_attention): v for k, v in state_dict.items()}


def _vae_key_to_ldm(key: str, num_levels: int) -> str:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        raise KeyError(f"no LDM name for {key!r}")
    module, _, param = rest.rpartition(".")
    if module in _VAE_FIXED:
        return f"{coder}.{_VAE_FIXED[module]}.{param}"
    if m := _BLOCK_KEY.fullmatch(rest):
        kind, i, part, j, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
        # LDM numbers decoder levels from the lowest resolution up; diffusers from the top down.
        level = f"down.{i}" if kind == "down_blocks" else f"up.{num_levels - 1 - i}"
        if part == "resnets":
            return f"{coder}.{level}.block.{j}.{_rename_module(tail, _VAE_RESNET, key)}"
        if part in _VAE_RESAMPLERS and tail.startswith("conv."):
            return f"{coder}.{level}.{_VAE_RESAMPLERS[part]}.{tail}"
    elif m := _MID_KEY.fullmatch(rest):
        part, j, tail = m[1], int(m[2]), m[3]
        if part == "resnets":
            return f"{coder}.mid.block_{j + 1}.{_rename_module(tail, _VAE_RESNET, key)}"
        return f"{coder}.mid.attn_{j + 1}.{_rename_module(tail, _VAE_ATTENTION, key)}"
    raise KeyError(f"no LDM name for {key!r}")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM ``first_stage_model`` keys (no prefix).

    The mid-block attention's linear q/k/v/out weights become 1x1 convolutions, as in LDM.
    """
    num_levels = len(config["block_out_channels"])
    out = {}
    for key, value in state_dict.items():
        ldm_key = _vae_key_to_ldm(key, num_levels)
        if ".mid.attn_" in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[ldm_key] = value
    return out


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` keys in the ``text_model.*`` layout (either transformers layout accepted)."""
    return {_with_prefix(k, "text_model."): v for k, v in state_dict.items()}


def _read_component(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and config of one diffusers/transformers component folder (single safetensors file)."""
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected exactly one .safetensors file in {folder}, found {len(files)}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return load_file(files[0]), config


def write_single_file(diffusers_dir: Path | str, out_path: Path | str) -> Path:
    """Write an SD-1.x diffusers folder as one original-LDM ``.safetensors`` checkpoint.

    Keys: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
    ``cond_stage_model.transformer.text_model.*`` (CLIP text encoder); tensors are stored unchanged
    except the VAE attention reshape. diffusers' own converters
    (``convert_ldm_{unet,vae,clip}_checkpoint``) read the file back to the folder's exact weights.

    LCM-distilled UNets (``lcm=True``): ``time_embedding.cond_proj.weight`` has no LDM name and is
    written as ``model.diffusion_model.time_embed.cond_proj.weight``. diffusers' converter drops that
    key, so ``from_single_file(path, config=<lcm folder>)`` fails on the missing weight ("Cannot copy
    out of meta tensor") and with an SD config the guidance embedding is silently lost. Real
    single-file "LCM" checkpoints are SD models with the LCM-LoRA fused in, i.e. ``lcm=False``.
    """
    folder = Path(diffusers_dir)
    converters: dict[str, tuple[str, Callable[[dict, dict], dict]]] = {
        "unet": (UNET_PREFIX, unet_to_ldm),
        "vae": (VAE_PREFIX, vae_to_ldm),
        "text_encoder": (TEXT_ENCODER_PREFIX, lambda sd, _config: text_encoder_to_ldm(sd)),
    }
    checkpoint: dict[str, torch.Tensor] = {}
    for component, (prefix, convert) in converters.items():
        state, config = _read_component(folder / component)
        checkpoint.update({prefix + k: v.contiguous() for k, v in convert(state, config).items()})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, out, metadata=_ST_METADATA)
    return out
