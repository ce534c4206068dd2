"""ComfyUI API prompts as nodegraph workflows: each ComfyUI core node becomes the node (or the few nodes) of ours that
compute the same thing, with the ComfyUI node ids kept as ours.

A ComfyUI link names an output by index; ``_Import.outputs`` says which of our outputs each index is, or, for the
nodes that vanish on import (ModelSamplingDiscrete, CLIPSetLastLayer, the negative of ControlNetApplyAdvanced), which
ComfyUI output stands for it. Nodes we add get ids "<ComfyUI id>:<role>" ("3:schedule"). Everything unsupported,
node types and values alike, is collected and refused at once (``nodegraph.comfy_format.UnsupportedWorkflow``), so
nothing runs half-converted. Inputs a ComfyUI node does not declare are ignored with a warning, as ComfyUI does.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodegraph import Link, Settings, Workflow
from nodegraph.comfy_format import UI_ONLY_WIDGETS, Unsupported, UnsupportedWorkflow, auto_layout, check_api, is_link
from nodegraph.paths import UnsafePath

from .schemas import SCHEMAS

log = logging.getLogger("nodes.comfy")

LCM = "lcm"  # ComfyUI's lcm sampler becomes LCMScheduler + LCMSampler
#: ComfyUI sampler_name -> our Sampler's sampler (diffusers' scheduler of the same family)
SAMPLER_NAMES = {"euler": "euler", "euler_ancestral": "euler_ancestral", "heun": "heun", "dpmpp_2m": "dpmpp_2m",
                 "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde", "lms": "lms", "ddim": "ddim",
                 "ddpm": "ddpm", "uni_pc": "unipc", "uni_pc_bh2": "unipc", "lcm": LCM}
#: ComfyUI scheduler -> our Sampler's schedule
SCHEDULER_NAMES = {"normal": "default", "simple": "default", "karras": "karras", "exponential": "exponential",
                   "beta": "beta", "sgm_uniform": "trailing", "ddim_uniform": "default"}
#: the schedulers that go with lcm: LCMScheduler always picks LCM's own timesteps, as diffusers' LCM pipelines do
LCM_SCHEDULERS = ("sgm_uniform", "simple", "normal")
FILE_MARKS = (" [input]",)  # ComfyUI's annotated file names ("x.png [input]"); the input folder is ours too
ABSENT = object()


@dataclass(frozen=True)
class Ref:
    """Output ``index`` of ComfyUI node ``node``, to be turned into a link to our node once all are converted."""

    node: str
    index: int


class _Import:
    def __init__(self, api: dict, ui: dict | None, settings: Settings | None):
        self.api = check_api(api)
        self.ui = ui or {}
        self.settings = settings
        self.wf = Workflow()
        self.problems: list[Unsupported] = []
        self.outputs: dict[tuple[str, int], Link | Ref] = {}
        self.parent: dict[str, str] = {}  # a node we added -> the ComfyUI node it belongs to

    # --- the conversion ---------------------------------------------------------------------------------------------

    def run(self) -> Workflow:
        for nid, node in self.api.items():
            class_type = node["class_type"]
            convert = CONVERTERS.get(class_type)
            if convert is None:
                self.problem(nid, class_type, UNSUPPORTED.get(class_type, "no nodegraph counterpart: this node "
                                                                         "type is not supported"))
                continue
            convert(self, nid, class_type, self.declared(nid, class_type, node["inputs"]))
        if self.problems:
            raise UnsupportedWorkflow(self.problems)
        for nid, entry in self.wf.nodes.items():
            for name, value in entry.inputs.items():
                if isinstance(value, Ref):
                    entry.inputs[name] = self.link(value, nid, name)
        if self.problems:
            raise UnsupportedWorkflow(self.problems)
        self.layout()
        return self.wf

    def declared(self, nid: str, class_type: str, inputs: dict) -> dict:
        schema = SCHEMAS[class_type]
        unknown = [name for name in inputs if name not in schema.names and name not in UI_ONLY_WIDGETS]
        for name in unknown:
            log.warning("node %s (%s) has no input %r: ignored, as ComfyUI ignores it", nid, class_type, name)
        return {k: v for k, v in inputs.items() if k in schema.names}

    def link(self, ref: Ref, nid: str, name: str) -> Link | None:
        owner = self.parent.get(nid, nid)
        seen = set()
        target: Link | Ref | None = ref
        while isinstance(target, Ref):
            source = self.api.get(target.node, {}).get("class_type", "?")
            if target in seen:
                self.problem(owner, self.api[owner]["class_type"], f"its input goes round in a loop through node "
                                                                   f"{target.node} ({source})", name)
                return None
            seen.add(target)
            found = self.outputs.get((target.node, target.index))
            if found is None:
                count = len(SCHEMAS[source].outputs) if source in SCHEMAS else 0
                why = (f"which has {count} output{'s' * (count != 1)}" if target.index >= count
                       else "which passes on an input it was not given")
                self.problem(owner, self.api[owner]["class_type"], f"links to output {target.index} of node "
                                                                   f"{target.node} ({source}), {why}", name)
                return None
            target = found
        return target

    # --- helpers for the converters ---------------------------------------------------------------------------------

    def problem(self, nid: str, class_type: str, message: str, input: str | None = None) -> None:
        self.problems.append(Unsupported(nid, class_type, message, input))

    def add(self, our_id: str, node_type: str, parent: str | None = None, **inputs: Any) -> str:
        self.wf.add(our_id, node_type, **{k: self.value(v) for k, v in inputs.items() if v is not ABSENT})
        if parent is not None:
            self.parent[our_id] = parent
        return our_id

    @staticmethod
    def value(v: Any) -> Any:
        return Ref(v[0], v[1]) if is_link(v) else v

    def out(self, nid: str, *names: str | None) -> None:
        """Outputs 0, 1, ... of ComfyUI node ``nid`` are our node ``nid``'s outputs ``names``."""
        for index, name in enumerate(names):
            if name is not None:
                self.outputs[(nid, index)] = Link(nid, name)

    def alias(self, nid: str, index: int, value: Any) -> None:
        """Output ``index`` of ``nid`` is whatever feeds ``value`` (a node that vanishes on import)."""
        if is_link(value):
            self.outputs[(nid, index)] = Ref(value[0], value[1])

    def const(self, nid: str, class_type: str, inputs: dict, name: str, default: Any = ABSENT) -> Any:
        """An input nodegraph must read at import: a link there is a problem."""
        v = inputs.get(name, default)
        if v is ABSENT:
            self.problem(nid, class_type, "is missing", name)
        elif is_link(v):
            self.problem(nid, class_type, "comes from a link, but nodegraph needs a value here to convert the node",
                         name)
            return ABSENT
        return v

    def file(self, nid: str, class_type: str, inputs: dict, name: str) -> Any:
        """A file name as our folders take it: '/' separators, ComfyUI's "[input]" mark dropped."""
        v = self.const(nid, class_type, inputs, name)
        if isinstance(v, str):
            v = v.replace("\\", "/")
            for mark in FILE_MARKS:
                v = v.removesuffix(mark)
        return v

    def source(self, value: Any) -> tuple[str, int, dict] | None:
        """The ComfyUI node and output index a link comes from."""
        return (value[0], value[1], self.api[value[0]]) if is_link(value) and value[0] in self.api else None

    def clip_layer(self, value: Any) -> Any:
        """The stop_at_clip_layer that applies to a CLIP link (CLIPSetLastLayer, possibly before LoRAs)."""
        for _ in range(len(self.api)):
            found = self.source(value)
            if found is None:
                return None
            _, index, node = found
            if node["class_type"] == "CLIPSetLastLayer":
                return node["inputs"].get("stop_at_clip_layer")
            if node["class_type"] == "LoraLoader" and index == 1:
                value = node["inputs"].get("clip")
                continue
            return None
        return None

    def clip_of_model(self, value: Any) -> Ref | None:
        """The CLIP that goes with a MODEL link (its checkpoint's, or the LoRA loader's), for a LoRAStack that needs
        one although ComfyUI's model-only loader has none."""
        for _ in range(len(self.api)):
            found = self.source(value)
            if found is None:
                return None
            nid, index, node = found
            class_type = node["class_type"]
            if class_type in ("CheckpointLoaderSimple", "CheckpointLoader", "LoraLoader") and index == 0:
                return Ref(nid, 1)
            if class_type in ("LoraLoaderModelOnly", "ModelSamplingDiscrete", "FreeU"):
                value = node["inputs"].get("model")
                continue
            return None
        return None

    def is_adapter(self, value: Any) -> bool:
        """Whether a CONTROL_NET link comes from a loader of a T2I-Adapter (ComfyUI loads both kinds alike)."""
        found = self.source(value)
        if found is None:
            return False
        _, _, node = found
        if node["class_type"] == "T2IAdapterLoader":
            return True
        if node["class_type"] in ("ControlNetLoader", "DiffControlNetLoader"):
            name = node["inputs"].get("control_net_name")
            return isinstance(name, str) and _is_t2i_adapter(self.settings or Settings.from_env(),
                                                             name.replace("\\", "/"))
        return False

    # --- layout -----------------------------------------------------------------------------------------------------

    def layout(self) -> None:
        ui_nodes = self.ui.get("nodes") or {}
        for our_id, entry in self.wf.nodes.items():
            comfy_id = self.parent.get(our_id, our_id)
            data = ui_nodes.get(comfy_id) or {}
            ui: dict[str, Any] = {}
            pos = data.get("pos")
            if isinstance(pos, list) and len(pos) >= 2:
                # a node we added sits just above the ComfyUI node it belongs to
                ui["pos"] = list(pos[:2]) if our_id == comfy_id else [pos[0], pos[1] - 160]
            if our_id == comfy_id:
                title = data.get("title") or self.api[comfy_id].get("_meta", {}).get("title")
                if isinstance(title, str) and title and title != self.api[comfy_id]["class_type"]:
                    ui["title"] = title
            if ui:
                entry.ui = ui
        if self.ui.get("groups"):
            self.wf.groups = list(self.ui["groups"])
        if self.ui.get("notes"):
            self.wf.notes = list(self.ui["notes"])
        auto_layout(self.wf)


