"""AnimateDiff: a motion module turns an SD 1.5 model into a video model; the samplers then denoise a clip of frames.

The graph of diffusers' ``AnimateDiffPipeline``: LoadMotionModule reads a ``MotionAdapter`` (the
guoyww/animatediff-motion-adapter-v1-5 family, diffusers folders), ApplyMotionModule gives a MODEL its motion
layers (``UNetMotionModel.from_unet2d``, a new UNet sharing the checkpoint's weights, which stays as it was for
other branches),
EmptyLatentVideo makes latents [batch, channels, frames, h, w], LCMSampler or Sampler denoise them through the
shared loop (every frame reads its video's prompt), VAEDecode decodes every frame, and SaveAnimation writes an
animated WebP or GIF. With LCM-LoRA and an LCMScheduler whose beta schedule is linear, as the LCM docs animate, a
16-frame clip takes 4-6 steps at guidance 1-2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nodegraph import Boolean, Combo, Folder, Int, Node, NodeOutput, Output, Socket, String
from nodegraph.folders import OUTPUT

from . import devices, previews
from .images import save_files, tensor_to_pils
from .latent import latent_geometry
from .values import IMAGE, LATENT, MODEL, VAE, Latent, Model, field_storages, param_bytes

MOTION_MODULE = "MOTION_MODULE"


def _motion_adapter_folder(path: Path) -> bool | None:
    config = path / "config.json"
    if not config.is_file():
        return None  # a folder of motion modules, perhaps
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "MotionAdapter"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


MOTION_MODULES = Folder("animatediff_models", what="motion modules (diffusers MotionAdapter folders, or single files "
                        "such as mm_sd_v15_v2.safetensors)", suffixes=(".safetensors", ".ckpt", ".pth", ".pt"),
                        entry_dir=_motion_adapter_folder, flag="--models")


@dataclass(frozen=True, eq=False)
class MotionModule:
    """A motion adapter's temporal layers, on the run's device in its dtype."""

    adapter: torch.nn.Module
    name: str

    __nodegraph_model__ = True
    __nodegraph_storages__ = field_storages

    def __nodegraph_nbytes__(self) -> int:
        return param_bytes(self.adapter)


class LoadMotionModule(Node):
    """Load an AnimateDiff motion module from the models folder's animatediff_models/: a diffusers MotionAdapter
    folder (such as animatediff-motion-adapter-v1-5-2) or an original single file (mm_sd_v15_v2.safetensors and
    the like; .ckpt pickles only with --allow-pickle). Motion modules are made for SD 1.5 models."""

    category = "loaders"
    motion_module = Combo(options=MOTION_MODULES)
    outputs = (Output("motion_module", MOTION_MODULE),)

    def run(self, ctx, motion_module):
        from .checkpoint import standalone_options
        from .loading import CheckpointError, ready
        from .loading.assemble import _pretrained

        path = MOTION_MODULES.locate(ctx.settings, motion_module)
        # on the run's device in its dtype, as the models it will animate: ApplyMotionModule then shares its tensors
        if path.is_file():
            device = devices.device(ctx.settings)
            dtype = devices.dtype(ctx.settings, device)
            adapter = motion_adapter_from_file(path, ctx.settings.allow_pickle, dtype, device)
            adapter = ready(adapter, device, dtype, clone=False)
        elif _motion_adapter_folder(path) is not True:
            raise CheckpointError(f"{path}: not a motion module (a folder whose config.json names a MotionAdapter)")
        else:  # streamed, or mapped where guarded, as checkpoints load
            opts = standalone_options(ctx.settings, sorted(path.glob("diffusion_pytorch_model*.safetensors")))
            adapter = _pretrained("MotionAdapter", path, None, opts)
        return MotionModule(adapter, motion_module)


def motion_adapter_from_file(path: Path, allow_pickle: bool = False, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu") -> torch.nn.Module:
    """A MotionAdapter from an original AnimateDiff file (``down_blocks.0.motion_modules.0.temporal_transformer.*``):
    keys renamed as diffusers' converter does, the configuration read from the tensor shapes. Head count and norm
    groups leave no trace in the shapes: every released v1/v2/v3 module uses 8 and 32, diffusers' defaults.
    A safetensors file is read tensor by tensor into ``dtype`` on ``device`` (no map of the whole file beside the
    copy); its computed buffers stay on the CPU until the module is placed (``loading.ready``)."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    from .loading import CheckpointError, few
    from .loading.assemble import empty_weights
    from .loading.weights import StreamedSafetensors, file_kind, read_header, read_pickle

    if file_kind(path) == "safetensors":
        shapes = read_header(path)
        tensors = StreamedSafetensors(path, dtype, device=device)
    else:
        tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                   for k, v in read_pickle(path, allow_pickle).items()}
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    positions = next((v for k, v in shapes.items() if k.endswith("pos_encoder.pe")), None)
    state = convert_animatediff_checkpoint_to_diffusers(tensors)  # reads each tensor once
    widths = []
    while f"down_blocks.{len(widths)}.motion_modules.0.proj_in.weight" in state:
        widths.append(int(state[f"down_blocks.{len(widths)}.motion_modules.0.proj_in.weight"].shape[0]))
    if not widths:
        raise CheckpointError(f"{path.name}: not an AnimateDiff motion module (no down_blocks.N.motion_modules "
                              f"weights; found {few(sorted(tensors))})")
    layers = len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.motion_modules.")})
    blocks = len({k.split(".")[5] for k in state if k.startswith("down_blocks.0.motion_modules.0.transformer_blocks.")})
    config = dict(block_out_channels=tuple(widths), motion_layers_per_block=layers,
                  motion_transformer_layers_per_block=blocks,
                  use_motion_mid_block=any(k.startswith("mid_block.") for k in state),
                  motion_max_seq_length=int(positions[1]) if positions is not None else 32)
    with empty_weights():  # parameters on the meta device until they are given theirs (buffers are computed)
        adapter = MotionAdapter(**config)
    missing, unexpected = adapter.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("pos_embed.pe")]  # computed, not stored, as in diffusers
    if missing or unexpected:
        raise CheckpointError(f"{path.name}: the weights do not fit a motion module of blocks {tuple(widths)}: "
                              f"missing {few(missing) or 'nothing'}, unexpected {few(unexpected) or 'nothing'}")
    return adapter


