"""Device and dtype, chosen at run time: CUDA (float16) > MPS (float16) > CPU (float32), unless the user overrides
them with ``--device`` / ``--dtype``. Nothing else in the library names a device.

Random draws always come from a CPU generator (see ``cpu_generator``), so a seed gives the same image on every
device, as diffusers does when handed a CPU generator.
"""

from __future__ import annotations

import torch

from . import settings

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device() -> torch.device:
    chosen = settings.current().device
    if chosen:
        return torch.device(chosen)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def dtype(for_device: torch.device | None = None) -> torch.dtype:
    chosen = settings.current().dtype
    if chosen:
        if chosen not in _DTYPES:
            raise ValueError(f"unknown dtype {chosen!r}; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[chosen]
    kind = (for_device or device()).type
    return torch.float16 if kind in ("cuda", "mps") else torch.float32


_FORMATS = ("auto", "channels_last", "contiguous")


def channels_last(for_device: torch.device) -> bool:
    """Whether convolution weights on ``for_device`` use the channels_last layout (see Settings.memory_format)."""
    chosen = settings.current().memory_format
    if chosen not in _FORMATS:
        raise ValueError(f"unknown memory format {chosen!r}; choose one of {', '.join(_FORMATS)}")
    return chosen == "channels_last" or (chosen == "auto" and for_device.type == "cpu")


def prefers_channels_last(module: torch.nn.Module) -> bool:
    """True when the module's first 4-D weight is stored channels_last (inputs then go in that layout too)."""
    for p in module.parameters():
        if p.ndim == 4:
            return p.shape[1] > 1 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def cpu_generator(seed: int) -> torch.Generator:
    # Seeds above 2**63 are folded into torch's unsigned 64-bit range the same way on every platform.
    return torch.Generator("cpu").manual_seed(int(seed) % (2**64))
