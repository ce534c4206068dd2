"""Our workflows in ComfyUI's API format, for the node types that have a ComfyUI core counterpart: the inverse of
``nodes.comfy.mapping``, so that a workflow imported from ComfyUI goes back with its ComfyUI node ids.

Most types map one to one (a table of input names). The others: an LCMSampler and its LCMScheduler are one KSampler
(sampler lcm); a CLIPEncode with clip_skip k reads its CLIP through a CLIPSetLastLayer (-(k + 1)); an InpaintEncode
is a VAEEncodeForInpaint when its mask comes from a GrowMask made for it, else a VAEEncode with a SetLatentNoiseMask;
a LoRAStack is a chain of LoRA loaders; a ControlNetApply with a start/end window is a ControlNetApplyAdvanced that
takes the negative of the sampler it feeds; primitives (Integer, Number, Text) are written into the inputs they feed.
"""

from __future__ import annotations

from typing import Any

from nodegraph import Link, Workflow
from nodegraph.comfy_format import Unsupported, UnsupportedWorkflow

#: our type -> (ComfyUI type, {our input: ComfyUI input}, {our output: ComfyUI output index}); inputs missing from
#: the table (tiled, sliced, EmptyLatent's vae) change memory use or nothing ComfyUI has, and are left out
SIMPLE: dict[str, tuple[str, dict[str, str], dict[str, int]]] = {
    "LoadVAE": ("VAELoader", {"vae": "vae_name"}, {"vae": 0}),
    "EmptyLatent": ("EmptyLatentImage", {"width": "width", "height": "height", "batch": "batch_size"}, {"latent": 0}),
    "VAEDecode": ("VAEDecode", {"latent": "samples", "vae": "vae"}, {"image": 0}),
    "VAEEncode": ("VAEEncode", {"image": "pixels", "vae": "vae"}, {"latent": 0}),
    "LatentUpscale": ("LatentUpscale", {"latent": "samples", "method": "upscale_method", "width": "width",
                                        "height": "height", "crop": "crop"}, {"latent": 0}),
    "LatentUpscaleBy": ("LatentUpscaleBy", {"latent": "samples", "method": "upscale_method", "scale": "scale_by"},
                        {"latent": 0}),
    "ImageScale": ("ImageScale", {"image": "image", "method": "upscale_method", "width": "width", "height": "height",
                                  "crop": "crop"}, {"image": 0}),
    "ImageScaleToTotalPixels": ("ImageScaleToTotalPixels", {"image": "image", "method": "upscale_method",
                                                            "megapixels": "megapixels"}, {"image": 0}),
    "ImagePadForOutpaint": ("ImagePadForOutpaint", {k: k for k in ("image", "left", "top", "right", "bottom",
                                                                   "feathering")}, {"image": 0, "mask": 1}),
    "SaveImage": ("SaveImage", {"images": "images", "filename_prefix": "filename_prefix"}, {}),
    "PreviewImage": ("PreviewImage", {"images": "images"}, {}),
    "LoadImage": ("LoadImage", {"image": "image"}, {"image": 0, "mask": 1}),
    "LoadControlNet": ("ControlNetLoader", {"control_net": "control_net_name"}, {"control_net": 0}),
    "LoadT2IAdapter": ("ControlNetLoader", {"adapter": "control_net_name"}, {"adapter": 0}),
    "T2IAdapterApply": ("ControlNetApply", {"conditioning": "conditioning", "adapter": "control_net",
                                            "image": "image", "strength": "strength"}, {"conditioning": 0}),
    "ConditioningZeroOut": ("ConditioningZeroOut", {"conditioning": "conditioning"}, {"conditioning": 0}),
    "ConditioningCombine": ("ConditioningCombine", {"conditioning_1": "conditioning_1",
                                                    "conditioning_2": "conditioning_2"}, {"conditioning": 0}),
    "FreeU": ("FreeU", {k: k for k in ("model", "b1", "b2", "s1", "s2")}, {"model": 0}),
}
#: our Sampler's sampler -> ComfyUI sampler_name; schedule -> scheduler
SAMPLERS = {"euler": "euler", "euler_ancestral": "euler_ancestral", "heun": "heun", "dpmpp_2m": "dpmpp_2m",
            "dpmpp_2m_sde": "dpmpp_2m_sde", "lms": "lms", "ddim": "ddim", "ddpm": "ddpm", "unipc": "uni_pc",
            "lcm": "lcm"}
