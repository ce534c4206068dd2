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


# --------------------------------------------------------------------------------------------
# ControlNet and T2I-Adapter
# --------------------------------------------------------------------------------------------


def build_tiny_controlnet(sd_dir: Path | str, out_dir: Path | str, seed: int = 0, *, scale: float = 0.3,
                          cross_attention_dim: int | None = None) -> Path:
    """Write a tiny ControlNet diffusers folder made from the UNet of the tiny SD folder ``sd_dir``.

    ``ControlNetModel.from_unet`` copies the UNet's encoder; the hint encoder has one level per VAE level, so that
    it downsamples the control image exactly as the VAE downsamples pixels (``conditioning_embedding_out_channels``
    of length log2(VAE scale factor) + 1, the VAE's own widths). A fresh ControlNet's "zero" convolutions (the
    outputs and the hint encoder's last layer) are zero, so it would change nothing: they are drawn from a seeded
    normal distribution of standard deviation ``scale`` instead, so the control has a visible effect.

    ``cross_attention_dim`` other than the UNet's gives a ControlNet of another family (for wrong-family tests): the
    weights then come from a fresh UNet of that width instead of ``sd_dir``'s.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    sd = Path(sd_dir)
    unet = UNet2DConditionModel.from_pretrained(sd / "unet", local_files_only=True)
    vae_config = json.loads((sd / "vae" / "config.json").read_text(encoding="utf-8"))
    hint_channels = tuple(vae_config["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cross_attention_dim is not None and cross_attention_dim != unet.config.cross_attention_dim:
            unet = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": cross_attention_dim,
                                                     "time_cond_proj_dim": None})
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.normal_(0.0, scale)
                conv.bias.normal_(0.0, scale)
    out = Path(out_dir)
    controlnet.save_pretrained(out)
    return out


def build_tiny_t2i_adapter(out_dir: Path | str, seed: int = 0, *, channels: tuple[int, ...] = (32, 64),
                           downscale_factor: int = 8, num_res_blocks: int = 1) -> Path:
    """Write a tiny full T2I-Adapter diffusers folder for the tiny SD UNet: one feature map per UNet level
    (``channels`` must be the UNet's ``block_out_channels``), the first at the latent's size (``downscale_factor``
    must be the VAE's scale factor). Its weights are random (seeded), so it changes images visibly."""
    from diffusers import T2IAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = T2IAdapter(in_channels=3, channels=list(channels), num_res_blocks=num_res_blocks,
                             downscale_factor=downscale_factor, adapter_type="full_adapter")
    out = Path(out_dir)
    adapter.save_pretrained(out)
    return out


def controlnet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``ControlNetModel`` state dict to the original (lllyasviel) layout, without prefix:
    the UNet encoder as in :func:`unet_to_ldm`, ``input_hint_block.{0, 2, ..., 2m}`` for the hint encoder (its
    SiLUs take the odd slots), ``zero_convs.N.0`` and ``middle_block_out.0`` for the output convolutions."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("the original layout needs a single int layers_per_block")
    n_hint = len(config["conditioning_embedding_out_channels"])
    last_hint = 2 * (2 * (n_hint - 1) + 1)
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if module == "controlnet_cond_embedding.conv_in":
            new = f"input_hint_block.0.{param}"
        elif module == "controlnet_cond_embedding.conv_out":
            new = f"input_hint_block.{last_hint}.{param}"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
            new = f"input_hint_block.{2 * (int(m[1]) + 1)}.{param}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
            new = f"zero_convs.{m[1]}.0.{param}"
        elif module == "controlnet_mid_block":
            new = f"middle_block_out.0.{param}"
        else:
            new = _unet_key_to_ldm(key, layers, [])
        out[new] = value
    return out


def write_controlnet_single_file(controlnet_dir: Path | str, out_path: Path | str, prefix: str = "") -> Path:
    """Write a ControlNet diffusers folder as one original-layout ``.safetensors`` file (keys as lllyasviel's
    files name them, optionally under ``prefix`` such as ``"control_model."``)."""
    state, config = _read_component(Path(controlnet_dir))
    weights = {prefix + k: v.contiguous() for k, v in controlnet_to_ldm(state, config).items()}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, out, metadata=_ST_METADATA)
    return out


# --------------------------------------------------------------------------------------------
# Tiny LoRA files
# --------------------------------------------------------------------------------------------

#: UNet modules a tiny LoRA targets: the attention blocks' projections and the resnets' layers (LoCon style).
_LORA_UNET_LEAVES = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "time_emb_proj")
#: Text-encoder modules a tiny LoRA targets (kohya's lora_te_* set).
_LORA_TEXT_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
#: What LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) also targets: every conv and linear layer of the UNet.
_LORA_UNET_EVERYWHERE = ("conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out",
                         "time_embedding.linear_1", "time_embedding.linear_2")