class ApplyMotionModule(Node):
    """Give a model a motion module, so that the samplers denoise videos (latents from EmptyLatentVideo). The model
    must be the family the module was trained for (SD 1.5, with the same block widths)."""

    category = "loaders"
    model = Socket(MODEL)
    motion_module = Socket(MOTION_MODULE)
    outputs = (Output("model", MODEL),)

    def run(self, ctx, model: Model, motion_module: MotionModule):
        from diffusers import UNetMotionModel

        from .loading import ready

        unet_widths = tuple(model.unet.config.block_out_channels)
        motion_widths = tuple(motion_module.adapter.config.block_out_channels)
        if model.family != "sd1" or unet_widths != motion_widths:
            raise ValueError(f"the motion module {motion_module.name!r} is made for SD 1.5 UNets with blocks "
                             f"{motion_widths}; the model {model.name!r} is {model.family} with blocks {unet_widths}")
        from . import fastpaths

        device = model.device
        fast_layout = devices.channels_last(ctx.settings, device, "unet")
        unet = _animated_unet(model.unet, motion_module.adapter, model.dtype)
        if unet is None:  # a UNet or adapter whose weights do not map one to one (PIA's conv_in...): copied, then
            with torch.no_grad():  # shared back where equal
                unet = UNetMotionModel.from_unet2d(model.unet, motion_module.adapter)
            ready(unet, device, model.dtype, clone=False)
            if fast_layout:
                unet.to(memory_format=torch.channels_last)
            _share_weights(unet, model.unet)
            _share_weights(unet, motion_module.adapter)  # its motion modules, where in the model's dtype and device
            fastpaths.share_packed(unet, model.unet)
        fastpaths.apply(unet, attention=fast_layout)
        animated = replace(model, unet=unet, name=f"{model.name} + {motion_module.name}")
        previews.share(model, animated)
        return animated