def _is_t2i_adapter(settings: Settings, name: str) -> bool:
    from ..control import T2I_ADAPTERS
    from ..loading import config_class

    try:
        path = T2I_ADAPTERS.path(settings, name)
    except UnsafePath:
        return False
    return path.is_dir() and config_class(path) == "T2IAdapter"


@functools.cache
def schedule_offered(sampler: str, schedule: str) -> bool:
    """Whether our Sampler's ``sampler`` has ``schedule`` (diffusers' scheduler class takes its option)."""
    from ..schedulers import SAMPLERS, SCHEDULES

    option = SCHEDULES[schedule][0]
    if not option:
        return True
    import diffusers

    cls = getattr(diffusers, SAMPLERS[sampler][0])
    return option in inspect.signature(cls.__init__).parameters


# --------------------------------------------------------------------------------------------------------------------
# One converter per ComfyUI node type: (import, ComfyUI id, class_type, declared inputs)
# --------------------------------------------------------------------------------------------------------------------

Converter = Callable[[_Import, str, str, dict], None]


def _checkpoint(im: _Import, nid: str, ct: str, i: dict) -> None:
    if ct == "CheckpointLoader" and "config_name" in i:
        log.info("node %s (%s): config_name is not needed: the checkpoint's kind is read from its content", nid, ct)
    im.add(nid, "LoadCheckpoint", ckpt=im.file(nid, ct, i, "ckpt_name"))
    im.out(nid, "model", "clip", "vae")


