"""What nodegraph knows of ComfyUI's core node types: each type's inputs in declared order (which are widgets,
which are optional) and its outputs, as ComfyUI declares them. The editor's ``widgets_values`` follow the widget
order, and API links name outputs by index, so both readers of ComfyUI documents start here.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodegraph.comfy_format import UI_ONLY_WIDGETS  # noqa: F401  (re-exported for the library's readers)

CONTROL, UPLOAD = "control_after_generate", "upload"


@dataclass(frozen=True)
class Schema:
    """A ComfyUI node type: ``inputs`` in declared order as (name, is_widget, is_optional), ``outputs`` as types."""

    inputs: tuple[tuple[str, bool, bool], ...]
    outputs: tuple[str, ...]

    @property
    def names(self) -> set[str]:
        return {name for name, _, _ in self.inputs}

    def widget_names(self) -> list[str]:
        """The widget names in ``widgets_values`` order, with the editor-only entries at their places."""
        out = []
        for name, widget, _ in self.inputs:
            if widget:
                out.append(name)
                if name in ("seed", "noise_seed"):
                    out.append(CONTROL)
        return out


def _schema(spec: str, outputs: str) -> Schema:
    """``spec``: the inputs in order, widgets marked ``*``, optional ones ``?`` ("model seed* steps* vae?")."""
    inputs = []
    for token in spec.split():
        optional = token.endswith("?")
        token = token.rstrip("?")
        widget = token.endswith("*")
        inputs.append((token.rstrip("*"), widget, optional))
    return Schema(tuple(inputs), tuple(outputs.split()))


SCHEMAS: dict[str, Schema] = {
    "CheckpointLoaderSimple": _schema("ckpt_name*", "MODEL CLIP VAE"),
    "CheckpointLoader": _schema("config_name* ckpt_name*", "MODEL CLIP VAE"),
    "VAELoader": _schema("vae_name*", "VAE"),
    "CLIPSetLastLayer": _schema("clip stop_at_clip_layer*", "CLIP"),
    "CLIPTextEncode": _schema("text* clip", "CONDITIONING"),
    "EmptyLatentImage": _schema("width* height* batch_size*", "LATENT"),
    "KSampler": _schema("model seed* steps* cfg* sampler_name* scheduler* positive negative latent_image denoise*",
                        "LATENT"),
    "KSamplerAdvanced": _schema("model add_noise* noise_seed* steps* cfg* sampler_name* scheduler* positive negative "
                                "latent_image start_at_step* end_at_step* return_with_leftover_noise*", "LATENT"),
    "VAEDecode": _schema("samples vae", "IMAGE"),
    "VAEEncode": _schema("pixels vae", "LATENT"),
    "VAEEncodeForInpaint": _schema("pixels vae mask grow_mask_by*", "LATENT"),
    "SetLatentNoiseMask": _schema("samples mask", "LATENT"),
    "LatentUpscale": _schema("samples upscale_method* width* height* crop*", "LATENT"),
    "LatentUpscaleBy": _schema("samples upscale_method* scale_by*", "LATENT"),
    "ImageScale": _schema("image upscale_method* width* height* crop*", "IMAGE"),
    "ImageScaleToTotalPixels": _schema("image upscale_method* megapixels*", "IMAGE"),
    "ImagePadForOutpaint": _schema("image left* top* right* bottom* feathering*", "IMAGE MASK"),
    "SaveImage": _schema("images filename_prefix*", ""),
    "PreviewImage": _schema("images", ""),
    "LoadImage": _schema("image*", "IMAGE MASK"),
    "LoraLoader": _schema("model clip lora_name* strength_model* strength_clip*", "MODEL CLIP"),
    "LoraLoaderModelOnly": _schema("model lora_name* strength_model*", "MODEL"),
    "ControlNetLoader": _schema("control_net_name*", "CONTROL_NET"),
    "DiffControlNetLoader": _schema("model control_net_name*", "CONTROL_NET"),
    "T2IAdapterLoader": _schema("t2i_adapter_name*", "CONTROL_NET"),
    "ControlNetApply": _schema("conditioning control_net image strength*", "CONDITIONING"),
    "ControlNetApplyAdvanced": _schema("positive negative control_net image strength* start_percent* end_percent* "
                                       "vae?", "CONDITIONING CONDITIONING"),
    "Canny": _schema("image low_threshold* high_threshold*", "IMAGE"),
    "ConditioningZeroOut": _schema("conditioning", "CONDITIONING"),
    "ConditioningCombine": _schema("conditioning_1 conditioning_2", "CONDITIONING"),
    "FreeU": _schema("model b1* b2* s1* s2*", "MODEL"),
    "ModelSamplingDiscrete": _schema("model sampling* zsnr*", "MODEL"),
    "GrowMask": _schema("mask expand* tapered_corners*", "MASK"),
}


def widget_names(class_type: str) -> list[str] | None:
    """The widget names of a ComfyUI core node type in ``widgets_values`` order, with the editor-only entries
    (``nodegraph.comfy_format.UI_ONLY_WIDGETS``: the control-after-generate choice after a seed, LoadImage's upload
    button) at their places; None for a type this library does not know."""
    schema = SCHEMAS.get(class_type)
    if schema is None:
        return None
    names = schema.widget_names()
    if class_type == "LoadImage":
        names.append(UPLOAD)
    return names
