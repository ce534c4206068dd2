"""Model components from a checkpoint: :func:`load_components` builds the UNet, VAE, text encoder(s) and
tokenizer(s) of a diffusers folder, a UNet folder over a base, or an original-layout single file, ready to run.

Every model is built on the meta device from its configuration (a folder's ``config.json``, or the configurations
derived for a single file), then given its weights: a :class:`~.weights.StreamedSafetensors` reads each tensor
from the file when it is asked for, already in the requested dtype, diffusers' converters (``convert_ldm_*``) rename
a single file's keys on the way, and a strict ``load_state_dict(assign=True)`` takes them, so a missing or
unexpected weight is an error, never a silent random initialisation. Nothing holds a second copy of the weights:
no memory map of the file beside the model, no float32 model beside its bfloat16 cast. A folder component that is
not one plain safetensors file of the model's own key names (sharded weights, a pickle, legacy attention names)
falls back to its ``from_pretrained(..., local_files_only=True)``, then :func:`ready`.

Memory and bit-exactness: safetensors are memory-mapped by their library, and a tensor viewed in the map sits at
the file offset of its data, 8-byte aligned at best. CPU kernels give results that differ at the 1e-7 level
depending on that alignment. Measured on the tiny SD model: our components loaded from a diffusers folder *without*
copying are bit-identical to ``LatentConsistencyModelPipeline.from_pretrained(folder)``'s (which also maps the same
files); in memory of their own (aligned) the UNet output differs from that pipeline by 6.6e-7, and equals it
exactly once the pipeline's weights are cloned too. ``clone_weights=True`` (the default) gives every tensor memory
of its own (streamed, or copied by :func:`ready`): results then depend only on the weights, not on the file layout
(a single file and the diffusers folder it was written from give identical images), and the loaded model no
longer depends on the file staying unchanged. Pass ``clone_weights=False`` to keep the mapped tensors
(bit-identical to diffusers' ordinary loading; the file's pages then count in the process's memory as well).

``python benchmarks/load_memory.py`` on the 2-core development machine (random-weight SD1.5-size model: UNet 860M,
VAE 84M, CLIP-L; page cache warm; one process per load, medians of 2; every weight read once after the load, as
a first run would, before the peak is taken; base = the interpreter with torch, diffusers and transformers
imported, 0.48 GB, included in the peak)::

    engine                                   dtype    load s +touch s load peak peak GB weights GB peak/weights (peak-base)/weights
    diffusers from_pretrained (folder)       float32     0.6      0.3      0.58    4.80       4.26         1.12                1.01
    nodegraph load_components (folder)       float32     3.3      0.1      4.91    4.91       4.26         1.15                1.04
    nodegraph load_components (single file)  float32     2.2      0.1      4.92    4.92       4.26         1.15                1.04
    nodegraph single file, --map-weights     float32     0.5      0.2      0.54    4.77       4.26         1.12                1.01
    diffusers from_pretrained (folder)       bfloat16    1.5      0.8      5.89    5.89       2.13         2.76                2.54
    nodegraph load_components (folder)       bfloat16    2.1      0.8      2.78    2.87       2.13         1.35                1.12
    nodegraph load_components (single file)  bfloat16    1.8      0.5      2.79    2.88       2.13         1.35                1.13

Before streaming the same loads peaked at 7.35 GB (folder) and 8.7 GB (single file) in float32, 5.6 and 6.7 GB
in bfloat16. diffusers' float32 load is only a memory map (its pages are read on first use); ours copies 4.3 GB into
aligned memory of the process's own, which costs the difference in load time, unless ``--map-weights`` (which
passes ``clone_weights=False`` where the file's dtype is the one asked for) maps it too.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import torch

from nodegraph import filemaps

from .configs import derive_configs, family_config_dir, read_json
from .detect import TEXT_ENCODERS, detect, detect_family, require_parts
from .errors import CheckpointError, few, first_line
from .hub import fetch
from .weights import StreamedSafetensors, read_header, read_pickle

CLIP_BPE_DIR = Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer"
_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Stored by some checkpoints but recomputed by the models: never an error when left over.
_IGNORABLE = ("position_ids", "logit_scale")
# The CLIP BPE vocabulary: 512 byte symbols, one token per merge, then <|startoftext|> and <|endoftext|>.
_CLIP_VOCAB = 49408
_BYTE_TOKENS = 512
_SPECIAL_TOKENS = 2


@dataclass(frozen=True)
class Components:
    """The parts of a Stable Diffusion model, ready to run: eval mode, no gradients, on the requested device/dtype."""

    unet: torch.nn.Module  # UNet2DConditionModel
    vae: torch.nn.Module  # AutoencoderKL
    text_encoder: torch.nn.Module  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler_config: dict  # the model's scheduler configuration (betas, prediction type...)
    family: str  # "sd1", "sd2", "sdxl" or "ssd1b"
    source: str  # where it came from, for people
    text_encoder_2: torch.nn.Module | None = None  # SDXL / SSD-1B: CLIPTextModelWithProjection
    tokenizer_2: Any = None  # SDXL / SSD-1B


@dataclass(frozen=True)
class _Options:
    device: torch.device
    dtype: torch.dtype
    allow_pickle: bool
    clone: bool
    channels_last: frozenset[str] = frozenset()  # the components whose kernels are streamed channels_last
    packed: frozenset[str] = frozenset()  # ... but for kernels packed later (3x3, 1x1), kept in the file's layout
    guarded_only: bool = False  # without clone: map only files a lease guards (nodegraph.filemaps), copy others

    def maps(self, path: Path):
        """How to map ``path``'s tensors (see StreamedSafetensors' ``maps``); None: read them into copies."""
        if self.clone:
            return None
        guard = filemaps.guard(path)
        return guard if guard is not None or self.guarded_only else filemaps.Unguarded(path)

    def streamed(self, path: Path, dtype: torch.dtype | None | bool = True, part: str | None = None):
        """``path``'s tensors read as these options load (:class:`StreamedSafetensors`): in ``dtype`` (True: the
        run's, None: the file's), on the run's device, in ``part``'s layout, mapped where :meth:`maps` says."""
        return StreamedSafetensors(path, self.dtype if dtype is True else dtype,
                                   channels_last=part in self.channels_last, plain_kernels=part in self.packed,
                                   maps=self.maps(path), device=self.device)


#: Builds the UNet in place of a checkpoint's own, given that checkpoint's UNet configuration (to check the fit).
UNetOver = Callable[[Mapping[str, Any]], torch.nn.Module]


def load_components(
    path: Path | str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    checkpoints_dir: Path | None = None,
    base: Path | str | None = None,
    config: Path | str | None = None,
    clone_weights: bool = True,
    channels_last: Collection[str] = (),
    packed: Collection[str] = (),
    guarded_only: bool = False,
) -> Components:
    """Load the checkpoint at ``path`` (see :mod:`nodes.loading` for the formats) on ``device`` in ``dtype``.

    * ``base``: for a UNet folder, the full checkpoint (any format) that gives the VAE, text encoder, tokenizer and
      scheduler configuration. Ignored for full checkpoints.
    * ``config``: for single files, a diffusers folder whose configurations (and tokenizer, scheduler) replace the
      family's shipped ones, as diffusers' ``from_single_file(config=...)``. Needed only for non-standard models whose
      head counts or norm groups the defaults do not fit.
    * ``clone_weights``: copy memory-mapped weights into memory of their own (see the module docstring). False
      keeps every tensor used as stored in a private map of the file, guarded against the file being rewritten in
      place where a lease can be had (:mod:`nodegraph.filemaps`); with ``guarded_only``, only there (files without
      a guard are copied).
    * ``channels_last``: the components ("unet", "vae") whose convolution kernels are laid out channels_last as
      they are streamed (a streamed load then needs no second copy for the layout; others are converted by the
      caller as before).
    * ``packed``: of those, the components whose 3x3 and 1x1 kernels the caller packs at once (``fastpaths.pack(...,
      now=True)``): they keep the file's layout, from which packing takes half the time, and where the file stores
      them in ``dtype`` a streamed load gives them as views of the file's memory map, which packing then replaces
      (no copy of them in between; until packed, the file must not be rewritten in place).
    * ``checkpoints_dir``: where local checkpoints are read from, named when a hub id cannot be had.

    Never touches the network except for a hub repository id while the hub is online. Every failure is a
    :class:`CheckpointError` that names the file and the reason.
    """
    opts = _Options(torch.device(device), dtype, allow_pickle, clone_weights, frozenset(channels_last),
                    frozenset(packed), guarded_only)
    config_dir = Path(config) if config is not None else None
    if config_dir is not None and detect(config_dir) != "diffusers":
        raise CheckpointError(f"{config_dir}: config= must be a diffusers folder (with model_index.json)")
    source_path, kind = _resolve(path, checkpoints_dir)
    if kind != "unet_folder":
        return _load_full(source_path, kind, opts, config_dir)
    if base is None:
        raise CheckpointError(
            f"{source_path}: a UNet-only folder (e.g. an LCM-distilled unet/); it needs a base checkpoint (base=) "
            f"for the VAE, the text encoder and the tokenizer, such as the SD 1.5 model it was distilled from.")
    base_path, base_kind = _resolve(base, checkpoints_dir)
    if base_kind == "unet_folder":
        raise CheckpointError(f"{base_path}: the base must be a full checkpoint, not another UNet folder")

    def unet_folder(base_config: Mapping[str, Any]) -> torch.nn.Module:
        unet = _pretrained("UNet2DConditionModel", source_path, None, opts, part="unet")
        _check_unet_fits(unet.config, base_config, source_path, base_path)
        return unet

    components = _load_full(base_path, base_kind, opts, config_dir, unet_over=unet_folder)
    return replace(components, source=f"UNet folder {source_path} over {components.source}")


def _resolve(path: Path | str, checkpoints_dir: Path | None) -> tuple[Path, str]:
    """A local path and its kind; hub ids are fetched (or refused offline) first."""
    kind = detect(path)
    if kind != "hub":
        return Path(path), kind
    local = fetch(str(path), checkpoints_dir or Path("models") / "checkpoints")
    return local, detect(local)


def _load_full(path: Path, kind: str, opts: _Options, config_dir: Path | None,
               unet_over: UNetOver | None = None) -> Components:
    """A full checkpoint's components; ``unet_over`` replaces its UNet (which is then never loaded)."""
    if kind == "diffusers":
        return _load_diffusers(path, opts, unet_over)
    if kind == "safetensors":
        shapes = read_header(path)
        # Streamed: each tensor read once, into its final dtype, straight into the model being built (or mapped,
        # where used as stored and asked for).
        return _load_single_file(path, shapes, lambda dtype: opts.streamed(path, dtype), opts,
                                 config_dir, unet_over, streamed=True)
    if kind == "pickle":
        tensors = read_pickle(path, opts.allow_pickle)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        return _load_single_file(path, shapes, lambda _: tensors, opts, config_dir, unet_over)
    raise CheckpointError(f"{path}: a {kind} cannot be loaded here")


