"""Hub repository ids (``owner/name``): recognising one, and fetching its snapshot only when the hub is online.
Offline, the error says where to put the files instead."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError, first_line
from .weights import CHECKPOINT_SUFFIXES

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a hub download fetches: configs, tokenizers and the default (non-variant) safetensors weights.
_HUB_FILES = [
    "model_index.json", "config.json", "*/*.json", "*/*.txt",
    "diffusion_pytorch_model.safetensors", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors",
    "*/*-of-*.safetensors",
]


def looks_like_hub_id(name: Path | str) -> bool:
    """Whether ``name`` reads as a hub repository id (``owner/name``); the caller checks it is no local path."""
    text = Path(name).as_posix() if isinstance(name, Path) else str(name)
    # "checkpoints/x.safetensors" is a missing file, not a repository.
    return bool(HUB_ID.fullmatch(text)) and not text.lower().endswith((*CHECKPOINT_SUFFIXES, ".bin"))


def _offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a later change too.
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def fetch(repo_id: str, where: Path) -> Path:
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
        raise CheckpointError(f"{repo_id!r}: could not download it from the hub ({first_line(e)}). {hint}") from e