LORA_FORMATS = ("kohya", "kohya_ldm", "peft", "peft_meta")


def _lora_targets(model, leaves, *, top_level: bool = False) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(
                name == leaf or name.endswith("." + leaf) for leaf in leaves):
            if top_level or name.startswith(("down_blocks", "mid_block", "up_blocks", "encoder.", "text_model.")):
                out.append((name, module))
    return out


def _lora_pair(module: torch.nn.Module, rank: int, generator: torch.Generator, std: float):
    """Random (down, up) factors shaped as peft shapes them: down like the layer's input side (kernel included),
    up a 1x1 map from the rank to the outputs."""
    if isinstance(module, torch.nn.Conv2d):
        down_shape = (rank, module.in_channels, *module.kernel_size)
        up_shape = (module.out_channels, rank, 1, 1)
    else:
        down_shape = (rank, module.in_features)
        up_shape = (module.out_features, rank)
    down = torch.randn(down_shape, generator=generator) * std
    up = torch.randn(up_shape, generator=generator) * std
    return down.contiguous(), up.contiguous()


def write_tiny_lora(
    unet,
    text_encoder,
    out_path: Path | str,
    *,
    fmt: str = "kohya",
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    std: float = 0.2,
    text: bool = True,
    unet_layers: bool = True,
    everywhere: bool = False,
) -> Path:
    """Write a random LoRA for a tiny (SD-1.x layout) ``unet`` / ``text_encoder`` pair and return its path.

    ``fmt``:

    * ``"kohya"``: ``lora_unet_<diffusers module path, '.' -> '_'>`` and ``lora_te_text_model_...`` keys with
      ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (sd-scripts' layout for SD 1.x);
    * ``"kohya_ldm"``: the same, with the UNet modules under their original-SD (LDM) names
      (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``, ``..._input_blocks_1_0_in_layers_2``);
    * ``"peft"``: diffusers/peft keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and
      ``text_encoder.text_model.<module>...``; no alpha anywhere, so readers take alpha = rank (scale 1);
    * ``"peft_meta"``: as ``"peft"`` plus the ``lora_adapter_metadata`` header diffusers' ``save_lora_weights``
      writes (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``, same for ``text_encoder``).

    ``alpha`` defaults to ``rank`` (scale 1); kohya formats store it per module, ``peft_meta`` in the metadata.
    ``everywhere=True`` targets every layer LCM-LoRA targets (also conv_in/out, the time embedding, shortcuts,
    down- and upsamplers); not with ``"kohya_ldm"``, whose upsampler names diffusers' converter misplaces.
    Deterministic: the same arguments give byte-identical files.
    """
    if fmt not in LORA_FORMATS:
        raise ValueError(f"fmt must be one of {LORA_FORMATS}, got {fmt!r}")
    alpha = float(rank if alpha is None else alpha)
    generator = torch.Generator().manual_seed(seed)
    parts: list[tuple[str, str, torch.nn.Module]] = []
    if unet_layers:
        leaves = _LORA_UNET_LEAVES + (_LORA_UNET_EVERYWHERE if everywhere else ())
        parts += [("unet", name, module) for name, module in _lora_targets(unet, leaves, top_level=everywhere)]
    if text:
        parts += [("text_encoder", _with_prefix(name, "text_model."), module)
                  for name, module in _lora_targets(text_encoder, _LORA_TEXT_LEAVES)]
    layers_per_block = unet.config.layers_per_block
    up_has_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    weights: dict[str, torch.Tensor] = {}
    metadata = dict(_ST_METADATA)
    for component, name, module in parts:
        down, up = _lora_pair(module, rank, generator, std)
        if fmt in ("kohya", "kohya_ldm"):
            path = name
            if component == "unet" and fmt == "kohya_ldm":
                if not isinstance(layers_per_block, int):
                    raise ValueError("LDM names need a single int layers_per_block")
                path = _unet_key_to_ldm(f"{name}.weight", layers_per_block, up_has_attention)
                path = path.removesuffix(".weight")
            stem = ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")
            weights[f"{stem}.lora_down.weight"] = down
            weights[f"{stem}.lora_up.weight"] = up
            weights[f"{stem}.alpha"] = torch.tensor(alpha)
        else:
            weights[f"{component}.{name}.lora_A.weight"] = down
            weights[f"{component}.{name}.lora_B.weight"] = up
    if fmt == "peft_meta":
        adapter = {}
        for component in sorted({c for c, _, _ in parts}):
            targets = sorted({n.removeprefix("text_model.") for c, n, _ in parts if c == component})
            adapter.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                            f"{component}.target_modules": targets})
        metadata["lora_adapter_metadata"] = json.dumps(adapter, indent=2, sort_keys=True)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, out, metadata=metadata)
    return out