SCHEDULES = {"default": "normal", "karras": "karras", "exponential": "exponential", "beta": "beta",
             "trailing": "sgm_uniform"}
PRIMITIVES = ("Integer", "Number", "Text")
SAMPLER_TYPES = ("Sampler", "LCMSampler")
CONTROL_CHAIN = ("ControlNetApply", "T2IAdapterApply")
SPECIAL = ("LoadCheckpoint", "CLIPEncode", "Sampler", "LCMSampler", "LCMScheduler", "InpaintEncode", "GrowMask",
           "LoRAStack", "ControlNetApply", "Canny", *PRIMITIVES)


class _Value:
    """A literal standing for an output (a primitive's value)."""

    def __init__(self, value: Any):
        self.value = value


class _Export:
    def __init__(self, wf: Workflow):
        self.wf = wf = _with_defaults(wf)
        self.api: dict[str, dict] = {}
        self.problems: list[Unsupported] = []
        self.outputs: dict[tuple[str, str], Any] = {}  # our output -> [ComfyUI id, index], _Value or an alias Link
        self.users: dict[str, set[str]] = {}
        for nid, node in wf.nodes.items():
            for _, link in node.links():
                self.users.setdefault(link.node, set()).add(nid)
        self.absorbed = self._absorbed_grow_masks()
        self.clip_layers: dict[tuple, str] = {}  # (CLIP link, k) -> the CLIPSetLastLayer written for it

    def run(self) -> dict:
        unknown = [Unsupported(nid, n.type, "has no ComfyUI core counterpart")
                   for nid, n in self.wf.nodes.items() if n.type not in SIMPLE and n.type not in SPECIAL]
        if unknown:
            raise UnsupportedWorkflow(unknown, "this workflow cannot be written in ComfyUI's API format")
        for nid, node in self.wf.nodes.items():
            self._outputs(nid, node)
        for nid, node in self.wf.nodes.items():
            self._emit(nid, node)
        self._control_windows()
        if self.problems:
            raise UnsupportedWorkflow(self.problems, "this workflow cannot be written in ComfyUI's API format")
        return self.api

    # --- outputs ----------------------------------------------------------------------------------------------------

    def _outputs(self, nid: str, node) -> None:
        t, inputs = node.type, node.inputs
        if t in SIMPLE:
            for name, index in SIMPLE[t][2].items():
                self.outputs[(nid, name)] = [nid, index]
        elif t == "LoadCheckpoint":
            self.outputs.update({(nid, "model"): [nid, 0], (nid, "clip"): [nid, 1], (nid, "vae"): [nid, 2]})
        elif t == "LoRAStack":
            rows = inputs.get("loras") or []
            if rows:
                last = nid if len(rows) == 1 else f"{nid}:{len(rows) - 1}"
                self.outputs.update({(nid, "model"): [last, 0], (nid, "clip"): [last, 1]})
            else:  # no LoRA: the stack passes its model and CLIP through
                self.outputs.update({(nid, "model"): inputs.get("model"), (nid, "clip"): inputs.get("clip")})
        elif t in PRIMITIVES:
            value = inputs.get("value")
            if isinstance(value, Link):
                self.outputs[(nid, "value")] = value
            else:
                self.outputs[(nid, "value")] = _Value(value)
        elif t in ("CLIPEncode", "ControlNetApply"):
            self.outputs[(nid, "conditioning")] = [nid, 0]
        elif t in ("Sampler", "LCMSampler", "InpaintEncode"):
            self.outputs[(nid, "latent")] = [nid, 0]
        elif t == "GrowMask":
            self.outputs[(nid, "mask")] = [nid, 0]
        elif t == "Canny":
            self.outputs[(nid, "image")] = [nid, 0]

    def ref(self, value: Any, nid: str, name: str) -> Any:
        """An input's value in the API format: a literal, or ``[ComfyUI id, output index]``."""
        seen = set()
        while isinstance(value, Link):
            key = (value.node, value.output)
            if key in seen or key not in self.outputs:
                source = self.wf.nodes.get(value.node)
                self.problems.append(Unsupported(nid, self.wf.nodes[nid].type,
                                                 f"links to {value.output!r} of node {value.node} "
                                                 f"({source.type if source else 'missing'}), which has no ComfyUI "
                                                 f"counterpart", name))
                return None
            seen.add(key)
            value = self.outputs[key]
        return value.value if isinstance(value, _Value) else value

    # --- nodes ------------------------------------------------------------------------------------------------------

    def node(self, comfy_id: str, class_type: str, inputs: dict, title: str | None = None) -> dict:
        entry = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}
        self.api[comfy_id] = entry
        return entry

    def _title(self, nid: str) -> str | None:
        ui = self.wf.nodes[nid].ui or {}
        return ui.get("title") if isinstance(ui.get("title"), str) else None

    def _emit(self, nid: str, node) -> None:
        t, i = node.type, node.inputs
        if t in SIMPLE:
            class_type, names, _ = SIMPLE[t]
            self.node(nid, class_type, {names[k]: self.ref(v, nid, k) for k, v in i.items() if k in names},
                      self._title(nid))
        elif t == "LoadCheckpoint":
            if i.get("base", "none") != "none":
                self.problems.append(Unsupported(nid, t, "a checkpoint over a base has no ComfyUI counterpart",
                                                 "base"))
            self.node(nid, "CheckpointLoaderSimple", {"ckpt_name": self.ref(i.get("ckpt", "demo-lcm"), nid, "ckpt")},
                      self._title(nid))
        elif t == "CLIPEncode":
            self.node(nid, "CLIPTextEncode", {"text": self.ref(i.get("text", ""), nid, "text"),
                                              "clip": self._clip(nid, i.get("clip"), i.get("clip_skip", 0))},
                      self._title(nid))
        elif t in SAMPLER_TYPES:
            self._sampler(nid, node)
        elif t == "InpaintEncode":
            self._inpaint(nid, i)
        elif t == "GrowMask" and nid not in self.absorbed:  # a square, as ComfyUI's without tapered corners
            self.node(nid, "GrowMask", {"mask": self.ref(i.get("mask"), nid, "mask"),
                                        "expand": self.ref(i.get("pixels", 6), nid, "pixels"),
                                        "tapered_corners": False}, self._title(nid))
        elif t == "LoRAStack":
            self._loras(nid, i)
        elif t == "ControlNetApply":
            inputs = {"conditioning": self.ref(i.get("conditioning"), nid, "conditioning"),
                      "control_net": self.ref(i.get("control_net"), nid, "control_net"),
                      "image": self.ref(i.get("image"), nid, "image"), "strength": i.get("strength", 1.0)}
            start, end = i.get("start_percent", 0.0), i.get("end_percent", 1.0)
            if (start, end) == (0.0, 1.0):
                self.node(nid, "ControlNetApply", inputs, self._title(nid))
            else:  # the negative is filled in by _control_windows, from the sampler this feeds
                inputs["positive"] = inputs.pop("conditioning")
                self.node(nid, "ControlNetApplyAdvanced", {**inputs, "start_percent": start, "end_percent": end},
                          self._title(nid))
        elif t == "Canny":
            self.node(nid, "Canny", {"image": self.ref(i.get("image"), nid, "image"),
                                     "low_threshold": round(i.get("low_threshold", 100) / 255, 2),
                                     "high_threshold": round(i.get("high_threshold", 200) / 255, 2)},
                      self._title(nid))
        # LCMScheduler (inside its sampler's KSampler) and primitives (written into their users) have no node

    def _clip(self, nid: str, clip: Any, skip: Any) -> Any:
        """The CLIP an encoder reads, through a CLIPSetLastLayer for clip_skip > 0 (one per CLIP and layer)."""
        ref = self.ref(clip, nid, "clip")
        if not skip:
            return ref
        key = (tuple(ref) if isinstance(ref, list) else ref, skip)
        layer_id = self.clip_layers.get(key)
        if layer_id is None:
            layer_id = self.clip_layers[key] = f"{nid}:clip"
            self.node(layer_id, "CLIPSetLastLayer", {"stop_at_clip_layer": -(skip + 1), "clip": ref})
        return [layer_id, 0]

    def _sampler(self, nid: str, node) -> None:
        i, t = node.inputs, node.type
        if t == "Sampler":
            sampler, schedule = i.get("sampler", "euler"), i.get("schedule", "default")
            if sampler not in SAMPLERS:
                self.problems.append(Unsupported(nid, t, f"sampler {sampler!r} has no ComfyUI counterpart", "sampler"))
            if schedule not in SCHEDULES:
                self.problems.append(Unsupported(nid, t, f"schedule {schedule!r} has no ComfyUI counterpart",
                                                 "schedule"))
            if i.get("eta", 0.0) not in (0, 0.0):
                self.problems.append(Unsupported(nid, t, "ComfyUI's KSampler has no eta", "eta"))
            steps = i.get("steps", 25)
            sampler_name, scheduler = SAMPLERS.get(sampler), SCHEDULES.get(schedule)
            if (sampler, schedule) == ("ddim", "default"):
                scheduler = "ddim_uniform"  # diffusers' DDIM spacing (every 1000 / steps timesteps) is ComfyUI's
        else:
            steps, sampler_name, scheduler = self._lcm_steps(nid, i.get("schedule")), "lcm", "sgm_uniform"
        negative = i.get("negative")
        self.node(nid, "KSampler", {
            "seed": self.ref(i.get("seed", 0), nid, "seed"), "steps": self.ref(steps, nid, "steps"),
            "cfg": self.ref(i.get("guidance", 7.5 if t == "Sampler" else 8.0), nid, "guidance"),
            "sampler_name": sampler_name, "scheduler": scheduler,
            "denoise": self.ref(i.get("strength", 1.0), nid, "strength"),
            "model": self.ref(i.get("model"), nid, "model"), "positive": self.ref(i.get("positive"), nid, "positive"),
            "negative": (self.ref(negative, nid, "negative") if negative is not None
                         else self._empty_negative(nid, i.get("positive"))),
            "latent_image": self.ref(i.get("latent"), nid, "latent")}, self._title(nid))

    def _lcm_steps(self, nid: str, schedule: Any) -> Any:
        source = self.wf.nodes.get(schedule.node) if isinstance(schedule, Link) else None
        if source is None or source.type != "LCMScheduler":
            self.problems.append(Unsupported(nid, "LCMSampler", "its schedule must come from an LCMScheduler",
                                             "schedule"))
            return 4
        si = source.inputs
        if si.get("original_inference_steps", 0) or str(si.get("timesteps", "")).strip():
            self.problems.append(Unsupported(schedule.node, "LCMScheduler", "ComfyUI's lcm sampler has no "
                                             "original_inference_steps or custom timesteps"))
        return si.get("steps", 4)

    def _empty_negative(self, nid: str, positive: Any) -> Any:
        """ComfyUI's samplers need a negative; ours without one guide with an empty prompt: encode "" with the
        positive prompt's CLIP."""
        for _ in range(len(self.wf.nodes)):
            source = self.wf.nodes.get(positive.node) if isinstance(positive, Link) else None
            if source is None:
                break
            if source.type == "CLIPEncode":
                neg = f"{nid}:negative"
                self.node(neg, "CLIPTextEncode", {"text": "", "clip": self._clip(
                    positive.node, source.inputs.get("clip"), source.inputs.get("clip_skip", 0))})
                return [neg, 0]
            if source.type in (*CONTROL_CHAIN, "ConditioningZeroOut"):
                positive = source.inputs.get("conditioning")
                continue
            break
        self.problems.append(Unsupported(nid, self.wf.nodes[nid].type, "ComfyUI's KSampler needs a negative, and "
                                         "no prompt encoder was found to encode an empty one", "negative"))
        return None

    def _absorbed_grow_masks(self) -> set[str]:
        out = set()
        for nid, node in self.wf.nodes.items():
            mask = node.inputs.get("mask") if node.type == "InpaintEncode" else None
            source = self.wf.nodes.get(mask.node) if isinstance(mask, Link) else None
            if source is not None and source.type == "GrowMask" and self.users.get(mask.node) == {nid}:
                out.add(mask.node)
        return out

    def _inpaint(self, nid: str, i: dict) -> None:
        mask = i.get("mask")
        pixels, vae = self.ref(i.get("image"), nid, "image"), self.ref(i.get("vae"), nid, "vae")
        if isinstance(mask, Link) and mask.node in self.absorbed:
            grow = self.wf.nodes[mask.node].inputs
            self.node(nid, "VAEEncodeForInpaint", {
                "pixels": pixels, "vae": vae, "mask": self.ref(grow.get("mask"), mask.node, "mask"),
                "grow_mask_by": self.ref(grow.get("pixels", 6), mask.node, "pixels")}, self._title(nid))
            return
        # ComfyUI's other way to inpaint: encode, then keep the latent outside the mask
        encoder = next((eid for eid, e in self.wf.nodes.items() if e.type == "VAEEncode"
                        and e.inputs.get("image") == i.get("image") and e.inputs.get("vae") == i.get("vae")), None)
        if encoder is None:
            encoder = f"{nid}:encode"
            self.node(encoder, "VAEEncode", {"pixels": pixels, "vae": vae})
        self.node(nid, "SetLatentNoiseMask", {"samples": [encoder, 0], "mask": self.ref(mask, nid, "mask")},
                  self._title(nid))

    def _loras(self, nid: str, i: dict) -> None:
        rows = i.get("loras") or []
        model_only = bool(rows) and all(r.get("strength_clip", 1.0) == 0 for r in rows) and not any(
            isinstance(v, Link) and v.node == nid and v.output == "clip"
            for user in self.users.get(nid, ()) for v in self.wf.nodes[user].inputs.values())
        model, clip = self.ref(i.get("model"), nid, "model"), self.ref(i.get("clip"), nid, "clip")
        for k, row in enumerate(rows):
            lid = nid if k == 0 else f"{nid}:{k}"
            inputs = {"model": model, "lora_name": row.get("lora"),
                      "strength_model": row.get("strength_model", 1.0)}
            if model_only:
                self.node(lid, "LoraLoaderModelOnly", inputs, self._title(nid) if k == 0 else None)
            else:
                inputs.update(clip=clip, strength_clip=row.get("strength_clip", 1.0))
                self.node(lid, "LoraLoader", inputs, self._title(nid) if k == 0 else None)
                clip = [lid, 1]
            model = [lid, 0]

    def _control_windows(self) -> None:
        """Give each ControlNetApplyAdvanced the negative of the sampler it feeds, and that sampler the advanced
        node's negative output: ComfyUI then applies the control to both halves of guidance, as ours does."""
        windowed = {nid for nid, e in self.api.items() if e["class_type"] == "ControlNetApplyAdvanced"}
        given: dict[str, Any] = {}
        for sid, sampler in self.wf.nodes.items():
            if sampler.type not in SAMPLER_TYPES or sid not in self.api:
                continue
            chain, value = [], sampler.inputs.get("positive")
            while isinstance(value, Link) and value.node in self.wf.nodes \
                    and self.wf.nodes[value.node].type in CONTROL_CHAIN and value.node not in chain:
                chain.append(value.node)
                value = self.wf.nodes[value.node].inputs.get("conditioning")
            negative = self.api[sid]["inputs"]["negative"]
            for cid in reversed(chain):
                if cid not in windowed:
                    continue
                if cid in given and given[cid] != negative:
                    self.problems.append(Unsupported(cid, "ControlNetApply", "feeds samplers with different "
                                                     "negatives; ComfyUI's ControlNetApplyAdvanced takes one"))
                given[cid] = negative
                self.api[cid]["inputs"]["negative"] = negative
                negative = [cid, 1]
            self.api[sid]["inputs"]["negative"] = negative
        for cid in sorted(windowed - set(given)):
            self.problems.append(Unsupported(cid, "ControlNetApply", "a start/end window maps to ComfyUI's "
                                             "ControlNetApplyAdvanced, which needs the negative of the sampler it "
                                             "feeds, and this one feeds no sampler's positive"))


def _with_defaults(wf: Workflow) -> Workflow:
    """A copy with every input our node declares a default for filled in: ComfyUI wants every widget."""
    from .. import NODES

    defaults = {cls.name: {name: spec.default for name, spec in cls.inputs.items() if spec.has_default}
                for cls in NODES}
    wf = wf.copy()
    for node in wf.nodes.values():
        node.inputs = {**defaults.get(node.type, {}), **node.inputs}
    return wf


def to_api(wf: Workflow) -> dict:
    """``wf`` in ComfyUI's API format ``{id: {"class_type", "inputs", "_meta"}}``, node ids kept; an
    ``UnsupportedWorkflow`` names the node types (and values) that have no ComfyUI counterpart."""
    return _Export(wf).run()
