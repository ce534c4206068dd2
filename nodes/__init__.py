"""The node library: every node type nodegraph ships. Diffusion knowledge lives here, one module per family.

``NODES`` lists the node classes; ``configure(settings)`` receives the command line's settings (models folder,
device, dtype) before anything runs. diffusers and transformers are imported only when a model is loaded, so
listing the nodes costs little more than importing torch.
"""

from __future__ import annotations

from . import conditioning, control, freeu, images, ipadapter, latent, loaders, lora, primitives, sampling
from .settings import configure

NODES = [*loaders.NODES, *lora.NODES, *conditioning.NODES, *sampling.NODES, *latent.NODES, *images.NODES,
         *control.NODES, *ipadapter.NODES, *freeu.NODES,
         *primitives.NODES]

__all__ = ["NODES", "configure"]


def free() -> None:
    """Release cached accelerator memory (the server's POST /free, after the result cache is cleared)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def devices_info() -> list[dict]:
    """The compute devices, in the shape of ComfyUI's /system_stats."""
    import torch

    from . import devices

    chosen = devices.device()
    info = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free_bytes, total = torch.cuda.mem_get_info(i)
            info.append({"name": torch.cuda.get_device_name(i), "type": "cuda", "index": i, "vram_total": total,
                         "vram_free": free_bytes, "torch_vram_total": total, "torch_vram_free": free_bytes})
    else:
        info.append({"name": str(chosen), "type": chosen.type, "index": None, "vram_total": 0, "vram_free": 0,
                     "torch_vram_total": 0, "torch_vram_free": 0})
    return info


def list_models(folder: str) -> list[str]:
    """What a models subfolder holds, as the loader nodes list it (GET /models/{folder})."""
    from nodegraph.paths import list_files, safe_join

    from .settings import current

    if folder == "checkpoints":
        return loaders._checkpoint_names()
    return list_files(safe_join(current().models_dir, folder))