def _check_unet_fits(unet_config: Mapping, base_config: Mapping, path: Path, base: Path) -> None:
    fields = ("cross_attention_dim", "in_channels", "addition_embed_type")
    mismatched = [f for f in fields if _plain(unet_config.get(f)) != _plain(base_config.get(f))]
    if mismatched:
        detail = ", ".join(f"{f} {unet_config.get(f)} vs {base_config.get(f)}" for f in mismatched)
        raise CheckpointError(f"{path}: this UNet does not fit the base {base} ({detail}); choose a base of the same "
                              f"family (an LCM-distilled SD 1.5 UNet needs an SD 1.5 base).")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# --- placing a model ------------------------------------------------------------------------


@contextlib.contextmanager
def empty_weights():
    """Build models with their parameters on the meta device (accelerate) and without transformers' weight
    initialisation, which would still run its random fills through torch's reference decompositions on the meta
    tensors: 0.14 s of a CLIP-L text encoder's construction, for values the load replaces."""
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - older transformers keep it here
        from transformers.modeling_utils import no_init_weights
    with init_empty_weights(), no_init_weights():
        yield


def ready(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, clone: bool = True) -> torch.nn.Module:
    """``model`` on ``device`` in ``dtype``, in eval mode, without gradients; with ``clone``, tensors that still
    view the loaded (memory-mapped) file are copied into memory of their own (see the module docstring)."""
    loaded = {name: t.data_ptr() for name, t in _tensors(model)}
    if getattr(model, "_keep_in_fp32_modules", None):
        model.to(device=device, dtype=dtype)  # the library's own .to() knows what must stay float32
    else:  # diffusers' .to() warns about keeping float32 modules even when there are none
        torch.nn.Module.to(model, device=device, dtype=dtype)
    if clone:
        for name, t in _tensors(model):
            if t.data_ptr() == loaded.get(name):  # .to() did not copy it: still the loaded (mapped) memory
                t.data = t.data.clone()
    model.eval()
    model.requires_grad_(False)
    return model


