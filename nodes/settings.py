"""Process-wide settings of the node library: where models and input images live, and the device and dtype.

The command line (``--models``, ``--device``, ``--dtype``, ``--memory-format``) and the server call
``configure``; the environment variables ``NODEGRAPH_MODELS`` and ``NODEGRAPH_INPUT`` give the defaults.
Everything else reads ``current()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class Settings:
    models_dir: Path
    input_dir: Path
    device: str | None = None  # None: chosen at run time (cuda > mps > cpu)
    dtype: str | None = None  # None: float16 on cuda, float32 elsewhere
    allow_pickle: bool = False  # .ckpt files are refused unless the user opts in
    max_image_size: int = 4096  # pixels per side: a typo of 51200 should be an error, not an out-of-memory
    temp_dir: Path | None = None  # where PreviewImage writes (default: a folder in the system's temp dir)
    # Layout of UNet and VAE convolution weights: "auto" = channels_last on the CPU, where oneDNN convolutions run
    # up to twice as fast in it (results differ from the contiguous layout by float rounding, ~1e-6), contiguous
    # elsewhere; or "channels_last" / "contiguous" (bit-identical to diffusers' pipelines).
    memory_format: str = "auto"


def _defaults() -> Settings:
    return Settings(models_dir=Path(os.environ.get("NODEGRAPH_MODELS", "models")),
                    input_dir=Path(os.environ.get("NODEGRAPH_INPUT", "input")),
                    max_image_size=int(os.environ.get("NODEGRAPH_MAX_SIZE", "4096")))


_current = _defaults()


def configure(settings: Mapping[str, Any]) -> Settings:
    """Apply settings given by name (any field of ``Settings``); the rest take their defaults."""
    global _current
    changes = {k: v for k, v in settings.items() if k in Settings.__dataclass_fields__}
    for key in ("models_dir", "input_dir", "temp_dir"):
        if key in changes:
            changes[key] = Path(changes[key])
    _current = replace(_defaults(), **changes)
    return _current


def current() -> Settings:
    return _current
