"""Tests for the shipped CLIP tokenizer and the tiny model builders of nodes.testing.tiny.

Everything runs offline: the hub is switched to offline mode so an accidental download fails fast.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # effective when huggingface_hub is not imported yet

import huggingface_hub.constants
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from nodes.testing.tiny import (
    SHIPPED_CLIP_TOKENIZER,
    TINY_TOKENIZER_MERGES,
    build_tiny_sd,
    write_clip_tokenizer_subset,
    write_single_file,
)

PROMPTS = ["a photo of a cat", "an astronaut riding a horse, oil painting", "naïve café 東京 🐱", "A man and the RED apple!"]
COND_PROJ = "time_embedding.cond_proj.weight"


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import, possibly before this module set it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {lcm: build_tiny_sd(root / ("lcm" if lcm else "sd"), lcm=lcm) for lcm in (False, True)}


@pytest.fixture(scope="module")
def full_tokenizer():
    return CLIPTokenizer.from_pretrained(SHIPPED_CLIP_TOKENIZER)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shipped_tokenizer_is_real_clip(full_tokenizer):
    tok = full_tokenizer
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    # The ids of openai/clip-vit-large-patch14's tokenizer.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and padded[4:] == [49407] * 73


def test_tokenizer_subset_is_a_prefix_of_the_full_bpe(tmp_path, full_tokenizer):
    merges = 300
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer_subset(tmp_path, merges))
    assert len(tok) == 514 + merges
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (512 + merges, 513 + merges, 513 + merges)
    assert tok.model_max_length == 77
    compared = 0
    for word in " ".join(PROMPTS).split():
        ids, full = tok(word).input_ids[1:-1], full_tokenizer(word).input_ids[1:-1]
        assert max(ids) < 512 + merges
        # Truncating the merge list stops BPE early, so a word the full BPE spells with tokens of the
        # first `merges` merges only comes out identical.
        if max(full) < 512 + merges:
            assert ids == full, word
            compared += 1
    assert compared >= 5
    assert tok("cat").input_ids[1:-1] == [66, 536]  # "c" + "at</w>": "cat</w>" is merge 1856


@pytest.mark.parametrize("lcm", [False, True], ids=["sd", "lcm"])
def test_tiny_folder_generates(tiny_dirs, lcm):
    folder = tiny_dirs[lcm]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipeline_class = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.unet.config.time_cond_proj_dim == (32 if lcm else None)
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 514 + TINY_TOKENIZER_MERGES
    # Real SD layout on disk: text encoder weights under text_model.*, slow-tokenizer files present.
    te_keys = load_file(folder / "text_encoder" / "model.safetensors").keys()
    assert all(k.startswith("text_model.") for k in te_keys)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / "tokenizer").iterdir()}

    image = pipe(
        "a photo of a cat", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0


def test_build_is_deterministic(tiny_dirs, tmp_path):
    again = build_tiny_sd(tmp_path / "again", lcm=True)
    assert _files(again) == _files(tiny_dirs[True])
    other = build_tiny_sd(tmp_path / "other", lcm=True, seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert _files(other)[unet] != _files(again)[unet]


def _roundtrip(folder, checkpoint):
    """(diffusers weights from the folder, the same read back from the LDM checkpoint) per component."""
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    return {
        "unet": (
            load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
            convert_ldm_unet_checkpoint(checkpoint, unet_config),
        ),
        "vae": (
            load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
            convert_ldm_vae_checkpoint(checkpoint, vae_config),
        ),
        "text_encoder": (
            load_file(folder / "text_encoder" / "model.safetensors"),
            convert_ldm_clip_checkpoint(checkpoint),
        ),
    }


@pytest.mark.parametrize(
    "lcm, layers_per_block", [(False, 1), (True, 1), (False, 2)], ids=["sd", "lcm", "sd-2-layers"]
)
def test_single_file_roundtrip(tiny_dirs, tmp_path, lcm, layers_per_block):
    folder = tiny_dirs[lcm] if layers_per_block == 1 else build_tiny_sd(tmp_path / "m", lcm=lcm, layers_per_block=2)
    checkpoint = load_file(write_single_file(folder, tmp_path / "model.safetensors"))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in checkpoint)
    assert "model.diffusion_model.output_blocks.0.0.skip_connection.weight" in checkpoint  # LDM names, not diffusers'

    for component, (expected, got) in _roundtrip(folder, checkpoint).items():
        # diffusers' LDM converter has no key for the LCM guidance projection: it comes back missing.
        assert set(expected) - set(got) == ({COND_PROJ} if lcm and component == "unet" else set()), component
        assert set(got) <= set(expected), component
        assert all(torch.equal(got[k], expected[k]) for k in got), component


def test_from_single_file_matches_folder(tiny_dirs, tmp_path):
    folder = tiny_dirs[False]
    path = write_single_file(folder, tmp_path / "sd.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(path, config=str(folder), local_files_only=True)
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(loaded.scheduler).__name__ == "LCMScheduler"  # taken from the config folder
    for component in ("unet", "vae", "text_encoder"):
        got, expected = getattr(loaded, component).state_dict(), getattr(reference, component).state_dict()
        assert got.keys() == expected.keys(), component
        assert all(torch.equal(got[k], expected[k]) for k in got), component
