"""LoRAStack: LoRA files from the models folder's ``loras/`` as patches on MODEL and CLIP handles.

A LoRA never changes the checkpoint's weights (they are shared with the result cache). The node reads each file
once, converts it to per-module ``(down, up, alpha)`` tensors on the model's device and dtype, and returns new
handles carrying a :class:`LoraPatch`. The patch acts in activation space while a handle is ``applied()``: forward
hooks on each targeted ``Linear`` / ``Conv2d`` add ``scale_i * up_i(down_i(x))`` to the layer's output, with
``scale_i = strength_i * alpha_i / rank_i``, one LoRA after the other in the stack's order. That is how peft computes
an *unfused* LoRA, so a stack equals diffusers' ``load_lora_weights`` + ``set_adapters(names, weights)``; the hooks
are removed when the block ends.

Formats, recognised by their keys (names are normalised with diffusers' own converters):

* kohya / sd-scripts: ``lora_unet_*`` / ``lora_te_*`` with ``.lora_down.weight``, ``.lora_up.weight`` and
  ``.alpha``, with diffusers block names (``lora_unet_down_blocks_0_...``) or original-SD ones
  (``lora_unet_input_blocks_1_1_...``, mapped with the UNet's configuration);
* diffusers / peft: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.<module>...`` (and
  diffusers' older ``..._lora.down.weight`` spelling). Alpha comes from the ``lora_adapter_metadata`` header when
  the file has one (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else alpha = rank (scale 1), as diffusers
  reads them.

Files are read with safetensors; a pickled ``.ckpt`` / ``.pt`` is read (``torch.load(weights_only=True)``) only
when nodegraph runs with ``--allow-pickle``. A LoRA with weights that fit no layer of the model (a LoRA for another
model family) is an error on the LoRAStack node that names the file and counts the weights that did not fit.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from nodegraph import Combo, Float, Folder, ListOf, Node, Output, Settings, Socket, file_identity

from .loading import is_safetensors, read_header
from .values import CLIP, MODEL, Clip, Model, field_storages

#: How many LoRA patches have been prepared (one per LoRAStack run that patches anything): tests count re-patching.
PATCH_BUILDS = 0
#: How many LoRA files have been read and converted (a file already converted for the same model is reused).
FILE_READS = 0

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # SDXL / SSD-1B have a second text encoder
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "ssd1b": "SSD-1B"}
# Cross-attention width of the UNet (the text encoder's width) -> the family a LoRA was trained for.
_CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
# What follows a layer's name in a LoRA key: ".lora_A.weight", "_lora.down.weight", ".lora_linear_layer...", ".alpha".
_LORA_SUFFIX = re.compile(r"([._]lora[._].*|\.alpha)$")


class LoraError(ValueError):
    """A LoRA file that cannot be used with this model; the message names the file and says why."""


LORAS = Folder("loras", what="LoRAs", suffixes=LORA_SUFFIXES, flag="--models")


# --------------------------------------------------------------------------------------------
# Reading and converting a file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLayer:
    """One targeted module of one LoRA: ``down`` [rank, in(, kh, kw)], ``up`` [out, rank(, 1, 1)], its alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scale(self, strength: float) -> float:
        # peft's order of operations: scale * lora_alpha / r
        return strength * self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def read_lora_file(path: Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a LoRA file (on the CPU) and diffusers' ``lora_adapter_metadata``, if the file has it."""
    if is_safetensors(path):
        from safetensors import safe_open

        read_header(path)  # a truncated or lying header is reported as such, naming the file, before reading
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        raw = header.get("lora_adapter_metadata")
        try:
            metadata = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise LoraError(f"LoRA {path.name!r}: its lora_adapter_metadata header is not valid JSON") from None
        return tensors, metadata
    if not allow_pickle:
        raise LoraError(f"LoRA {path.name!r} is not a safetensors file; pickled LoRA files (.ckpt, .pt) are read only "
                        f"when nodegraph runs with --allow-pickle")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable pickle is the same error for the user
        raise LoraError(f"LoRA {path.name!r} could not be read as a safetensors file or a torch pickle: "
                        f"{exc}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraError(f"LoRA {path.name!r} does not hold a dictionary of tensors")
    return dict(data), None


def _guess_family(keys_and_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Which model family a LoRA looks made for, from its raw keys and shapes (None when it cannot tell)."""
    keys = list(keys_and_shapes)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL"
    for key, shape in keys_and_shapes.items():
        if ("attn2" in key and ("to_k" in key or "to_v" in key) and len(shape) == 2
                and ("lora_down" in key or "lora_A" in key or "lora.down" in key)):
            if shape[1] in _CONTEXT_WIDTHS:
                return _CONTEXT_WIDTHS[shape[1]]
    if any(k.startswith(("transformer.", "lora_transformer_", "diffusion_model.", "lora_unet_double_blocks",
                         "lora_unet_single_blocks")) for k in keys):
        return "a transformer model (Flux, SD3, ...)"
    return None


def _split_components(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Keys by component (``unet``, ``text_encoder``) with the prefix removed, and the keys of other components."""
    parts: dict[str, dict[str, torch.Tensor]] = {c: {} for c in _COMPONENTS}
    others = []
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component in parts:
            parts[component][rest] = value
        else:
            others.append(key)
    return parts, others


def _pattern_value(patterns: Mapping[str, Any], module_name: str) -> Any:
    """peft's rule for ``alpha_pattern`` keys: a regex matched against the end of the module's path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return None


@dataclass(frozen=True)
class _Converted:
    """A LoRA file in diffusers module names: per component, module name -> (down, up, alpha or None), where
    alpha None means "ask the metadata" (peft format); plus keys that belong to no component we have."""

    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]]
    metadata: dict[str, dict]
    foreign: list[str]


def convert_lora(tensors: dict[str, torch.Tensor], metadata: dict | None, unet_config, name: str) -> _Converted:
    """Normalise a LoRA state dict (kohya, kohya with LDM block names, diffusers, peft) to diffusers module names."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise LoraError(f"LoRA {name!r} is a DoRA (it has dora_scale / magnitude weights): DoRA is not supported")
    if any(k.endswith(("hada_w1_a", "lokr_w1", "lokr_w1_a")) for k in tensors):
        raise LoraError(f"LoRA {name!r} is a LyCORIS LoHa/LoKr file: only plain LoRA (down/up) files are supported")
    tensors = dict(tensors)
    alphas_by_tensor: dict[int, float] = {}
    if tensors and all(k.startswith(_KOHYA_PREFIXES) for k in tensors):
        for key, value in tensors.items():
            if key.endswith(".lora_down.weight"):
                alpha = tensors.get(key.split(".")[0] + ".alpha")
                alphas_by_tensor[id(value)] = float(value.shape[0] if alpha is None else alpha.item())
        try:
            mapped = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet_config)
            tensors, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
        except Exception as exc:  # noqa: BLE001 - diffusers raises plain ValueErrors/KeyErrors here
            raise _mismatch_error(name, _shapes(tensors), None, detail=f"its keys could not be converted ({exc})")
    elif tensors and not any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in tensors) and all(
            k.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding"))
            for k in tensors):
        tensors = {f"unet.{k}": v for k, v in tensors.items()}  # diffusers' older UNet-only (attn_procs) files

    parts, foreign = _split_components(tensors)
    unet_part = parts["unet"]
    # diffusers' training scripts save convert_state_dict_to_diffusers(peft state): attention layers come out as
    # "to_q.lora.down" while other layers keep "lora_A", so any key outside the peft names means converting
    if any(".lora_A." not in k and ".lora_B." not in k and not k.endswith(".alpha") for k in unet_part):
        try:
            unet_part = convert_unet_state_dict_to_peft(unet_part)
        except Exception:  # noqa: BLE001 - names diffusers cannot place fit no layer of ours either
            foreign += [f"unet.{k}" for k in unet_part]
            unet_part = {}
    converted_parts = {"unet": unet_part}
    for component in ("text_encoder", "text_encoder_2"):
        text_part = parts[component]
        if text_part:
            try:
                text_part = _text_encoder_to_peft(text_part)
            except Exception:  # noqa: BLE001
                foreign += [f"{component}.{k}" for k in text_part]
                text_part = {}
        converted_parts[component] = text_part

    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]] = {}
    for component, part in converted_parts.items():
        found: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
        for key, down in part.items():
            if ".lora_A." not in key:
                if ".lora_B." not in key and not key.endswith(".alpha"):
                    foreign.append(f"{component}.{key}")
                continue
            module, _, param = key.partition(".lora_A.")
            up = part.get(f"{module}.lora_B.{param}")
            if param != "weight" or up is None:
                foreign.append(f"{component}.{key}")
                continue
            alpha = alphas_by_tensor.get(id(down))
            if alpha is None and f"{module}.alpha" in part:  # a diffusers-format file with alphas stored as tensors
                alpha = float(part[f"{module}.alpha"].item())
            found[module] = (down, up, alpha)
        bias = [k for k in part if ".lora_B." in k and k.endswith(".bias")]
        if bias:
            raise LoraError(f"LoRA {name!r} has LoRA biases ({bias[0]}): not supported")
        layers[component] = found

    by_component = {c: {} for c in _COMPONENTS}
    for key, value in (metadata or {}).items():
        component, _, field_name = key.partition(".")
        if component in by_component:
            by_component[component][field_name] = value
    stems = sorted({_LORA_SUFFIX.sub("", key) for key in foreign})  # one entry per layer, not per tensor
    return _Converted(layers, by_component, stems)