def _vae_loader(im: _Import, nid: str, ct: str, i: dict) -> None:
    im.add(nid, "LoadVAE", vae=im.file(nid, ct, i, "vae_name"))
    im.out(nid, "vae")


def _clip_set_last_layer(im: _Import, nid: str, ct: str, i: dict) -> None:
    stop = im.const(nid, ct, i, "stop_at_clip_layer", -1)
    if stop is not ABSENT and (isinstance(stop, bool) or not isinstance(stop, int) or stop > -1):
        im.problem(nid, ct, f"stop_at_clip_layer must be a negative whole number (-1 = the last layer), got {stop!r}",
                   "stop_at_clip_layer")
    im.alias(nid, 0, i.get("clip"))  # the encoders it feeds take its layer as their clip_skip


def _clip_text_encode(im: _Import, nid: str, ct: str, i: dict) -> None:
    stop = im.clip_layer(i.get("clip"))
    skip = -stop - 1 if isinstance(stop, int) and not isinstance(stop, bool) and stop < 0 else 0
    im.add(nid, "CLIPEncode", clip=i.get("clip", ABSENT), text=i.get("text", ABSENT), clip_skip=skip)
    im.out(nid, "conditioning")


def _empty_latent(im: _Import, nid: str, ct: str, i: dict) -> None:
    im.add(nid, "EmptyLatent", width=i.get("width", ABSENT), height=i.get("height", ABSENT),
           batch=i.get("batch_size", ABSENT))
    im.out(nid, "latent")


