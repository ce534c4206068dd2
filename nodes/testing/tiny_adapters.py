"""Tiny random-weight adapters for the tiny models of :mod:`nodes.testing.tiny`: ControlNets and T2I-Adapters
(diffusers folders and original-layout single files), LoRA files in the layouts trainers write (kohya, kohya with
LDM block names, peft, peft with diffusers' metadata), and IP-Adapters with their CLIP vision encoders.

Like the models, they are seeded and deterministic, and build in well under a second on a CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from .tiny import (
    _ST_METADATA,
    _read_component,
    _unet_key_to_ldm,
    _with_prefix,
)

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


# --------------------------------------------------------------------------------------------
# AnimateDiff motion module
# --------------------------------------------------------------------------------------------


def build_tiny_motion_adapter(unet_dir: Path | str, out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny MotionAdapter diffusers folder that fits the UNet folder ``unet_dir`` (its block widths and
    layers per block), with the released modules' 8 heads and 32 norm groups. A fresh adapter's output projections
    are zero (the UNet's images would not move): they get random weights here so that a test can see the motion
    layers act."""
    from diffusers import MotionAdapter

    config = json.loads((Path(unet_dir) / "config.json").read_text())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        adapter = MotionAdapter(block_out_channels=tuple(config["block_out_channels"]),
                                motion_layers_per_block=config["layers_per_block"],
                                motion_norm_num_groups=32, motion_num_attention_heads=8,
                                motion_max_seq_length=32)
        with torch.no_grad():
            for name, param in adapter.named_parameters():
                if name.endswith("proj_out.weight") or name.endswith("proj_out.bias"):
                    param.normal_(0.0, 0.2)
    out = Path(out_dir)
    adapter.save_pretrained(out)
    return out


def motion_adapter_to_original(adapter_dir: Path | str, out_path: Path | str) -> Path:
    """Write a MotionAdapter folder as an original AnimateDiff single file (``temporal_transformer``,
    ``attention_blocks.N``, ``norms.N``, ``ff_norm`` and a ``pos_encoder.pe`` per attention block)."""
    state = load_file(str(Path(adapter_dir) / "diffusion_pytorch_model.safetensors"))
    out = {}
    for key, value in state.items():
        head, sep, rest = key.partition(".motion_modules.")
        index, _, rest = rest.partition(".")
        if rest.endswith("pos_embed.pe"):
            block = rest[: -len("pos_embed.pe")]
            for attention in (0, 1):
                name = f"{head}{sep}{index}.temporal_transformer.{block}attention_blocks.{attention}.pos_encoder.pe"
                out[name] = value.clone()
            continue
        for new, old in ((".norm1", ".norms.0"), (".norm2", ".norms.1"), (".norm3", ".ff_norm"),
                         (".attn1", ".attention_blocks.0"), (".attn2", ".attention_blocks.1")):
            rest = rest.replace(new, old)
        out[f"{head}{sep}{index}.temporal_transformer.{rest}"] = value.contiguous()
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, path, metadata=_ST_METADATA)
    return path


def build_tiny_taesd(out_dir: Path | str, original_dir: Path | str | None = None, seed: int = 0,
                     prefix: str = "taesd") -> Path:
    """Write a tiny random AutoencoderTiny (TAESD's layout with 8 channels and fewer blocks) as a diffusers
    folder, and with ``original_dir`` also as madebyollin's two files ``{prefix}_encoder.safetensors`` and
    ``{prefix}_decoder.safetensors`` (ComfyUI's vae_approx/ layout)."""
    from diffusers import AutoencoderTiny

    from nodes.image_ops import tiny_to_original

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                              num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 1, 2, 1))
        with torch.no_grad():  # wider weights than the default init, so that decoded colours vary visibly
            for param in vae.parameters():
                param.mul_(1.5)
    out = Path(out_dir)
    vae.save_pretrained(out)
    if original_dir is not None:
        encoder, decoder = tiny_to_original(vae.state_dict())
        folder = Path(original_dir)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in encoder.items()}, folder / f"{prefix}_encoder.safetensors")
        save_file({k: v.contiguous() for k, v in decoder.items()}, folder / f"{prefix}_decoder.safetensors")
    return out
