"""Tests for nodes.loading: every checkpoint format, family detection, configuration derivation and bad input.

Everything runs offline on tiny random-weight models (built once per module). SD 2.x / SDXL / SSD-1B single files
are written here from tiny diffusers models with the original key layout; real-size layouts are checked on
headers only (models built on the meta device: shapes, no weights).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # effective when huggingface_hub is not imported yet

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from nodes.loading import (
    CONFIGS_DIR,
    CheckpointError,
    Components,
    derive_configs,
    detect,
    detect_family,
    is_safetensors,
    list_checkpoints,
    load_components,
    looks_like_hub_id,
    read_header,
)
from nodes.testing.tiny import (
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    build_tiny_sd,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    write_single_file,
)

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import, possibly before this module set it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def load(path, **kwargs) -> Components:
    return load_components(path, device=CPU, dtype=F32, **kwargs)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------------------------
# Original-layout writers for the SD 2.x / SDXL parts tiny.py does not cover
# --------------------------------------------------------------------------------------------

_OPENCLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def openclip_to_ldm(state: dict) -> dict:
    """A CLIPTextModel(WithProjection) state dict in OpenCLIP's layout (q/k/v fused into in_proj)."""
    state = text_encoder_to_ldm({k: v for k, v in state.items() if k != "text_projection.weight"})
    out = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        rest = key.removeprefix("text_model.")
        if rest == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif rest == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif rest.startswith("final_layer_norm."):
            out["ln_final." + rest.split(".")[-1]] = value
        elif rest.startswith("encoder.layers."):
            _, _, layer, module = rest.split(".", 3)
            block = f"transformer.resblocks.{layer}."
            module_path, param = module.rsplit(".", 1)
            if module_path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{block}attn.in_proj_{param}", {})[module_path[-6]] = value
            else:
                out[f"{block}{_OPENCLIP_NAMES[module_path]}.{param}"] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def with_projection(state: dict, ldm: dict, hidden: int) -> dict:
    """OpenCLIP stores the text projection as [hidden, projection] (transposed). SD 2.x checkpoints hold one that
    diffusers drops; a square placeholder stands in for it."""
    projection = state.get("text_projection.weight")
    device = ldm["token_embedding.weight"].device
    ldm["text_projection"] = projection.T if projection is not None else torch.zeros(hidden, hidden, device=device)
    return ldm


LABEL_EMB = {"linear_1": 0, "linear_2": 2}  # SDXL's label_emb.0 is Sequential(Linear, SiLU, Linear)


def sdxl_unet_to_ldm(state: dict, config) -> dict:
    """unet_to_ldm plus SDXL's micro-conditioning embedding (add_embedding -> label_emb.0)."""
    add = {k: v for k, v in state.items() if k.startswith("add_embedding.")}
    out = unet_to_ldm({k: v for k, v in state.items() if k not in add}, config)
    for key, value in add.items():
        linear, param = key.removeprefix("add_embedding.").split(".")
        out[f"label_emb.0.{LABEL_EMB[linear]}.{param}"] = value
    return out


def ldm_checkpoint(family: str, unet, vae, encoders: list) -> dict:
    ckpt = {UNET_PREFIX + k: v for k, v in sdxl_unet_to_ldm(unet.state_dict(), unet.config).items()}
    ckpt.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    if family == "sd1":
        ckpt.update({TEXT_ENCODER_PREFIX + k: v for k, v in text_encoder_to_ldm(encoders[0].state_dict()).items()})
    elif family == "sd2":
        te = encoders[0]
        ldm = with_projection({}, openclip_to_ldm(te.state_dict()), te.config.hidden_size)
        ckpt.update({"cond_stage_model.model." + k: v for k, v in ldm.items()})
    else:
        clip, big = encoders
        ckpt.update({"conditioner.embedders.0.transformer." + k: v
                     for k, v in text_encoder_to_ldm(clip.state_dict()).items()})
        ldm = with_projection(big.state_dict(), openclip_to_ldm(big.state_dict()), big.config.hidden_size)
        ckpt.update({"conditioner.embedders.1.model." + k: v for k, v in ldm.items()})
    return ckpt


# --------------------------------------------------------------------------------------------
# Tiny SD 2.x / SDXL / SSD-1B models whose non-derivable fields follow the loader's rules
# --------------------------------------------------------------------------------------------