def _ksampler(im: _Import, nid: str, ct: str, i: dict) -> None:
    before = len(im.problems)
    sampler_name = im.const(nid, ct, i, "sampler_name", "euler")
    scheduler = im.const(nid, ct, i, "scheduler", "normal")
    ours = SAMPLER_NAMES.get(sampler_name) if isinstance(sampler_name, str) else None
    if ours is None and sampler_name is not ABSENT:
        im.problem(nid, ct, f"sampler {sampler_name!r} is not supported (supported: {', '.join(SAMPLER_NAMES)})",
                   "sampler_name")
    schedule = _schedule(im, nid, ct, sampler_name, ours, scheduler)
    if ct == "KSamplerAdvanced":
        seed, denoise = i.get("noise_seed", ABSENT), 1.0
        _advanced_supported(im, nid, ct, i)
    else:
        seed, denoise = i.get("seed", ABSENT), i.get("denoise", ABSENT)
    if len(im.problems) > before:
        return
    steps = i.get("steps", ABSENT)
    if isinstance(denoise, (int, float)) and not isinstance(denoise, bool) and 0 < denoise < 1 \
            and isinstance(steps, int):
        log.warning("node %s (%s): denoise %s becomes strength %s, which counts steps differently: ComfyUI runs "
                    "%d steps of a %d-step schedule (steps / denoise), nodegraph runs %d of %d steps (steps x "
                    "strength, as diffusers' image-to-image)", nid, ct, denoise, denoise, steps,
                    int(steps / denoise), int(steps * denoise), steps)
    common = {"model": i.get("model", ABSENT), "positive": i.get("positive", ABSENT),
              "negative": i.get("negative", ABSENT), "latent": i.get("latent_image", ABSENT), "seed": seed,
              "guidance": i.get("cfg", ABSENT), "strength": denoise}
    if ours == LCM:
        im.add(nid, "LCMSampler", schedule=Link(f"{nid}:schedule", "schedule"), **common)
        im.add(f"{nid}:schedule", "LCMScheduler", parent=nid, model=i.get("model", ABSENT), steps=steps)
    else:
        im.add(nid, "Sampler", steps=steps, sampler=ours, schedule=schedule, **common)
    im.out(nid, "latent")


def _schedule(im: _Import, nid: str, ct: str, sampler_name: Any, ours: str | None, scheduler: Any) -> str:
    if scheduler is ABSENT:
        return "default"
    if not isinstance(scheduler, str) or scheduler not in SCHEDULER_NAMES:  # a list or an object is no name
        im.problem(nid, ct, f"scheduler {scheduler!r} is not supported (supported: {', '.join(SCHEDULER_NAMES)})",
                   "scheduler")
        return "default"
    if ours == LCM:
        if scheduler not in LCM_SCHEDULERS:
            im.problem(nid, ct, f"scheduler {scheduler!r} with the lcm sampler is not supported: LCM picks its own "
                                f"timesteps (use {', '.join(LCM_SCHEDULERS)})", "scheduler")
        return "default"
    if scheduler == "ddim_uniform" and ours != "ddim":
        im.problem(nid, ct, f"scheduler 'ddim_uniform' is supported with the ddim sampler only, not with "
                            f"{sampler_name!r}", "scheduler")
        return "default"
    schedule = SCHEDULER_NAMES[scheduler]
    if ours is not None and not schedule_offered(ours, schedule):
        im.problem(nid, ct, f"scheduler {scheduler!r} is not available with sampler {sampler_name!r} (diffusers' "
                            f"scheduler for it has no {schedule} spacing)", "scheduler")
    return schedule


