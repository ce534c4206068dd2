"""Standalone VAE files in the original (LDM) layout, such as sd-vae-ft-mse-original: ``encoder.down.0.block...``
keys, optionally under ``first_stage_model.`` (or ``vae.``), as a diffusers ``AutoencoderKL``.

Such a file holds weights but no configuration: the sizes come from the tensor shapes and the rest from the SD 1.x
VAE configuration the package ships (:func:`.configs.derive_configs` does the same for a full checkpoint's VAE), so
the scaling factor is SD's 0.18215 and norm groups that shapes cannot reveal take the shipped value (or the largest
divisor of the channel counts below it). Weights are converted by diffusers' ``convert_ldm_vae_checkpoint`` and
loaded strictly, streamed tensor by tensor, as a full checkpoint's are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .assemble import _build, _Options
from .configs import _derive_vae, family_config_dir, read_json
from .detect import VAE
from .errors import CheckpointError
from .weights import StreamedSafetensors, file_kind, read_header, read_pickle

#: Where a VAE's keys may sit in a file (diffusers' converter recognises the same); none, for a bare VAE file.
_PREFIXES = (VAE, "vae.")


def load_vae_file(path: Path | str, *, device: torch.device | str, dtype: torch.dtype, allow_pickle: bool = False,
                  clone_weights: bool = True, guarded_only: bool = False) -> torch.nn.Module:
    """The ``AutoencoderKL`` of an original-layout VAE file (safetensors; a pickle only with ``allow_pickle``),
    ready to run on ``device`` in ``dtype``; ``clone_weights`` and ``guarded_only`` as for ``load_components``.
    Failures are :class:`CheckpointError` naming the file."""
    path = Path(path)
    opts = _Options(torch.device(device), dtype, allow_pickle, clone_weights, guarded_only=guarded_only)
    if file_kind(path) == "pickle":
        tensors = read_pickle(path, allow_pickle)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        read = lambda: tensors
    else:
        shapes = read_header(path)
        # Streamed (each tensor once, in its final dtype), or mapped where used as stored if asked
        read = lambda: opts.streamed(path)
    prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in shapes)), "")
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    if "encoder.conv_in.weight" not in own:
        diffusers_layout = any(k.startswith("encoder.down_blocks.") for k in own)
        raise CheckpointError(
            f"{path}: not an original-layout VAE (no {prefix}encoder.conv_in.weight)"
            + ("; it holds diffusers-format weights: put the file in a folder beside its config.json"
               if diffusers_layout else ""))
    try:
        config = _derive_vae(read_json(family_config_dir("sd1") / "vae" / "config.json"),
                             {VAE + k: v for k, v in own.items()})
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    tensors = read()
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return _build("AutoencoderKL", config, lambda _: convert_ldm_vae_checkpoint(tensors, config), "VAE",
                  f"{path} (an original-layout VAE)",
                  opts, streamed=isinstance(tensors, StreamedSafetensors))
