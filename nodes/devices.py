"""Device and dtype, chosen at run time from the settings: CUDA (float16) > MPS (float16) > CPU, unless the user
overrides them with ``--device`` / ``--dtype``. Nothing else in the library names a device.

On the CPU the precision follows the hardware: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX on
x86, the BF16 extension on Arm), where oneDNN runs its matrix products and convolutions 2-4x faster than in float32
(``benchmarks/speed.py``); float32 elsewhere, where bfloat16 is emulated and slower. ``--dtype float32`` restores
the exact path (the tests pin it).

Random draws always come from a CPU generator (see ``cpu_generator``), so a seed gives the same image on every
device, as diffusers does when handed a CPU generator.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from nodegraph import Settings

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device(settings: Settings) -> torch.device:
    chosen = settings.device
    if chosen:
        return torch.device(chosen)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def dtype(settings: Settings, for_device: torch.device | None = None) -> torch.dtype:
    if settings.dtype:
        return _DTYPES[settings.dtype]  # Settings checked the name
    kind = (for_device or device(settings)).type
    if kind in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if kind == "cpu" and cpu_has_native_bf16() else torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware (asked of torch, then of the kernel's CPU flags)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        if any(probe is not None and probe() for probe in probes):
            return True
    except RuntimeError:  # a private probe that changed shape: fall back to the flags
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: macOS and Windows keep float32 unless asked
        return False
    words = set(flags.split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def channels_last(settings: Settings, for_device: torch.device, part: str = "vae") -> bool:
    """Whether the convolution weights of ``part`` ("unet": a denoiser; "vae": anything else) on ``for_device`` use
    the channels_last layout (see Settings.memory_format).

    "auto" follows measurements on the CPU (SD1.5-size models, oneDNN on AMX/AVX-512): channels_last runs the VAE
    faster in both precisions (float32 decode 10-17%, bfloat16 2x) and the UNet 10% faster in bfloat16. A float32
    UNet ran 4-7% slower channels_last, until its convolutions kept their weights blocked (fastpaths.pack): then
    12-17% faster at 512, so it is channels_last where this CPU computes that form. Other devices keep PyTorch's
    default layout."""
    chosen = settings.memory_format
    if chosen != "auto":
        return chosen == "channels_last"
    if for_device.type != "cpu":
        return False
    if part != "unet" or (chosen_dtype := dtype(settings, for_device)) != torch.float32:
        return True
    from . import fastpaths  # imports diffusers: only when a float32 UNet is placed

    return fastpaths.packing_works(chosen_dtype) and not settings.compile


def check(settings: Settings) -> None:
    """A clear error at start-up for a device torch does not know or this machine does not have."""
    if not settings.device:
        return
    try:
        chosen = torch.device(settings.device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {settings.device!r} is not a torch device ({exc})") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device!r}: this machine has no CUDA device torch can use")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {settings.device!r}: MPS is not available here")


def prefers_channels_last(module: torch.nn.Module) -> bool:
    """True when the module's first 4-D weight is stored channels_last (inputs then go in that layout too)."""
    for owner in module.modules():
        p = owner._parameters.get("weight")
        if p is None or p.ndim != 4:
            continue
        # blocked convolution weights (fastpaths.pack), and those still to be packed at the first call (kept in
        # their file's layout), run channels_last
        if p.layout != torch.strided or getattr(owner, "packs_weight", False):
            return True
        return p.shape[1] > 1 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def cpu_generator(seed: int) -> torch.Generator:
    # Seeds above 2**63 are folded into torch's unsigned 64-bit range the same way on every platform.
    return torch.Generator("cpu").manual_seed(int(seed) % (2**64))