def _advanced_supported(im: _Import, nid: str, ct: str, i: dict) -> None:
    """KSamplerAdvanced as a plain run: noise added, from the first step to the last, no leftover noise."""
    add_noise = im.const(nid, ct, i, "add_noise", "enable")
    if add_noise not in ("enable", ABSENT):
        im.problem(nid, ct, f"add_noise {add_noise!r} is not supported (only 'enable')", "add_noise")
    start = im.const(nid, ct, i, "start_at_step", 0)
    if start not in (0, ABSENT):
        im.problem(nid, ct, f"start_at_step {start!r} is not supported (only 0: sampling from the first step)",
                   "start_at_step")
    steps, end = i.get("steps"), im.const(nid, ct, i, "end_at_step", 10000)
    if end is not ABSENT and isinstance(steps, int) and (not isinstance(end, int) or end < steps):
        im.problem(nid, ct, f"end_at_step {end!r} is not supported (only >= steps, {steps}: sampling to the end)",
                   "end_at_step")
    leftover = im.const(nid, ct, i, "return_with_leftover_noise", "disable")
    if leftover not in ("disable", ABSENT):
        im.problem(nid, ct, f"return_with_leftover_noise {leftover!r} is not supported (only 'disable')",
                   "return_with_leftover_noise")


def _model_sampling(im: _Import, nid: str, ct: str, i: dict) -> None:
    sampling = im.const(nid, ct, i, "sampling", "eps")
    if sampling not in ("eps", "lcm", ABSENT):
        im.problem(nid, ct, f"sampling {sampling!r} is not supported (only 'eps', and 'lcm' before the lcm "
                            f"sampler)", "sampling")
    zsnr = im.const(nid, ct, i, "zsnr", False)
    if zsnr not in (False, ABSENT):
        im.problem(nid, ct, f"zsnr {zsnr!r} is not supported (only false)", "zsnr")
    im.alias(nid, 0, i.get("model"))  # eps is the model's own; lcm is what our LCM sampler does anyway


def _vae_encode_for_inpaint(im: _Import, nid: str, ct: str, i: dict) -> None:
    mask = im.add(f"{nid}:mask", "GrowMask", parent=nid, mask=i.get("mask", ABSENT),
                  pixels=i.get("grow_mask_by", 6))
    im.add(nid, "InpaintEncode", vae=i.get("vae", ABSENT), image=i.get("pixels", ABSENT), mask=Link(mask, "mask"))
    im.out(nid, "latent")


def _set_latent_noise_mask(im: _Import, nid: str, ct: str, i: dict) -> None:
    found = im.source(i.get("samples"))
    if found is None or found[2]["class_type"] != "VAEEncode":
        what = f"node {found[0]} ({found[2]['class_type']})" if found else "no node"
        im.problem(nid, ct, f"is supported on the latent of a VAEEncode only (inpainting that image), here it comes "
                            f"from {what}", "samples")
        return
    encoder = found[2]["inputs"]
    im.add(nid, "InpaintEncode", vae=encoder.get("vae", ABSENT), image=encoder.get("pixels", ABSENT),
           mask=i.get("mask", ABSENT))
    im.out(nid, "latent")


def _save_image(im: _Import, nid: str, ct: str, i: dict) -> None:
    im.add(nid, "SaveImage", images=i.get("images", ABSENT), filename_prefix=i.get("filename_prefix", ABSENT))