def _tensors(model: torch.nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _placed(model: torch.nn.Module, opts: _Options) -> torch.nn.Module:
    return ready(model, opts.device, opts.dtype, clone=opts.clone)


# --- diffusers folders ----------------------------------------------------------------------


def _load_diffusers(folder: Path, opts: _Options, unet_over: UNetOver | None) -> Components:
    index = read_json(folder / "model_index.json")
    pipeline = index.get("_class_name", "?")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not _listed(index, c)]
    if missing:
        raise CheckpointError(
            f"{folder}: a diffusers {pipeline} without {', '.join(missing)}. Only Stable Diffusion style pipelines "
            f"(UNet, VAE, CLIP text encoder) can be loaded.")
    unet_config = read_json(folder / "unet" / "config.json")
    unet = unet_over(unet_config) if unet_over else _pretrained("UNet2DConditionModel", folder, "unet", opts)
    vae = _pretrained("AutoencoderKL", folder, "vae", opts)
    text_encoder = _pretrained(_text_class(index, "text_encoder", folder), folder, "text_encoder", opts)
    tokenizer = _load_tokenizer(folder / "tokenizer", None)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    text_encoder_2 = tokenizer_2 = None
    if _listed(index, "text_encoder_2"):
        text_encoder_2 = _pretrained(_text_class(index, "text_encoder_2", folder), folder, "text_encoder_2", opts)
        tokenizer_2 = _load_tokenizer(folder / "tokenizer_2", None)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config,
        family=_family_of_configs(unet_config, text_encoder.config, text_encoder_2 is not None),
        source=f"diffusers folder {folder}", text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def _listed(index: Mapping, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _text_class(index: Mapping, component: str, folder: Path) -> str:
    name = index[component][1]
    if name not in _TEXT_CLASSES:
        raise CheckpointError(f"{folder}: the {component} is a {name}; only {' / '.join(_TEXT_CLASSES)} are supported")
    return name


def _family_of_configs(unet_config: Mapping, text_config: Any, has_second_encoder: bool) -> str:
    if unet_config.get("addition_embed_type") == "text_time" or has_second_encoder:
        reduced = (unet_config.get("reverse_transformer_layers_per_block") is not None
                   or unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn")
        return "ssd1b" if reduced else "sdxl"
    # OpenCLIP text towers (SD 2.x) use exact GELU, OpenAI's CLIP (SD 1.x) quick GELU.
    return "sd2" if getattr(text_config, "hidden_act", None) == "gelu" else "sd1"


def _model_class(name: str) -> type:
    """A diffusers model class by name, else a transformers one (CLIP text and vision encoders)."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is not None:
        return cls
    import transformers

    return getattr(transformers, name)


def _variant(folder: Path) -> str | None:
    """The weights variant ("fp16"...) to ask for when a component folder only holds variant files."""
    names = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    if any(len(n.split(".")) == 2 or "-of-" in n for n in names):
        return None
    variants = sorted({n.split(".")[-2] for n in names if len(n.split(".")) == 3})
    return variants[0] if variants else None


def _pretrained(class_name: str | type, folder: Path, subfolder: str | None, opts: _Options,
                part: str | None = None) -> torch.nn.Module:
    """One component of a diffusers folder (or a lone model folder when ``subfolder`` is None), ready to run.
    ``class_name``: a diffusers or transformers class's name, or the class itself (one neither library exports).
    ``part``: its name in ``opts.channels_last`` and ``opts.packed`` (default: the folder's name)."""
    where = folder / subfolder if subfolder else folder
    if not where.is_dir():
        raise CheckpointError(f"{folder}: model_index.json lists {subfolder!r} but there is no {subfolder}/ folder")
    cls = class_name if isinstance(class_name, type) else _model_class(class_name)
    class_name = cls.__name__
    kwargs: dict[str, Any] = {"local_files_only": True, "variant": _variant(where)}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if not opts.allow_pickle:
        kwargs["use_safetensors"] = True  # never unpickle a .bin silently
    streamed = _streamed_component(cls, folder, where, kwargs["variant"], opts, part or where.name)
    if streamed is not None:
        return streamed
    try:
        with quiet_transformers():
            model = cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - every library error becomes one clear message
        hint = ""
        if not opts.allow_pickle and any(where.glob("*.bin")) and not any(where.glob("*.safetensors")):
            hint = " Its weights are a pickle (.bin): convert them to safetensors, or allow pickles (--allow-pickle)."
        raise CheckpointError(f"{where}: cannot load the {class_name}: {first_line(e)}.{hint}") from e
    # from_pretrained maps whole files, unguarded: copied unless any map was asked for
    return ready(model, opts.device, opts.dtype, clone=opts.clone or opts.guarded_only)


def _streamed_component(cls: type, folder: Path, where: Path, variant: str | None, opts: _Options,
                        part: str) -> torch.nn.Module | None:
    """A folder component built on the meta device and given its weights file tensor by tensor, in their final
    dtype (:class:`StreamedSafetensors`): the same values as ``from_pretrained`` then :func:`ready`, without the
    memory-mapped file and the model's copy side by side. None when the folder is not that simple (sharded
    weights, pickles, renamed legacy keys...): ``from_pretrained`` then handles it."""
    from diffusers import ModelMixin

    stem = "diffusion_pytorch_model" if issubclass(cls, ModelMixin) else "model"  # transformers' name otherwise
    weights = where / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
    if not weights.is_file() or not (where / "config.json").is_file():
        return None
    config = read_json(where / "config.json")
    try:
        with empty_weights():
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls(cls.config_class.from_dict(config))
        fp32_modules = getattr(model, "_keep_in_fp32_modules", None)
        tensors = opts.streamed(weights, None if fp32_modules else True, part)
    except Exception:  # noqa: BLE001 - from_pretrained will say what is wrong
        return None
    expected = set(model.state_dict())
    names = {(k if k in expected or not k.startswith("text_model.") else k[len("text_model."):]): k for k in tensors}
    if expected - set(names) or any(k not in expected and not k.endswith(_IGNORABLE) for k in names):
        return None
    model.load_state_dict({k: tensors[names[k]] for k in expected}, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    # What from_pretrained records: where the model came from, and (transformers) the dtype it was read in.
    if hasattr(model, "register_to_config"):
        model.register_to_config(_name_or_path=folder)
    else:
        model.config._name_or_path = str(folder)
        model.config.dtype = tensors.file_dtype()
    return ready(model, opts.device, opts.dtype, clone=False)


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" progress bar from transformers: it would interleave with the run's own progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --- tokenizers -----------------------------------------------------------------------------


def _load_tokenizer(folder: Path, vocab_size: int | None):
    """A CLIPTokenizer from ``folder``; its vocabulary comes from the shipped CLIP BPE when the folder has none.

    A vocabulary of ``vocab_size`` < 49,408 tokens is the CLIP one cut after its first ``vocab_size - 514`` merges
    (still a valid BPE), which is what tiny test models use.
    """
    from transformers import CLIPTokenizer

    has_vocab = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
    try:
        if has_vocab:
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        else:
            tokenizer = CLIPTokenizer.from_pretrained(_assembled_tokenizer(folder, vocab_size), local_files_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {first_line(e)}") from e
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the text encoder only "
                              f"{vocab_size}; pass config= with the model's own tokenizer")
    return tokenizer


#: Tokenizer folders assembled by this process, by settings folder and vocabulary size: writing the vocabulary
#: (JSON of up to 49,408 entries) took 0.16 s of every single-file load. Removed when the process ends.
_ASSEMBLED: dict[tuple, tempfile.TemporaryDirectory] = {}
_SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # copied from the family's settings


def _assembled_tokenizer(settings_dir: Path, vocab_size: int | None) -> Path:
    key = (settings_dir, vocab_size, *((settings_dir / n).stat().st_mtime_ns if (settings_dir / n).is_file() else None
                                       for n in _SETTINGS_FILES))
    held = _ASSEMBLED.get(key)
    if held is None or not Path(held.name, "vocab.json").is_file():
        held = tempfile.TemporaryDirectory(prefix="nodegraph-tokenizer-")
        _assemble_tokenizer(settings_dir, Path(held.name), vocab_size)
        _ASSEMBLED[key] = held
    return Path(held.name)


def _assemble_tokenizer(settings_dir: Path, out: Path, vocab_size: int | None) -> Path:
    from ..tokenizers import write_clip_tokenizer_subset

    vocab_size = vocab_size or _CLIP_VOCAB
    merges = vocab_size - _BYTE_TOKENS - _SPECIAL_TOKENS
    if not 0 <= merges <= _CLIP_VOCAB - _BYTE_TOKENS - _SPECIAL_TOKENS:
        raise CheckpointError(f"a text encoder vocabulary of {vocab_size} tokens is not a CLIP BPE vocabulary "
                              f"(at most {_CLIP_VOCAB}); pass config= with the model's own tokenizer")
    write_clip_tokenizer_subset(out, merges, CLIP_BPE_DIR)
    for name in _SETTINGS_FILES:  # the family's special tokens (pad "!"...)
        if (settings_dir / name).is_file():
            shutil.copyfile(settings_dir / name, out / name)
    return out


# --- single files ---------------------------------------------------------------------------


def _load_single_file(path: Path, shapes: Mapping[str, Sequence[int]],
                      read: Callable[[torch.dtype | None], Mapping[str, torch.Tensor]], opts: _Options,
                      config_dir: Path | None, unet_over: UNetOver | None, streamed: bool = False) -> Components:
    """``read(dtype)`` gives the file's tensors; with ``streamed``, a :class:`StreamedSafetensors` that reads each
    one when converted, already cast to ``dtype`` (then nothing is cast or copied again after assembly)."""
    try:
        family = detect_family(shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    require_parts(shapes, family, str(path))
    settings_dir = config_dir or family_config_dir(family)
    index = read_json(settings_dir / "model_index.json")
    if config_dir is None:
        try:
            configs = derive_configs(shapes, family)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
    else:
        configs = {name: read_json(config_dir / name / "config.json")
                   for name in ("unet", "vae", *TEXT_ENCODERS[family])}
    classes = [_model_class(c) for c in ("UNet2DConditionModel", "AutoencoderKL",
                                           *(_text_class(index, n, settings_dir) for n in TEXT_ENCODERS[family]))]
    # A model that keeps some modules in float32 casts itself in ready(): read those weights as they are.
    cast = streamed and not any(getattr(c, "_keep_in_fp32_modules", None) for c in classes)
    tensors = read(opts.dtype if cast else None)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    settings_origin = f"from {config_dir}" if config_dir else "derived from the header"
    origin = f"{path} ({family}, configuration {settings_origin})"
    text: dict[str, Any] = {}  # text_encoder, tokenizer[, text_encoder_2, tokenizer_2]
    for name, (prefix, kind) in TEXT_ENCODERS[family].items():
        text[name] = _build(_text_class(index, name, settings_dir), configs[name],
                            lambda model, p=prefix, k=kind: _convert_text(tensors, model, p, k), name.replace("_", " "),
                            origin, opts, streamed)
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        text[tokenizer_name] = _load_tokenizer(settings_dir / tokenizer_name, configs[name]["vocab_size"])
    if unet_over:
        unet = unet_over(configs["unet"])
    else:
        _lay_out(tensors, "unet" in opts.channels_last, "unet" in opts.packed)
        unet = _build("UNet2DConditionModel", configs["unet"],
                      lambda _: convert_ldm_unet_checkpoint(tensors, configs["unet"]), "UNet", origin, opts,
                      streamed)
    _lay_out(tensors, "vae" in opts.channels_last, "vae" in opts.packed)
    return Components(
        unet=unet,
        vae=_build("AutoencoderKL", configs["vae"], lambda _: convert_ldm_vae_checkpoint(tensors, configs["vae"]),
                   "VAE", origin, opts, streamed),
        scheduler_config=read_json(settings_dir / "scheduler" / "scheduler_config.json"),
        family=family,
        source=f"single file {origin}",
        **text,
    )


def _lay_out(tensors: Mapping[str, torch.Tensor], channels_last: bool, plain_kernels: bool) -> None:
    """The layout in which a streamed file gives the next component's kernels (one file holds every component)."""
    if isinstance(tensors, StreamedSafetensors):
        tensors.channels_last = channels_last
        tensors.plain_kernels = plain_kernels


def _convert_text(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module, prefix: str, kind: str) -> dict:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    if kind == "openclip":
        return convert_open_clip_checkpoint(model, tensors, prefix=prefix)
    # The transformers layout needs only the prefix removed (keep "text_model."; _build fits it to the model).
    strip = prefix[: -len("text_model.")]
    return {k[len(strip):]: tensors[k] for k in tensors if k.startswith(prefix)}  # each tensor read once


def _build(class_name: str, config: Mapping, convert: Callable[[torch.nn.Module], dict], what: str, origin: str,
           opts: _Options, streamed: bool = False,
           hint: str = "If the model has a non-standard architecture, pass config= with its diffusers folder.",
           ) -> torch.nn.Module:
    """Build a model from ``config`` without allocating weights, then give it the converted tensors (strictly).

    ``streamed``: the tensors were read into memory of their own (see :class:`StreamedSafetensors`); they are
    assigned as they are, and only views (a fused q/k/v split in three, a 1x1 convolution seen as a linear
    layer) get their own contiguous copy, as cloning gave before, so no second copy of the model is ever made."""
    cls = _model_class(class_name)
    try:
        with empty_weights():  # parameters on the meta device; buffers (position ids) real
            if hasattr(cls, "from_config"):
                model = cls.from_config(dict(config))
            else:
                model = cls(cls.config_class.from_dict(dict(config)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{origin}: cannot build the {what} from its configuration: {first_line(e)}") from e
    try:
        state = convert(model)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{origin}: cannot convert the {what} weights: {first_line(e)}") from e
    expected = set(model.state_dict())
    # transformers >= 5 flattened CLIPTextModel (no "text_model." level); checkpoints keep it.
    state = {(k if k in expected or not k.startswith("text_model.") else k[len("text_model."):]): v
             for k, v in state.items()}
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in set(state) - expected if not k.endswith(_IGNORABLE))
    if missing or unexpected:
        raise CheckpointError(
            f"{origin}: the {what} weights do not fit a {class_name} of the expected configuration: "
            f"missing {few(missing)}; unexpected {few(unexpected)}. {hint}")
    try:
        model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    except Exception as e:  # noqa: BLE001 - shape mismatches
        raise CheckpointError(f"{origin}: the {what} weights do not fit: {first_line(e)}") from e
    del state
    if not streamed:
        return _placed(model, opts)
    for _, t in _tensors(model):
        if t.device.type == "meta":
            continue
        if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            t.data = t.data.contiguous().clone()
        elif t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t.data = t.data.clone()  # a view: its own memory, in its layout
    return ready(model, opts.device, opts.dtype, clone=False)