def tiny_family(family: str, vocab_size: int, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(cls, act, **extra):
        return cls(CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                                  bos_token_id=0, eos_token_id=2, pad_token_id=1, **extra))

    xl = family in ("sdxl", "ssd1b")
    unet_config = dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        attention_head_dim=[4, 1],  # 64-wide heads where the width allows, else 8-wide (the loader's rule)
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D") if xl else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D") if xl else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64 if xl else 32,
        upcast_attention=family == "sd2",
    )
    if xl:
        unet_config.update(transformer_layers_per_block=[1, 2], addition_embed_type="text_time",
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    if family == "ssd1b":  # an asymmetric up path and a middle block without attention, as in SSD-1B
        unet_config.update(reverse_transformer_layers_per_block=[[2, 3], [1, 1]], mid_block_type="UNetMidBlock2D")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                            norm_num_groups=32)
        if family == "sd2":
            encoders = [text(CLIPTextModel, "gelu")]
        else:
            encoders = [text(CLIPTextModel, "quick_gelu"), text(CLIPTextModelWithProjection, "gelu", projection_dim=32)]
    for module in (unet, vae, *encoders):
        module.eval()
    return unet, vae, encoders


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    lcm = build_tiny_sd(root / "lcm", lcm=True, seed=0)
    sd = build_tiny_sd(root / "sd", lcm=False, seed=1)
    single = write_single_file(sd, root / "sd.safetensors")
    lcm_single = write_single_file(lcm, root / "lcm-single.safetensors")
    vocab = len(json.loads((lcm / "tokenizer" / "vocab.json").read_text()))
    families = {}
    for family in ("sd2", "sdxl", "ssd1b"):
        unet, vae, encoders = tiny_family(family, vocab)
        path = root / f"{family}.safetensors"
        save_file({k: v.contiguous() for k, v in ldm_checkpoint(family, unet, vae, encoders).items()}, path)
        families[family] = SimpleNamespace(path=path, unet=unet, vae=vae, encoders=encoders)
    return SimpleNamespace(root=root, lcm=lcm, sd=sd, single=single, lcm_single=lcm_single, families=families)


@pytest.fixture(scope="module")
def sd_folder(tiny) -> Components:
    return load(tiny.sd)


@pytest.fixture(scope="module")
def sd_single(tiny) -> Components:
    return load(tiny.single)


# --------------------------------------------------------------------------------------------
# Detection by content
# --------------------------------------------------------------------------------------------


def test_detect_by_content_not_extension(tiny, tmp_path):
    assert detect(tiny.sd) == "diffusers"
    assert detect(tiny.lcm / "unet") == "unet_folder"
    assert detect(tiny.single) == "safetensors"
    disguised = tmp_path / "model.ckpt"
    disguised.write_bytes(tiny.single.read_bytes())
    assert detect(disguised) == "safetensors"
    for legacy in (False, True):
        fake = tmp_path / f"pickle-{legacy}.safetensors"
        torch.save({"w": torch.zeros(2)}, fake, _use_new_zipfile_serialization=not legacy)
        assert detect(fake) == "pickle"
    assert detect("someone/some-model") == "hub"
    assert detect(Path("someone/some-model")) == "hub"


# --------------------------------------------------------------------------------------------
# Diffusers folders
# --------------------------------------------------------------------------------------------