def _text_encoder_to_peft(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys in peft names (``q_proj.lora_A.weight``), from peft, diffusers or diffusers' older
    spelling (``to_q_lora.down.weight``, which kohya files convert to)."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
    )

    if all(".lora_A." in k or ".lora_B." in k for k in part):
        return part
    if any(k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in part):
        part = convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _mismatch_error(name: str, raw_shapes, family: str | None, *, detail: str) -> LoraError:
    guess = _guess_family(raw_shapes)
    message = f"LoRA {name!r} does not fit this model"
    if family:
        message += f" ({_FAMILY_NAMES.get(family, family)})"
    message += f": {detail}"
    if guess and guess != _FAMILY_NAMES.get(family or ""):
        message += f". It looks like a LoRA for {guess}"
    return LoraError(message + ".")


def _module_for(modules: Mapping[str, torch.nn.Module], name: str) -> tuple[str, torch.nn.Module] | None:
    """The model's module for a LoRA module name; text-encoder names may carry ``text_model.`` or not
    (transformers 5 flattened CLIPTextModel)."""
    for candidate in (name, name.removeprefix("text_model."), f"text_model.{name}"):
        module = modules.get(candidate)
        if module is not None:
            return candidate, module
    return None


def _fit(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor):
    """(down, up) reshaped to the layer, or None when they cannot belong to it."""
    if isinstance(module, torch.nn.Linear):
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down = down.flatten(1)
        if up.ndim == 4 and up.shape[2:] == (1, 1):
            up = up.flatten(1)
        ok = (down.ndim == 2 and up.ndim == 2 and down.shape[1] == module.in_features
              and up.shape == (module.out_features, down.shape[0]))
    elif isinstance(module, torch.nn.Conv2d):
        if down.ndim == 2 and module.kernel_size == (1, 1):
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        ok = (module.groups == 1 and module.padding_mode == "zeros" and down.ndim == 4 and up.ndim == 4
              and down.shape[1] == module.in_channels and tuple(down.shape[2:]) == tuple(module.kernel_size)
              and tuple(up.shape) == (module.out_channels, down.shape[0], 1, 1))
    else:
        ok = False
    return (down, up) if ok else None


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA file matched to one model: per component, the model's module name -> :class:`LoraLayer`, on the
    component's device and dtype."""

    name: str
    unet: Mapping[str, LoraLayer]
    text_encoder: Mapping[str, LoraLayer]
    text_encoder_2: Mapping[str, LoraLayer] = field(default_factory=dict)
    targets: tuple = ()  # weak references to the modules it was matched to (the reuse check of load_lora)

    def matches(self, *modules: torch.nn.Module | None) -> bool:
        return len(self.targets) == len(modules) and all(ref() is m for ref, m in zip(self.targets, modules))


