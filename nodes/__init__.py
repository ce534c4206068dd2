"""The node library: every node type nodegraph ships. Diffusion knowledge lives here, one module per family.

It implements ``nodegraph.library.Library``: ``NODES`` lists the node classes; ``configure(settings)`` checks the
settings once at start-up; ``free()`` and ``system_info(settings)`` serve the server's ``/free`` and
``/system_stats``; ``comfy`` (``nodes.comfy``) reads and writes ComfyUI workflows. Settings reach the nodes through
``ctx.settings``, never through a global here. diffusers and transformers are imported only when a model is loaded,
so listing the nodes costs little more than importing torch.
"""

from __future__ import annotations

from nodegraph import Settings

from . import (animatediff, checkpoint, conditioning, control, freeu, images, ipadapter, latent, lcm, lora, primitives,
               schedulers)
from . import comfy
from . import consistency
from . import latent_diffusion
from . import image_ops

NODES = [*checkpoint.NODES, *lora.NODES, *conditioning.NODES, *lcm.NODES, *schedulers.NODES, *latent.NODES,
         *images.NODES, *image_ops.NODES, *control.NODES, *ipadapter.NODES, *freeu.NODES, *animatediff.NODES,
         *consistency.NODES, *latent_diffusion.NODES, *primitives.NODES]

__all__ = ["NODES", "comfy", "configure", "free", "system_info"]


def configure(settings: Settings) -> None:
    """Refuse, before anything runs, a device this machine does not have."""
    from . import devices

    devices.check(settings)


def free() -> None:
    """Release the memory of the models and results the cache let go (the server's POST /free, after the result
    cache is cleared): collect reference cycles (modules hold some), hand cached accelerator memory back, and ask
    glibc to return freed heap pages to the system, without which the process's RSS stays where it was."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim_heap()


def _trim_heap() -> None:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def system_info(settings: Settings) -> list[dict]:
    """The compute devices, in the shape of ComfyUI's /system_stats."""
    import torch

    from . import devices

    chosen = devices.device(settings)
    precision = str(devices.dtype(settings, chosen)).removeprefix("torch.")  # beyond ComfyUI's keys: what runs
    info = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free_bytes, total = torch.cuda.mem_get_info(i)
            info.append({"name": torch.cuda.get_device_name(i), "type": "cuda", "index": i, "vram_total": total,
                         "vram_free": free_bytes, "torch_vram_total": total, "torch_vram_free": free_bytes,
                         "dtype": precision})
    else:
        info.append({"name": str(chosen), "type": chosen.type, "index": None, "vram_total": 0, "vram_free": 0,
                     "torch_vram_total": 0, "torch_vram_free": 0, "dtype": precision})
    return info