def _preview_image(im: _Import, nid: str, ct: str, i: dict) -> None:
    im.add(nid, "PreviewImage", images=i.get("images", ABSENT))


def _load_image(im: _Import, nid: str, ct: str, i: dict) -> None:
    name = im.file(nid, ct, i, "image")
    if isinstance(name, str) and name.endswith((" [output]", " [temp]")):
        im.problem(nid, ct, f"{name!r}: LoadImage reads the input folder only", "image")
    im.add(nid, "LoadImage", image=name)
    im.out(nid, "image", "mask")


def _lora(im: _Import, nid: str, ct: str, i: dict) -> None:
    row = {"lora": im.file(nid, ct, i, "lora_name"),
           "strength_model": im.const(nid, ct, i, "strength_model", 1.0)}
    if ct == "LoraLoader":
        row["strength_clip"] = im.const(nid, ct, i, "strength_clip", 1.0)
        clip = i.get("clip", ABSENT)
    else:
        row["strength_clip"] = 0.0
        clip = im.clip_of_model(i.get("model"))
        if clip is None:
            im.problem(nid, ct, "nodegraph's LoRAStack also takes the model's CLIP, and no checkpoint loader was "
                                "found before this model", "model")
            return
    if any(v is ABSENT for v in row.values()):
        return
    im.add(nid, "LoRAStack", model=i.get("model", ABSENT), clip=clip, loras=[row])
    im.out(nid, "model", "clip" if ct == "LoraLoader" else None)


def _controlnet_loader(im: _Import, nid: str, ct: str, i: dict) -> None:
    key = "t2i_adapter_name" if ct == "T2IAdapterLoader" else "control_net_name"
    name = im.file(nid, ct, i, key)
    if ct == "T2IAdapterLoader" or (isinstance(name, str) and im.is_adapter([nid, 0])):
        im.add(nid, "LoadT2IAdapter", adapter=name)
        im.out(nid, "adapter")
    else:
        im.add(nid, "LoadControlNet", control_net=name)
        im.out(nid, "control_net")


def _controlnet_apply(im: _Import, nid: str, ct: str, i: dict) -> None:
    advanced = ct == "ControlNetApplyAdvanced"
    conditioning = i.get("positive" if advanced else "conditioning", ABSENT)
    start, end = (i.get("start_percent", 0.0), i.get("end_percent", 1.0)) if advanced else (0.0, 1.0)
    if im.is_adapter(i.get("control_net")):
        if (start, end) != (0.0, 1.0):
            im.problem(nid, ct, f"a T2I-Adapter applies at every step: start_percent {start} / end_percent {end} "
                                f"are not supported with one (only 0 and 1)", "start_percent")
            return
        im.add(nid, "T2IAdapterApply", conditioning=conditioning, adapter=i.get("control_net", ABSENT),
               image=i.get("image", ABSENT), strength=i.get("strength", ABSENT))
    else:
        im.add(nid, "ControlNetApply", conditioning=conditioning, control_net=i.get("control_net", ABSENT),
               image=i.get("image", ABSENT), strength=i.get("strength", ABSENT), start_percent=start,
               end_percent=end)
    im.out(nid, "conditioning")
    if advanced:  # our samplers apply the positive's controls to both halves of guidance, as diffusers does
        im.alias(nid, 1, i.get("negative"))


def _grow_mask(im: _Import, nid: str, ct: str, i: dict) -> None:
    tapered = im.const(nid, ct, i, "tapered_corners", True)
    if tapered not in (False, ABSENT):
        im.problem(nid, ct, "tapered_corners true is not supported: nodegraph's GrowMask grows over a square "
                            "(tapered_corners false)", "tapered_corners")
    im.add(nid, "GrowMask", mask=i.get("mask", ABSENT), pixels=i.get("expand", ABSENT))
    im.out(nid, "mask")