def test_diffusers_folder_components(tiny):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    c = load(tiny.lcm)
    assert (c.family, c.text_encoder_2, c.tokenizer_2) == ("sd1", None, None)
    assert isinstance(c.unet, UNet2DConditionModel) and c.unet.config.time_cond_proj_dim == 32
    assert isinstance(c.vae, AutoencoderKL) and isinstance(c.text_encoder, CLIPTextModel)
    assert not (tiny.lcm / "tokenizer" / "tokenizer.json").exists()  # vocab.json + merges.txt only
    assert c.tokenizer("a photo of a cat").input_ids[0] == c.tokenizer.bos_token_id
    assert c.scheduler_config == json.loads((tiny.lcm / "scheduler" / "scheduler_config.json").read_text())
    assert str(tiny.lcm) in c.source
    for module in (c.unet, c.vae, c.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_bit_exactness_against_diffusers_loading(tiny):
    """Mapped weights reproduce diffusers' own pipeline exactly; cloned (aligned) ones match a cloned pipeline."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny.lcm, local_files_only=True)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    w = torch.randn(1, 32, generator=g)

    def run(unet):
        with torch.no_grad():
            return unet(x, torch.tensor(999), encoder_hidden_states=text, timestep_cond=w).sample

    mapped, cloned = load(tiny.lcm, clone_weights=False), load(tiny.lcm)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(mapped, name), getattr(pipe, name))
        assert_same_weights(getattr(cloned, name), getattr(pipe, name))
    assert all(p.data_ptr() % 64 == 0 for p in cloned.unet.parameters())
    assert torch.equal(run(mapped.unet), run(pipe.unet))
    assert (run(cloned.unet) - run(pipe.unet)).abs().max() < 1e-5
    for p in pipe.unet.parameters():
        p.data = p.data.clone()
    assert torch.equal(run(cloned.unet), run(pipe.unet))


def test_device_and_dtype_are_applied(tiny):
    c = load_components(tiny.sd, device="cpu", dtype=torch.bfloat16)
    for module in (c.unet, c.vae, c.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert {p.device for p in module.parameters()} == {CPU}


def test_streamed_safetensors_read_each_tensor_into_memory_of_its_own(tiny):
    from nodes.loading.weights import StreamedSafetensors

    path = tiny.sd / "unet" / "diffusion_pytorch_model.safetensors"
    mapped = load_file(path)
    as_is, as_bf16 = StreamedSafetensors(path), StreamedSafetensors(path, torch.bfloat16)
    assert list(as_is) == list(as_bf16) and set(as_is) == set(mapped) and len(as_is) == len(mapped)
    for key, expected in mapped.items():
        t, b = as_is[key], as_bf16[key]
        assert t.dtype == expected.dtype and torch.equal(t, expected), key
        assert b.dtype == torch.bfloat16 and torch.equal(b, expected.to(torch.bfloat16)), key
        assert t.data_ptr() % 64 == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_a_large_tensor_is_read_whole(tmp_path):
    from nodes.loading.weights import StreamedSafetensors

    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: read in two halves at once
    save_file({"big": big, "empty": torch.zeros(0), "ids": torch.arange(5)}, tmp_path / "w.safetensors")
    streamed = StreamedSafetensors(tmp_path / "w.safetensors", torch.float16)
    assert torch.equal(streamed["big"], big.half())
    assert streamed["empty"].shape == (0,) and torch.equal(streamed["ids"], torch.arange(5))  # integers never cast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["sd", "single"])
def test_loads_stream_each_tensor_once_into_the_values_of_a_mapped_load(tiny, monkeypatch, which, dtype):
    """Folders and single files are read tensor by tensor, each once, in the requested dtype: the same values as
    loading the memory-mapped weights and casting them afterwards."""
    from nodes.loading.weights import StreamedSafetensors

    read: list[str] = []
    original = StreamedSafetensors.__getitem__

    def spy(self, key):
        read.append(f"{self.path}:{key}")
        return original(self, key)

    monkeypatch.setattr(StreamedSafetensors, "__getitem__", spy)
    streamed = load_components(getattr(tiny, which), device=CPU, dtype=dtype)
    monkeypatch.undo()
    mapped = load_components(getattr(tiny, which), device=CPU, dtype=dtype, clone_weights=False)
    assert read and len(read) == len(set(read))
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(streamed, name), getattr(mapped, name))
        assert {p.dtype for p in getattr(streamed, name).parameters()} == {dtype}
        assert all(p.data_ptr() % 64 == 0 for p in getattr(streamed, name).parameters())
        assert config_of(getattr(streamed, name)) == config_of(getattr(mapped, name))


@pytest.mark.parametrize("which", ["sd", "single", "sdxl"])
def test_loads_onto_another_device_make_each_tensor_there_as_it_is_read(tiny, monkeypatch, which):
    """A model loaded onto a device other than the CPU (here the meta device, which holds no data: the same path
    as a GPU) never exists whole in host memory: every tensor read is made on the device, in the run's dtype."""
    from nodes.loading.weights import StreamedSafetensors

    made: list[torch.Tensor] = []
    original = StreamedSafetensors.__getitem__
    monkeypatch.setattr(StreamedSafetensors, "__getitem__", lambda self, key: made.append(original(self, key))
                        or made[-1])
    path = tiny.families[which].path if which == "sdxl" else getattr(tiny, which)
    meta = torch.device("meta")
    loaded = load_components(path, device=meta, dtype=torch.float16, clone_weights=False)
    monkeypatch.undo()
    assert made and all(t.device == meta for t in made)
    assert {t.dtype for t in made if t.is_floating_point()} == {torch.float16}
    for name in ("unet", "vae", "text_encoder"):
        tensors = [*getattr(loaded, name).parameters(), *getattr(loaded, name).buffers()]
        assert all(t.device == meta for t in tensors), name


def config_of(model) -> dict:
    config = model.config
    return dict(config) if hasattr(config, "keys") else config.to_dict()  # diffusers' FrozenDict, transformers'


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------


def test_single_file_gives_the_folder_weights(tiny, sd_folder, sd_single):
    assert sd_single.family == "sd1"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(sd_single, name), getattr(sd_folder, name))
    # the size fields come from the header
    folder, single = sd_folder.unet.config, sd_single.unet.config
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                "down_block_types", "up_block_types", "attention_head_dim", "use_linear_projection"):
        assert as_list(single[key]) == as_list(folder[key]), key
    assert single.time_cond_proj_dim is None
    assert sd_single.vae.config.block_out_channels == sd_folder.vae.config.block_out_channels
    assert sd_single.vae.config.latent_channels == 4
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings")
    te, ref = sd_single.text_encoder.config, sd_folder.text_encoder.config
    assert [getattr(te, k) for k in sizes] == [getattr(ref, k) for k in sizes]
    # the tokenizer is the shipped CLIP BPE cut to the text encoder's vocabulary: the folder's tokenizer
    assert len(sd_single.tokenizer) == len(sd_folder.tokenizer)
    prompt = "a photo of an astronaut riding a horse"
    assert sd_single.tokenizer(prompt).input_ids == sd_folder.tokenizer(prompt).input_ids
    # the scheduler configuration is the family's (SD 1.5)
    assert sd_single.scheduler_config["beta_schedule"] == "scaled_linear"
    assert sd_single.scheduler_config["beta_start"] == 0.00085


def test_single_file_with_config_folder_is_the_same_model(tiny, sd_folder):
    c = load(tiny.single, config=tiny.sd)
    assert c.unet.config.norm_num_groups == sd_folder.unet.config.norm_num_groups == 8
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(c.unet(x, 500, encoder_hidden_states=text).sample,
                           sd_folder.unet(x, 500, encoder_hidden_states=text).sample)
        assert torch.equal(c.vae.decode(x).sample, sd_folder.vae.decode(x).sample)


