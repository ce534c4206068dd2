"""FreeU: re-weights the UNet decoder's backbone and skip features for free quality gains (Si et al., 2023).

The node returns the model with a FreeU patch; the patch switches diffusers' FreeU on in the UNet's up blocks only
while that model is sampling, so the cached checkpoint and other branches never see it. diffusers implements FreeU
v1 (a fixed backbone factor b): the numbers are not interchangeable with ComfyUI's FreeU_V2.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from nodegraph import Float, Node, Output, Socket

from .values import MODEL


@dataclass(frozen=True)
class FreeUPatch:
    s1: float
    s2: float
    b1: float
    b2: float

    @contextlib.contextmanager
    def apply(self, unet):
        unet.enable_freeu(s1=self.s1, s2=self.s2, b1=self.b1, b2=self.b2)
        try:
            yield
        finally:
            unet.disable_freeu()


class FreeU(Node):
    """Apply FreeU to a model (as diffusers' enable_freeu). b1, b2 scale the backbone features of the first two
    decoder stages, s1, s2 damp their skip connections' low frequencies. Suggested for SD1.5: s1 0.9, s2 0.2,
    b1 1.5, b2 1.6; b = 1 and s = 1 leave the model unchanged."""

    category = "model patches"
    model = Socket(MODEL)
    s1 = Float(default=0.9, min=0.0, max=10.0, step=0.01)
    s2 = Float(default=0.2, min=0.0, max=10.0, step=0.01)
    b1 = Float(default=1.5, min=0.0, max=10.0, step=0.01)
    b2 = Float(default=1.6, min=0.0, max=10.0, step=0.01)
    outputs = (Output("model", MODEL),)

    def run(self, ctx, model, s1, s2, b1, b2):
        if any(isinstance(p, FreeUPatch) for p in model.patches):
            raise ValueError("this model already has FreeU applied; use one FreeU node per model")
        return model.with_patch(FreeUPatch(s1, s2, b1, b2))


NODES = [FreeU]