def _alpha_from_metadata(meta: Mapping[str, Any], module_name: str, rank: int) -> tuple[float, bool]:
    if not meta:
        return float(rank), False  # diffusers' convention without metadata: alpha = rank (scale 1)
    alpha = _pattern_value(meta.get("alpha_pattern") or {}, module_name)
    if alpha is None:
        alpha = meta.get("lora_alpha", meta.get("r", rank))
    return float(alpha), bool(meta.get("use_rslora", False))


def match_lora(converted: _Converted, raw_shapes, name: str, unet: torch.nn.Module,
               text_encoder: torch.nn.Module | None, family: str | None,
               text_encoder_2: torch.nn.Module | None = None) -> LoraFile:
    """Bind each converted LoRA module to the model's layer; every weight must fit one, or this is an error."""
    unmatched = list(converted.foreign)
    total = len(converted.foreign)
    bound: dict[str, dict[str, LoraLayer]] = {}
    models = (unet, text_encoder, text_encoder_2)
    for component, model in zip(_COMPONENTS, models):
        bound[component] = {}
        entries = converted.layers.get(component, {})
        total += len(entries)
        if not entries:
            continue
        if model is None:
            unmatched += [f"{component}.{m}" for m in entries]
            continue
        param = next(model.parameters())
        modules = dict(model.named_modules())
        for module_name, (down, up, alpha) in entries.items():
            found = _module_for(modules, module_name)
            fitted = _fit(found[1], down, up) if found else None
            if fitted is None:
                unmatched.append(f"{component}.{module_name}")
                continue
            real_name = found[0]
            # fresh memory of our own: results must not depend on where the file put the tensors (CPU kernels
            # differ at 1e-7 with alignment), and peft too copies the factors into new parameters
            down, up = (t.to(device=param.device, dtype=param.dtype, copy=True).contiguous() for t in fitted)
            rslora = False
            if alpha is None:
                alpha, rslora = _alpha_from_metadata(converted.metadata.get(component, {}), real_name,
                                                     int(down.shape[0]))
            bound[component][real_name] = LoraLayer(down, up, alpha, rslora)
    if unmatched:
        shown = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        raise _mismatch_error(name, raw_shapes, family,
                              detail=f"{len(unmatched)} of its {total} LoRA layers match no layer of the model's "
                                     f"UNet or text encoders ({shown})")
    if total == 0:
        raise LoraError(f"LoRA {name!r} holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B pairs)")
    targets = tuple(weakref.ref(m) if m is not None else (lambda: None) for m in models)
    return LoraFile(name, bound["unet"], bound["text_encoder"], bound["text_encoder_2"], targets)