@pytest.mark.parametrize("family", ["sd2", "sdxl", "ssd1b"])
def test_sd2_sdxl_ssd1b_single_files(tiny, family):
    ref = tiny.families[family]
    c = load(ref.path)
    assert c.family == family
    assert_same_weights(c.unet, ref.unet)
    assert_same_weights(c.vae, ref.vae)
    assert_same_weights(c.text_encoder, ref.encoders[0])
    if family == "sd2":
        assert c.text_encoder_2 is None and c.tokenizer.pad_token == "!"
        assert c.scheduler_config["prediction_type"] == "v_prediction"
    else:
        assert_same_weights(c.text_encoder_2, ref.encoders[1])
        assert type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert (c.tokenizer.pad_token, c.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    # derived non-size fields follow the rules the tiny models were built with: the same computation
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, ref.unet.config.cross_attention_dim, generator=g)
    extra = {}
    if family != "sd2":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                      "time_ids": torch.rand(1, 6, generator=g)}
    with torch.no_grad():
        assert torch.equal(c.unet(x, 10, encoder_hidden_states=text, **extra).sample,
                           ref.unet(x, 10, encoder_hidden_states=text, **extra).sample)


# --------------------------------------------------------------------------------------------
# Family detection and configuration derivation on real-size headers (meta tensors, no weights)
# --------------------------------------------------------------------------------------------


@functools.cache
def real_size_header(family: str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of an original checkpoint of ``family``, from the shipped configs (nothing allocated)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS_DIR / family
    cfg = lambda name: json.loads((folder / name / "config.json").read_text())  # noqa: E731
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        vae = AutoencoderKL.from_config(cfg("vae"))
        if family == "sd2":  # the original OpenCLIP-H has 24 layers; diffusers keeps the 23 SD 2 conditions on
            encoders = [CLIPTextModel(CLIPTextConfig.from_dict({**cfg("text_encoder"), "num_hidden_layers": 24}))]
        else:
            encoders = [CLIPTextModel(CLIPTextConfig.from_dict(cfg("text_encoder")))]
        if family in ("sdxl", "ssd1b"):
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(cfg("text_encoder_2"))))
    return {k: tuple(v.shape) for k, v in ldm_checkpoint(family, unet, vae, encoders).items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "ssd1b"])
def test_real_size_headers_give_the_shipped_configs(family):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    shapes = real_size_header(family)
    assert detect_family(shapes) == family
    derived = derive_configs(shapes)
    folder = CONFIGS_DIR / family
    shipped = lambda name: json.loads((folder / name / "config.json").read_text())  # noqa: E731
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        with init_empty_weights():  # compare the configurations the models end up with, allocating nothing
            got, want = (dict(cls.from_config(c).config) for c in (derived[name], shipped(name)))
        got.pop("_use_default_values"), want.pop("_use_default_values")
        assert got == want, name
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name).exists():
            got, want = (CLIPTextConfig.from_dict(c).to_dict() for c in (derived[name], shipped(name)))
            assert got == want, name


def test_family_from_a_unet_alone_and_inconsistent_parts():
    sd1 = real_size_header("sd1")
    unet_only = {k: v for k, v in sd1.items() if k.startswith(UNET_PREFIX)}
    assert detect_family(unet_only) == "sd1"  # cross-attention width 768
    assert detect_family({k: v for k, v in real_size_header("sd2").items() if k.startswith(UNET_PREFIX)}) == "sd2"
    xl_unet = {k: v for k, v in real_size_header("ssd1b").items() if k.startswith(UNET_PREFIX)}
    assert detect_family(xl_unet) == "ssd1b"
    # an SD 1.x UNet with an SD 2.x text encoder: the widths disagree
    mixed = {**unet_only, **{k: v for k, v in real_size_header("sd2").items() if k.startswith("cond_stage_model.")}}
    with pytest.raises(CheckpointError, match="do not belong together"):
        detect_family(mixed)
    refiner = {"conditioner.embedders.0.model.token_embedding.weight": (49408, 1280), **unet_only}
    with pytest.raises(CheckpointError, match="refiner"):
        detect_family(refiner)
    odd = {k: (v[0], 320) if k.endswith("attn2.to_k.weight") else v for k, v in unet_only.items()}
    with pytest.raises(CheckpointError, match="cross-attention width \\(320\\)"):
        detect_family(odd)


@pytest.mark.parametrize("shapes, expected", [
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "standalone VAE"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
    ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers-format"),
    ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "ControlNet"),
    ({"foo.weight": (2, 2), "foo.bias": (2,)}, "unknown model; it holds 2 tensors: foo.\\* \\(2\\)"),
])
def test_non_checkpoints_are_named(shapes, expected):
    with pytest.raises(CheckpointError, match=expected):
        detect_family(shapes)


# --------------------------------------------------------------------------------------------
# LCM UNet folder over a base
# --------------------------------------------------------------------------------------------


