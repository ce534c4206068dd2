"""Optional compilation of a checkpoint's UNet, for long-running servers (``--compile``, ``NODEGRAPH_COMPILE=1``).

The UNet is compiled with torch.compile (inductor) with *freezing*: its weights become constants of the compiled
graph, which lets oneDNN pre-pack them and fuse the operations around convolutions and matrix products. Measured on
the 2-core AMX CPU (``benchmarks/speed.py --compile``; SD1.5-size UNet in bfloat16): a step at 512x512 1.05-1.45 s
eager against 0.74-0.76 s compiled, after a compile of ~75 s per new image size and batch; without freezing it
gains nothing. Hence off by default, and meant for servers that draw the same sizes for hours.

What forces a recompile is what the compiled graph depends on: the UNet (each checkpoint has its own), the input
shapes (size, batch, classifier-free guidance doubling it) and the dtype; torch's guards check those. Because the
weights are frozen into the graph, a model handle with patches that change them while it runs (LoRA, FreeU,
IP-Adapter) runs eagerly: its compiled graph would otherwise compute with stale weights. The frozen constants are
a second copy of the UNet's weights, held while the UNet lives; when a compiled UNet is unloaded the compiled code
is dropped too.

A machine without what inductor needs (a C++ compiler on the CPU, Triton on CUDA) logs one warning and runs
eagerly.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Callable

import torch

log = logging.getLogger("nodes.compilation")

_lock = threading.Lock()
_failed: set[int] = set()  # ids of UNets whose compilation failed (they run eagerly from then on)


def unet_for(model, unet: torch.nn.Module, enabled: bool) -> Callable:
    """The callable a sampler runs for ``unet`` (``model.applied()``'s): compiled when ``enabled`` and the handle's
    weights are those the graph froze, the module itself otherwise."""
    if not enabled or model.patches or unet.device.type not in ("cpu", "cuda") or id(unet) in _failed:
        return unet
    with _lock:
        compiled = unet.__dict__.get("_nodegraph_compiled")
        if compiled is None:
            compiled = torch.compile(unet, dynamic=False)
            # held by the module itself (a cycle the collector frees with it); the code torch keeps for the frozen
            # graphs is dropped when the module goes, or it would keep the second copy of the weights alive
            unet.__dict__["_nodegraph_compiled"] = compiled
            weakref.finalize(unet, _forget, id(unet))
    return _Guarded(unet, compiled)


class _Guarded:
    """Calls the compiled UNet with freezing on, falling back to the module if compilation fails."""

    def __init__(self, unet: torch.nn.Module, compiled: Callable):
        self.unet, self.compiled = unet, compiled

    def __call__(self, *args, **kwargs):
        import torch._inductor.config as inductor

        try:
            with inductor.patch(freezing=True):
                return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager module computes the same thing
            if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
                raise
            _failed.add(id(self.unet))
            log.warning("compiling the UNet failed, running it uncompiled: %s", str(e).splitlines()[0] if str(e)
                        else type(e).__name__)
            return self.unet(*args, **kwargs)


def _forget(unet_id: int) -> None:
    _failed.discard(unet_id)
    import torch._dynamo

    torch._dynamo.reset()  # compiled code of every model: the others recompile on their next run