# Files already read and matched, while some patch still holds them: (file identity, model ids, device, dtype) ->.
_LOADED: "weakref.WeakValueDictionary[Any, LoraFile]" = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


def load_lora(settings: Settings, name: str, model: Model, clip: Clip | None) -> LoraFile:
    """LoRA file ``name`` from the loras folder, converted and matched to ``model``'s UNet and ``clip``'s encoder."""
    global FILE_READS
    path = LORAS.locate(settings, name)
    if not path.is_file():
        raise LoraError(f"LoRA {name!r} is a folder, not a file ({LORAS.hint(settings)})")
    text_encoder = clip.text_encoder if clip is not None else None
    text_encoder_2 = clip.text_encoder_2 if clip is not None else None
    te_param = next(text_encoder.parameters()) if text_encoder is not None else None
    key = (file_identity(path), id(model.unet), str(model.device), str(model.dtype), id(text_encoder),
           id(text_encoder_2), te_param is not None and (str(te_param.device), str(te_param.dtype)))
    with _LOADED_LOCK:
        cached = _LOADED.get(key)
    if cached is not None and cached.matches(model.unet, text_encoder, text_encoder_2):  # ids can be reused
        return cached
    tensors, metadata = read_lora_file(path, allow_pickle=settings.allow_pickle)
    FILE_READS += 1
    raw_shapes = _shapes(tensors)
    converted = convert_lora(tensors, metadata, model.unet.config, name)
    lora = match_lora(converted, raw_shapes, name, model.unet, text_encoder, model.family, text_encoder_2)
    with _LOADED_LOCK:
        _LOADED[key] = lora
    return lora