def test_lcm_unet_folder_over_a_base(tiny, sd_folder, sd_single):
    lcm = load(tiny.lcm)
    for base, ref in ((tiny.single, sd_single), (tiny.sd, sd_folder)):
        c = load(tiny.lcm / "unet", base=base)
        assert c.unet.config.time_cond_proj_dim == 32 and c.family == "sd1"
        assert_same_weights(c.unet, lcm.unet)
        assert_same_weights(c.vae, ref.vae)
        assert_same_weights(c.text_encoder, ref.text_encoder)
        assert "UNet folder" in c.source and str(base) in c.source
    with pytest.raises(CheckpointError, match="needs a base checkpoint"):
        load(tiny.lcm / "unet")
    with pytest.raises(CheckpointError, match="does not fit the base"):
        load(tiny.lcm / "unet", base=tiny.families["sdxl"].path)
    with pytest.raises(CheckpointError, match="not another UNet folder"):
        load(tiny.lcm / "unet", base=tiny.lcm / "unet")


def test_variant_only_unet_folder(tiny, tmp_path):
    folder = shutil.copytree(tiny.lcm / "unet", tmp_path / "unet")
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    assert_same_weights(load(folder, base=tiny.sd).unet, load(tiny.lcm / "unet", base=tiny.sd).unet)


# --------------------------------------------------------------------------------------------
# Pickles
# --------------------------------------------------------------------------------------------


def test_pickled_component_in_a_diffusers_folder(tiny, tmp_path, sd_folder):
    folder = shutil.copytree(tiny.sd, tmp_path / "sd")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match="vae.*pickle \\(.bin\\).*--allow-pickle"):
        load(folder)
    assert_same_weights(load(folder, allow_pickle=True).vae, sd_folder.vae)


class NotATensor:  # what old Lightning checkpoints pickle next to the weights
    pass


def test_pickles_are_refused_unless_allowed(tiny, tmp_path, sd_single):
    weights = load_file(tiny.single)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights, "global_step": 1000}, ckpt)
    with pytest.raises(CheckpointError, match="pickle.*refused"):
        load(ckpt)
    c = load(ckpt, allow_pickle=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(c, name), getattr(sd_single, name))
    # a pickle named .safetensors is still a pickle
    disguised = tmp_path / "model.safetensors"
    torch.save(weights, disguised, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pickle"):
        load(disguised)
    assert load(disguised, allow_pickle=True).family == "sd1"
    # weights_only=True refuses arbitrary objects, even when pickles are allowed
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": weights, "callback": NotATensor()}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only"):
        load(unsafe, allow_pickle=True)


def test_a_safetensors_file_named_ckpt_needs_no_pickle_permission(tiny, tmp_path, sd_single):
    disguised = tmp_path / "model.ckpt"
    disguised.write_bytes(tiny.single.read_bytes())
    assert_same_weights(load(disguised).unet, sd_single.unet)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_bad_inputs_are_clear_errors(tiny, tmp_path):
    png = bytes.fromhex("89504e470d0a1a0a") + b"\0" * 32
    vae_only = tmp_path / "vae.safetensors"
    save_file({k[len(VAE_PREFIX):]: v for k, v in load_file(tiny.single).items() if k.startswith(VAE_PREFIX)}, vae_only)
    cases = {
        "no such file or folder": tmp_path / "missing.safetensors",
        "not a checkpoint \\(a PNG image\\)": write(tmp_path / "cat.safetensors", png),
        "the file is empty": write(tmp_path / "empty.safetensors", b""),
        "standalone VAE": vae_only,
        "header length field says 1000 bytes": write(tmp_path / "short.safetensors", struct.pack("<Q", 1000) + b"{}"),
        "header is not valid JSON": write(tmp_path / "json.safetensors", struct.pack("<Q", 9) + b"{not json"),
        "truncated safetensors file: tensor 'w'": write(tmp_path / "cut.safetensors", safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 10)),
        "do not match its size": write(tmp_path / "offsets.safetensors", safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, b"\0" * 8)),
        "unknown model; it holds 1 tensors: w": write(tmp_path / "unknown.safetensors", safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)),
        "LCM guidance embedding": tiny.lcm_single,
        "neither a diffusers pipeline": tmp_path,
        "a zip archive, not a checkpoint": write(tmp_path / "archive.ckpt", _zip_bytes(tmp_path)),
    }
    for message, path in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load(path)
        assert str(path) in str(info.value) or message == "neither a diffusers pipeline"


def _zip_bytes(tmp_path: Path) -> bytes:
    import zipfile

    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    return path.read_bytes()


def test_a_single_file_without_vae_says_what_is_missing(tiny, tmp_path):
    no_vae = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in load_file(tiny.single).items() if not k.startswith(VAE_PREFIX)}, no_vae)
    with pytest.raises(CheckpointError, match="this sd1 checkpoint has no VAE \\(first_stage_model"):
        load(no_vae)


def test_weights_that_do_not_fit_are_reported(tiny, tmp_path):
    weights = load_file(tiny.single)
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in weights.items() if not k.endswith("out.2.bias")}, broken)
    with pytest.raises(CheckpointError, match="UNet weights do not fit.*missing conv_out.bias"):
        load(broken)