def write_sdxl_shaped_lora(out_path: Path | str, *, rank: int = 4, seed: int = 0) -> Path:
    """Write a small kohya LoRA shaped like one for SDXL (LDM block names, 2048-wide cross-attention, a second
    text encoder ``lora_te2_*`` of width 1280): something an SD-1.x model must refuse."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (640, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v": (640, 2048),
        "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_q": (1280, 1280),
        "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_2": (1280, 5120),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
        "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280),
    }
    weights = {}
    for stem, (out_features, in_features) in shapes.items():
        weights[f"{stem}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
        weights[f"{stem}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
        weights[f"{stem}.alpha"] = torch.tensor(float(rank))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, out, metadata=dict(_ST_METADATA))
    return out


# --------------------------------------------------------------------------------------------
# IP-Adapter
# --------------------------------------------------------------------------------------------


def build_tiny_image_encoder(out_dir: Path | str, seed: int = 0, *, hidden: int = 64, projection_dim: int = 24,
                             image_size: int = 32, patch_size: int = 8) -> Path:
    """Write a tiny CLIPVisionModelWithProjection folder (config.json + model.safetensors). One attention head per
    64 channels and gelu, as the single-file loader assumes for widths outside CLIP's standard ones."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection_dim,
                              num_hidden_layers=2, num_attention_heads=max(1, hidden // 64), image_size=image_size,
                              patch_size=patch_size, hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_image_encoder_single_file(encoder_dir: Path | str, out_path: Path | str) -> Path:
    """The encoder folder's weights as one safetensors file (``vision_model.*``, ``visual_projection.weight``), the
    layout of ComfyUI's clip_vision files."""
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(encoder_dir, local_files_only=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out, metadata=_ST_METADATA)
    return out


def write_tiny_ip_adapter(unet_dir: Path | str, out_path: Path | str, seed: int = 0, *, image_embed_dim: int = 24,
                          tokens: int = 4, std: float = 0.3) -> Path:
    """Write a basic IP-Adapter file (h94's key layout) for the UNet in ``unet_dir``: an image projection to
    ``tokens`` tokens and one to_k_ip/to_v_ip pair per cross-attention layer, numbered 1, 3, 5, ... in diffusers'
    attn_processors order. Weights are seeded normals of standard deviation ``std``, so the image has an effect."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True)
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    state = {"image_proj.proj.weight": normal(tokens * dim, image_embed_dim),
             "image_proj.proj.bias": normal(tokens * dim),
             "image_proj.norm.weight": 1 + normal(dim), "image_proj.norm.bias": normal(dim)}
    n = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name[: -len(".processor")]).to_k.weight.shape[0]
            state[f"ip_adapter.{n}.to_k_ip.weight"] = normal(inner, dim)
            state[f"ip_adapter.{n}.to_v_ip.weight"] = normal(inner, dim)
            n += 2
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out, metadata=_ST_METADATA)
    return out