def _canny(im: _Import, nid: str, ct: str, i: dict) -> None:
    thresholds = {}
    for name, default in (("low_threshold", 0.4), ("high_threshold", 0.8)):
        v = im.const(nid, ct, i, name, default)
        if v is ABSENT:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            im.problem(nid, ct, f"a threshold is a fraction between 0 and 1 in ComfyUI, got {v!r}", name)
            return
        thresholds[name] = round(v * 255)  # ours are on the 0-255 scale of the 8-bit image
    im.add(nid, "Canny", image=i.get("image", ABSENT), **thresholds)
    im.out(nid, "image")


def _renamed(ours: str, inputs: dict[str, str], *outputs: str) -> Converter:
    """A ComfyUI node that is one of ours with its inputs renamed ({our input: theirs}) and outputs in order."""
    def convert(im: _Import, nid: str, ct: str, i: dict) -> None:
        im.add(nid, ours, **{name: i.get(theirs, ABSENT) for name, theirs in inputs.items()})
        im.out(nid, *outputs)
    return convert


def _same(*names: str) -> dict[str, str]:
    return {name: name for name in names}


CONVERTERS: dict[str, Converter] = {
    "CheckpointLoaderSimple": _checkpoint, "CheckpointLoader": _checkpoint, "VAELoader": _vae_loader,
    "CLIPSetLastLayer": _clip_set_last_layer, "CLIPTextEncode": _clip_text_encode, "EmptyLatentImage": _empty_latent,
    "KSampler": _ksampler, "KSamplerAdvanced": _ksampler, "ModelSamplingDiscrete": _model_sampling,
    "VAEDecode": _renamed("VAEDecode", {"vae": "vae", "latent": "samples"}, "image"),
    "VAEEncode": _renamed("VAEEncode", {"vae": "vae", "image": "pixels"}, "latent"),
    "VAEEncodeForInpaint": _vae_encode_for_inpaint, "SetLatentNoiseMask": _set_latent_noise_mask,
    "LatentUpscale": _renamed("LatentUpscale", {"latent": "samples", "method": "upscale_method",
                                                **_same("width", "height", "crop")}, "latent"),
    "LatentUpscaleBy": _renamed("LatentUpscaleBy", {"latent": "samples", "method": "upscale_method",
                                                    "scale": "scale_by"}, "latent"),
    "ImageScale": _renamed("ImageScale", {"method": "upscale_method", **_same("image", "width", "height", "crop")},
                           "image"),
    "ImageScaleToTotalPixels": _renamed("ImageScaleToTotalPixels",
                                        {"method": "upscale_method", **_same("image", "megapixels")}, "image"),
    "ImagePadForOutpaint": _renamed("ImagePadForOutpaint",
                                    _same("image", "left", "top", "right", "bottom", "feathering"), "image", "mask"),
    "SaveImage": _save_image, "PreviewImage": _preview_image, "LoadImage": _load_image,
    "LoraLoader": _lora, "LoraLoaderModelOnly": _lora,
    "ControlNetLoader": _controlnet_loader, "DiffControlNetLoader": _controlnet_loader,
    "T2IAdapterLoader": _controlnet_loader, "ControlNetApply": _controlnet_apply,
    "ControlNetApplyAdvanced": _controlnet_apply, "Canny": _canny, "GrowMask": _grow_mask,
    "ConditioningZeroOut": _renamed("ConditioningZeroOut", _same("conditioning"), "conditioning"),
    "ConditioningCombine": _renamed("ConditioningCombine", _same("conditioning_1", "conditioning_2"),
                                    "conditioning"),
    "FreeU": _renamed("FreeU", _same("model", "b1", "b2", "s1", "s2"), "model"),
}
#: why a known ComfyUI type has no converter (the ones ComfyUI's core has but nodegraph does not yet)
UNSUPPORTED: dict[str, str] = {}


def to_workflow(api: dict, ui: dict | None = None, settings: Settings | None = None) -> Workflow:
    """A ComfyUI API prompt (and the editor data of ``nodegraph.comfy_format.ui_to_api``) as our Workflow, with the
    ComfyUI node ids kept; ``UnsupportedWorkflow`` lists every node type and value nodegraph cannot run. ``settings``
    (default: from the environment) say where the model folders are, to tell T2I-Adapters from ControlNets."""
    return _Import(api, ui, settings).run()