def test_hub_ids_offline_say_where_to_put_the_files(tmp_path):
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as info:
        load("someone/some-model", checkpoints_dir=tmp_path / "models" / "checkpoints")
    assert str(tmp_path / "models" / "checkpoints" / "some-model") in str(info.value)


def test_header_reading(tiny):
    shapes = read_header(tiny.single)
    assert shapes == {k: tuple(v.shape) for k, v in load_file(tiny.single).items()}
    assert detect_family(shapes) == "sd1"


def test_safetensors_are_sniffed_by_a_header_length_that_fits_the_file(tiny, tmp_path):
    assert is_safetensors(tiny.single)
    assert is_safetensors(write(tmp_path / "smallest.bin", safetensors_bytes({})))
    assert not is_safetensors(write(tmp_path / "short.safetensors", struct.pack("<Q", 1000) + b"{}"))
    assert not is_safetensors(write(tmp_path / "cut.safetensors", safetensors_bytes({})[:-1]))
    assert not is_safetensors(write(tmp_path / "empty.safetensors", b""))
    pickled = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    assert not is_safetensors(pickled)


def test_hub_ids_are_owner_slash_name_and_never_a_file_name():
    assert looks_like_hub_id("SimianLuo/LCM_Dreamshaper_v7")
    for name in ("checkpoints/model.safetensors", "owner/model.ckpt", "owner/name\n", "owner/.hidden", "a/b/c",
                 "no-owner"):
        assert not looks_like_hub_id(name), name


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def test_list_checkpoints(tiny, tmp_path):
    root = tmp_path / "checkpoints"
    (root / "nested" / ".hidden").mkdir(parents=True)
    for name in ("a.safetensors", "b.ckpt", "nested/c.pt", "nested/d.pth", "notes.txt", ".e.safetensors",
                 "nested/.hidden/f.safetensors"):
        (root / name).write_bytes(b"x")
    shutil.copytree(tiny.sd, root / ".store" / "sd")
    shutil.copytree(tiny.lcm / "unet", root / ".store" / "lcm-unet")
    (root / "pipeline").symlink_to(root / ".store" / "sd", target_is_directory=True)
    (root / "lcm-unet").symlink_to(root / ".store" / "lcm-unet", target_is_directory=True)
    (root / "elsewhere").symlink_to(tiny.sd, target_is_directory=True)  # leads out of the folder: never offered
    (root / "empty-folder").mkdir()
    assert list_checkpoints(root) == ["a.safetensors", "b.ckpt", "lcm-unet", "nested/c.pt", "nested/d.pth", "pipeline"]
    assert list_checkpoints(tmp_path / "nowhere") == []


@pytest.mark.parametrize("family", ["sdxl", "ssd1b"])
def test_sdxl_and_ssd1b_single_files_generate_as_diffusers_does(tiny, family, tmp_path, executor):
    """An original-layout SDXL / SSD-1B file through a graph (LCM-LoRA's setting: plain UNet, LCMScheduler, CFG)
    gives diffusers' StableDiffusionXLPipeline image for the same loaded components."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    import nodegraph as ng

    from .conftest import EXACT, generator, max_diff
    from .test_parity import graph, ours

    (tmp_path / "checkpoints").mkdir()
    shutil.copyfile(tiny.families[family].path, tmp_path / "checkpoints" / f"{family}.safetensors")
    executor.settings = ng.Settings(**EXACT, models_dir=tmp_path, output_dir=tmp_path / "out")
    got = ours(executor, graph(f"{family}.safetensors", "a red circle", seed=3, steps=2, guidance=2.0))

    c = load(tiny.families[family].path)
    pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                     tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                     scheduler=LCMScheduler.from_config(dict(c.scheduler_config)))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", generator=generator(3), num_inference_steps=2, guidance_scale=2.0,
                    height=64, width=64, output_type="np").images  # the graph's EmptyLatent size
    assert got.shape == expected.shape and max_diff(got, expected) <= 1e-5


@pytest.mark.parametrize("which", ["sd", "single"])
def test_channels_last_is_laid_out_while_streaming(tiny, which):
    """Kernels arrive channels_last, so the caller's layout conversion copies nothing (no second copy of them)."""
    path = tiny.sd if which == "sd" else tiny.single
    plain = load_components(path, device="cpu", dtype=torch.bfloat16)
    laid = load_components(path, device="cpu", dtype=torch.bfloat16, channels_last=("unet", "vae"))
    for a, b in ((plain.unet, laid.unet), (plain.vae, laid.vae)):
        kernels = [(n, p) for n, p in b.named_parameters() if p.ndim == 4 and p.shape[1] > 1]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for _, p in kernels)
        before = {n: p.data_ptr() for n, p in b.named_parameters()}
        b.to(memory_format=torch.channels_last)
        assert {n: p.data_ptr() for n, p in b.named_parameters()} == before
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
    only_vae = load_components(path, device="cpu", dtype=torch.bfloat16, channels_last=("vae",))
    assert only_vae.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert only_vae.unet.conv_in.weight.is_contiguous()