# --------------------------------------------------------------------------------------------
# The patch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Term:
    """One LoRA's contribution to one layer: ``scale * up(down(x))``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


def _linear_hook(terms: tuple[_Term, ...]):
    def hook(module, args, output):
        x = args[0]
        for term in terms:
            h = x if x.dtype == term.down.dtype else x.to(term.down.dtype)
            output = output + F.linear(F.linear(h, term.down), term.up) * term.scale
        return output
    return hook


def _conv_hook(terms: tuple[_Term, ...]):
    def hook(module, args, output):
        x = args[0]
        for term in terms:
            h = x if x.dtype == term.down.dtype else x.to(term.down.dtype)
            h = F.conv2d(h, term.down, None, module.stride, module.padding)
            output = output + F.conv2d(h, term.up, None, 1, 0, 1, module.groups) * term.scale
        return output
    return hook


# Hooks change shared modules for the duration of a use: one use at a time per process.
_APPLY_LOCK = threading.RLock()


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """LoRAs on one component (the UNet or the text encoder): per module name, the terms added to its output in
    order. Applied as forward hooks, removed on exit; the module's weights are never touched."""

    terms: tuple[tuple[str, tuple[_Term, ...]], ...]
    files: tuple[LoraFile, ...]  # kept alive with the patch, so a new strength reuses the converted files

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)

    @contextlib.contextmanager
    def apply(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        modules = dict(module.named_modules())
        handles = []
        with _APPLY_LOCK:
            try:
                for name, terms in self.terms:
                    target = modules.get(name)
                    if target is None:
                        raise RuntimeError(f"LoRA patch ({', '.join(self.names)}): the model has no layer {name!r}")
                    hook = _conv_hook(terms) if isinstance(target, torch.nn.Conv2d) else _linear_hook(terms)
                    handles.append(target.register_forward_hook(hook))
                yield module
            finally:
                for handle in handles:
                    handle.remove()

    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        seen, total = set(), 0
        for _, terms in self.terms:
            for term in terms:
                for t in (term.down, term.up):
                    if id(t) not in seen:
                        seen.add(id(t))
                        total += t.nbytes
        return total


def build_patch(loras: list[tuple[LoraFile, float]], component: str) -> LoraPatch | None:
    """One patch for ``component`` from (file, strength) pairs in stack order; None when nothing applies."""
    by_module: dict[str, list[_Term]] = {}
    files = []
    for lora, strength in loras:
        layers = getattr(lora, component)
        if strength == 0 or not layers:
            continue
        files.append(lora)
        for module_name, layer in layers.items():
            by_module.setdefault(module_name, []).append(_Term(layer.down, layer.up, layer.scale(strength)))
    if not by_module:
        return None
    return LoraPatch(tuple((name, tuple(terms)) for name, terms in by_module.items()), tuple(files))


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------


class LoRAStack(Node):
    """Apply LoRA files from the models folder's loras/ subfolder to a model and its text encoder.

    Each row is a LoRA with its strength on the model (UNet) and on the CLIP text encoder (both of them on SDXL);
    rows add up in order, as diffusers' set_adapters([...], adapter_weights=[...]) mixes adapters. Use it for
    LCM-LoRA (a plain SD model then samples in 4-8 steps at guidance 1-2) mixed with style LoRAs. Reads
    kohya/sd-scripts files (diffusers or original-SD block names) and diffusers/peft files. The checkpoint itself
    is never changed: the LoRAs are applied only while the model runs, so other branches of the graph see the
    model without them."""

    category = "loaders"
    display_name = "LoRA Stack"
    model = Socket(MODEL)
    clip = Socket(CLIP)
    loras = ListOf(
        lora=Combo(options=LORAS),
        strength_model=Float(default=1.0, min=-4.0, max=4.0, step=0.01),
        strength_clip=Float(default=1.0, min=-4.0, max=4.0, step=0.01),
        max_items=16,
    )
    outputs = (Output("model", MODEL), Output("clip", CLIP))

    def run(self, ctx, model, clip, loras):
        global PATCH_BUILDS
        rows = []
        for row in loras:
            lora = load_lora(ctx.settings, row["lora"], model, clip)
            rows.append((lora, float(row.get("strength_model", 1.0)), float(row.get("strength_clip", 1.0))))
        unet_patch = build_patch([(lora, sm) for lora, sm, _ in rows], "unet")
        text_patch = build_patch([(lora, sc) for lora, _, sc in rows], "text_encoder")
        text_patch_2 = build_patch([(lora, sc) for lora, _, sc in rows], "text_encoder_2")
        for lora, sm, sc in rows:
            if sc != 0 and not lora.text_encoder and not lora.text_encoder_2 and lora.unet:
                ctx.log.info("LoRA %r has no text-encoder layers: strength_clip does nothing", lora.name)
        if unet_patch is not None or text_patch is not None or text_patch_2 is not None:
            PATCH_BUILDS += 1
        if text_patch is not None:
            clip = clip.with_patch(text_patch)
        if text_patch_2 is not None:
            clip = clip.with_patch(text_patch_2, second=True)
        return (model.with_patch(unet_patch) if unet_patch is not None else model), clip


NODES = [LoRAStack]