def _animated_unet(unet: torch.nn.Module, adapter: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module | None:
    """``UNetMotionModel.from_unet2d(unet, adapter)`` without a copy of either: the motion UNet is built on the meta
    device (no memory, no random initialisation) and given the very parameters of ``unet`` (blocked convolution
    weights included) and of ``adapter``, module by module of the same name. from_unet2d itself builds a float32
    model on the CPU and copies every weight into it: a second UNet in memory, moved back to the GPU on CUDA.
    None when some weight has no source of the same shape in either, or the adapter is in another dtype."""
    from diffusers import UNetMotionModel

    from .fastpaths import PackedConv2d
    from .loading.assemble import empty_weights

    device = next(unet.parameters()).device
    if any(p.dtype != dtype or p.device != device for p in adapter.parameters()):
        return None
    with empty_weights():
        animated = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    owners = (dict(unet.named_modules()), dict(adapter.named_modules()))
    for name, module in animated.named_modules():
        wanted = {k: p for k, p in module._parameters.items() if p is not None}
        if not wanted:
            continue
        source = next((m for m in (o.get(name) for o in owners) if m is not None and all(
            isinstance(m._parameters.get(k), torch.Tensor) and m._parameters[k].shape == p.shape
            for k, p in wanted.items())), None)
        if source is None:
            return None
        if type(source) is PackedConv2d and type(module) is torch.nn.Conv2d:
            if module.extra_repr() != source.extra_repr():
                return None
            module.__class__ = PackedConv2d  # sharing the blocked weight, packed or to be packed at the first call
        for k in wanted:
            module._parameters[k] = source._parameters[k]  # the very Parameter: one tensor for both models
    for module in animated.modules():  # computed buffers (positional encodings), made in float32 on the CPU
        for k, b in module._buffers.items():
            if b is not None:
                module._buffers[k] = b.to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
    animated.eval()
    animated.requires_grad_(False)
    return animated


def _share_weights(animated: torch.nn.Module, base: torch.nn.Module) -> None:
    """Point the animated UNet's copies of the base UNet's (or the motion adapter's) weights (from_unet2d copies
    them all) back at the base's own tensors, so the two models hold one copy in memory. Only equal tensors of the
    same names are shared (the adapter names its motion modules as the animated UNet does)."""
    own = dict(base.named_parameters())
    with torch.no_grad():
        for name, param in animated.named_parameters():
            theirs = own.get(name)
            if (theirs is not None and theirs.layout == param.layout == torch.strided  # blocked: share_packed
                    and theirs.shape == param.shape and theirs.dtype == param.dtype
                    and theirs.device == param.device and theirs.stride() == param.stride()
                    and torch.equal(theirs, param)):
                param.data = theirs.data


class EmptyLatentVideo(Node):
    """Empty latents for a video of `frames` frames (16 is what AnimateDiff's motion modules are trained on; they
    reach 32). Connect the checkpoint's VAE to match its latent shape."""

    category = "latent"
    width = Int(default=512, min=8, max=4096, step=8)
    height = Int(default=512, min=8, max=4096, step=8)
    frames = Int(default=16, min=1, max=128)
    batch = Int(default=1, min=1, max=16)
    vae = Socket(VAE, optional=True)
    outputs = (Output("latent", LATENT),)

    def run(self, ctx, width, height, frames, batch, vae=None):
        channels, h, w = latent_geometry(width, height, vae, ctx.settings.max_image_size)
        return Latent(samples=torch.zeros(batch, channels, frames, h, w), empty=True)


class SaveAnimation(Node):
    """Save frames (the images of a decoded video, in order) as one animated WebP, GIF or MP4 in the output folder.
    fps: frames per second; loop: how many times it plays (0 = for ever; WebP and GIF). WebP keeps full colour
    (lossless when asked); GIF has 256 colours per frame but plays everywhere; MP4 (H.264, needs PyAV:
    pip install nodegraph[video]) is the smallest, with even sides."""

    category = "image"
    output_node = True
    images = Socket(IMAGE)
    filename_prefix = String(default="nodegraph", path_within=OUTPUT)
    fps = Int(default=8, min=1, max=60)
    format = Combo(options=["webp", "gif", "mp4"], default="webp")
    loop = Int(default=0, min=0, max=1000)
    lossless = Boolean(default=False)
    quality = Int(default=90, min=1, max=100)

    def run(self, ctx, images, filename_prefix, fps, format, loop, lossless, quality):
        frames = tensor_to_pils(images)
        duration = round(1000 / fps)  # milliseconds per frame

        def write(path: Path) -> None:
            if format == "mp4":
                return _write_mp4(path, frames, fps, quality)
            options = {"lossless": lossless, "quality": quality} if format == "webp" else {"disposal": 2}
            frames[0].save(path, format=format.upper(), save_all=True, append_images=frames[1:], duration=duration,
                           loop=loop, **options)

        entries = save_files(ctx.output_dir, filename_prefix, f".{format}", [write])
        return NodeOutput((), {"images": [{**e, "type": "output", "animated": True, "frames": len(frames)}
                                          for e in entries]})


def _write_mp4(path: Path, frames: list, fps: int, quality: int) -> None:
    try:
        import av
    except ImportError:
        raise RuntimeError("MP4 needs PyAV, which ships its own FFmpeg: pip install nodegraph[video] (or choose "
                           "webp or gif)") from None
    import numpy as np

    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"MP4 (H.264, 4:2:0) needs even sides; the frames are {width}x{height}: choose webp or gif")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(round(40 - 0.3 * quality))}  # quality 90 -> crf 13, 50 -> 25
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


NODES = [LoadMotionModule, ApplyMotionModule, EmptyLatentVideo, SaveAnimation]