# --------------------------------------------------------------------------------------------
# --map-weights (Settings.map_weights): weights used as stored stay in the file's memory map


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path`` (/proc/self/maps)."""
    target = str(path.resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("name, dtype, map_weights, mapped", [
    ("tiny-sd.safetensors", "float32", True, True),   # a float32 file in float32: used as stored
    ("tiny-sd", "float32", True, True),               # a diffusers folder alike
    ("tiny-sd.safetensors", "bfloat16", True, False),  # a cast copies anyway: streamed
    ("tiny-sd.safetensors", "float32", False, False),  # --no-map-weights: memory of its own
    ("tiny-sd.safetensors", "float32", None, "guarded"),  # the default: mapped where a lease guards the file
    ("tiny-sd", "float32", None, "guarded"),
])
def test_map_weights_keeps_weights_used_as_stored_in_the_files_map(models_root, name, dtype, map_weights, mapped,
                                                                   caplog):
    import nodegraph as ng
    from nodes import checkpoint

    settings = ng.Settings(models_dir=models_root, device="cpu", dtype=dtype, memory_format="contiguous",
                           map_weights=map_weights)
    with caplog.at_level("INFO", logger="nodes.checkpoint"):
        components = checkpoint.load(settings, name)
    path = models_root / "checkpoints" / name
    weights = path if path.is_file() else path / "unet" / "diffusion_pytorch_model.safetensors"
    if mapped == "guarded":
        from nodegraph import filemaps

        mapped = filemaps.guard(weights) is not None  # this file system and user allow leases
    ranges = _mapped_from(weights)
    inside = [any(a <= p.data_ptr() < b for a, b in ranges) for p in components.unet.parameters()]
    assert all(inside) if mapped else not any(inside)
    assert {p.dtype for p in components.unet.parameters()} == {getattr(torch, dtype)}
    how = ("copied" if not mapped else "mapped" if map_weights else "mapped, guarded against being rewritten in place")
    assert f"{name} loaded in" in caplog.text and f"(cpu, {dtype}, weights {how})" in caplog.text


def test_map_weights_comes_from_the_command_line_and_the_environment():
    from nodegraph.cli import make_parser, settings_from_args

    import nodegraph as ng

    assert ng.Settings.from_env({"NODEGRAPH_MAP_WEIGHTS": "1"}).map_weights is True
    assert ng.Settings.from_env({"NODEGRAPH_MAP_WEIGHTS": "auto"}).map_weights is None
    assert ng.Settings.from_env({}).map_weights is None  # mapped where guarded, copied elsewhere
    with pytest.raises(ValueError, match=r"NODEGRAPH_MAP_WEIGHTS='maybe': say 1 or 0 \(or auto\)"):
        ng.Settings.from_env({"NODEGRAPH_MAP_WEIGHTS": "maybe"})
    args = make_parser().parse_args(["run", "text-to-image", "--map-weights"])
    assert settings_from_args(args).map_weights is True

    def chosen(*argv: str, **environ: str) -> bool | None:
        return settings_from_args(make_parser().parse_args(argv), environ).map_weights

    # the same default for one-shot runs and for processes that hold models for hours: the guard makes it safe
    assert chosen("run", "text-to-image") is None and chosen("serve") is None
    assert chosen("worker", "--scheduler", "tcp://127.0.0.1:8786") is None
    assert chosen("run", "text-to-image", "--no-map-weights") is False
    assert chosen("run", "text-to-image", NODEGRAPH_MAP_WEIGHTS="0") is False
    assert chosen("serve", "--map-weights", NODEGRAPH_MAP_WEIGHTS="0") is True
    assert chosen("serve", NODEGRAPH_MAP_WEIGHTS="1") is True
    assert len({ng.Settings(map_weights=m).fingerprint() for m in (True, False, None)}) == 3


def _resident_pages(t: torch.Tensor) -> tuple[int, int]:
    """How many of the whole pages inside ``t`` are resident in this process (/proc/self/pagemap's present bit),
    of how many."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // page * 8)
        entries = struct.unpack(f"<{(end - start) // page}Q", f.read((end - start) // page * 8))
    return sum(e >> 63 for e in entries), len(entries)


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/pagemap")
def test_release_mapped_gives_back_only_unwritten_pages_of_a_file_map(tmp_path):
    from nodes.loading import release_mapped
    from nodes.loading.weights import read_safetensors

    generator = torch.Generator().manual_seed(0)
    stored = {name: torch.randn(50_000, generator=generator) for name in ("kept", "released", "written")}
    save_file(stored, tmp_path / "w.safetensors")
    mapped = read_safetensors(tmp_path / "w.safetensors")
    for t in mapped.values():
        t.sum()  # read: resident
    pages = {name: _resident_pages(t) for name, t in mapped.items()}
    assert all(resident == whole >= 47 for resident, whole in pages.values())

    assert release_mapped(mapped["released"]) == pages["released"][1] * os.sysconf("SC_PAGE_SIZE")
    assert _resident_pages(mapped["released"])[0] == 0 and _resident_pages(mapped["kept"]) == pages["kept"]
    assert torch.equal(mapped["released"], stored["released"])  # read again from the file: the same bytes

    mapped["written"].add_(1)  # copied on write: the map now holds data the file does not
    assert release_mapped(mapped["written"]) == 0
    assert torch.equal(mapped["written"], stored["written"] + 1)
    assert release_mapped(torch.ones(50_000)) == 0  # memory of the process's own is never touched


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/pagemap")
def test_mapped_unets_pack_from_the_map_and_give_its_pages_back(models_root):
    """--map-weights with the fast layout: the UNet's 3x3 and 1x1 kernels stay in the file's map until their first call
    packs them; then their pages leave the process, and the UNet computes what a copied load computes (which
    packed its kernels as it loaded them)."""
    import nodegraph as ng
    from nodes import checkpoint, devices, fastpaths

    if not fastpaths.packing_works(torch.float32):
        pytest.skip("this build or CPU has no blocked float32 convolutions")
    path = models_root / "checkpoints" / "tiny-sd.safetensors"

    def load(map_weights: bool):
        settings = ng.Settings(models_dir=models_root, device="cpu", dtype="float32", map_weights=map_weights)
        return checkpoint.load(settings, path.name).unet

    mapped, copied = load(True), load(False)
    ranges = _mapped_from(path)
    kernels = [m for m in mapped.modules() if isinstance(m, fastpaths.PackedConv2d)]
    assert kernels and all(any(a <= m.weight.data_ptr() < b for a, b in ranges) for m in kernels)
    assert all(m.weight.is_contiguous() for m in kernels)  # the file's layout, packed from it
    # a copied (streamed) load packs them as it loads, from views of the file's map, and keeps nothing of the map
    copied_kernels = [m.weight for m in copied.modules() if isinstance(m, fastpaths.PackedConv2d)]
    assert copied_kernels and all(w.layout != torch.strided for w in copied_kernels)
    assert not any(a <= t.data_ptr() < b for t in copied.parameters() if t.layout == torch.strided
                   for a, b in ranges)
    plain = [m.weight.data for m in kernels]
    for t in plain:
        t.sum()
    assert sum(_resident_pages(t)[0] for t in plain) > 0
    assert devices.prefers_channels_last(mapped)  # inputs go channels_last before the first call packs
    # every convolution of an SD UNet (3x3 and 1x1 kernels) packs, from the file's layout
    assert all(type(m) is fastpaths.PackedConv2d for m in mapped.modules() if isinstance(m, torch.nn.Conv2d))

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    text = torch.randn(1, 77, mapped.config.cross_attention_dim, generator=generator)
    with torch.inference_mode():
        got = mapped(sample, 10, text).sample
        expected = copied(sample, 10, text).sample
    assert all(m.weight.layout != torch.strided for m in kernels)
    assert sum(_resident_pages(t)[0] for t in plain) == 0  # packed: the plain kernels' pages were given back
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_single_files_assemble_their_tokenizer_once_per_process(models_root, monkeypatch):
    """The vocabulary a single file's tokenizer is built from is written once per process, not at every load."""
    from nodes import tokenizers
    from nodes.loading import assemble

    monkeypatch.setattr(assemble, "_ASSEMBLED", {})
    written = []
    real = tokenizers.write_clip_tokenizer_subset
    monkeypatch.setattr(tokenizers, "write_clip_tokenizer_subset", lambda *a, **k: written.append(1) or real(*a, **k))
    path = models_root / "checkpoints" / "tiny-sd.safetensors"
    first, second = (load_components(path, device=CPU, dtype=torch.float32) for _ in range(2))
    assert len(written) == 1
    prompt = "a red circle on a blue background"
    assert first.tokenizer(prompt).input_ids == second.tokenizer(prompt).input_ids
    assert len(first.tokenizer) == len(second.tokenizer)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guards are leases, a Linux feature")
def test_a_checkpoint_mapped_by_default_survives_being_rewritten_in_place(models_root, tmp_path):
    """The default (mapped where guarded), end to end: LoadCheckpoint maps the single file, another program then
    copies other weights over it in place (cp truncates it), and the loaded UNet still computes what it did (a
    child process: without the guard, it would die of SIGBUS)."""
    from nodegraph import filemaps

    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "tiny.safetensors"
    shutil.copyfile(models_root / "checkpoints" / "tiny-sd.safetensors", ckpt)
    if filemaps.guard(ckpt) is None:
        pytest.skip("this file system or user cannot take leases")
    filemaps.release(ckpt)
    other = models_root / "checkpoints" / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors"
    code = f"""
import subprocess, torch
from pathlib import Path
import nodegraph as ng
from nodegraph import filemaps
from nodes import checkpoint
settings = ng.Settings(models_dir=Path({str(tmp_path)!r}), device="cpu", dtype="float32")
assert settings.map_weights is None
unet = checkpoint.load(settings, "tiny.safetensors").unet
g = torch.Generator().manual_seed(0)
x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
def run():
    with torch.no_grad():
        return unet(x, torch.tensor(999), encoder_hidden_states=text).sample
before = run()
(guard,) = filemaps.held()
assert filemaps.private_maps(guard.key), "mapped"
subprocess.run(["cp", {str(other)!r}, {str(ckpt)!r}], check=True)
assert guard.broken and not filemaps.private_maps(guard.key)
assert torch.equal(run(), before)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
