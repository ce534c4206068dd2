"""Inference-only forms of diffusers blocks that compute the same numbers with less memory traffic.

diffusers' ResnetBlock2D allocates a new tensor for each activation, adds the shortcut into a fresh tensor and
then divides it by ``output_scale_factor``, which is 1 in every Stable Diffusion UNet and VAE. On a CPU these
element-wise passes over large activations are a tenth of a VAE decode. The form here applies SiLU in place, adds
the shortcut in place and skips the division by 1: bit-identical results (IEEE addition commutes; x / 1 == x),
which the parity tests check in float32. Blocks that resample, scale-shift or train keep diffusers' forward.

Upsample2D (nearest 2x, then a 3x3 convolution) has a second form for the fast layout only (``apply(...,
upsample=True)``, given where convolutions run channels_last): each output pixel of the convolution sees a 2x2
window of the *input*, so the four output phases are four 2x2 convolutions of the input with kernels summed from
the 3x3 one (in float64), run as one convolution with four times the output channels and interleaved. 16 instead
of 36 multiply-adds per output value and no upsampled copy: the SD VAE decoder's upsamplers at 512 take half the
time (0.8 s of a bfloat16 decode on the 2-core machine, 1.6 s in float32). The convolution runs over bands of rows
(``UPSAMPLE_BAND_BYTES`` of output each) written straight into the upsampled map: the live peak of an SD decode at
512 in bfloat16 fell from 389 to 354 MB. Bands of 8 MB rather than 32 (the convolution's scratch grows with them):
the last upsampler of an SD decode at 512 in float32 peaks 287 MB above its input instead of 393, in no more time;
4 MB (with heap trims between the decoder's blocks) took 9-14 MB more off the whole decode's peak, in the same time.
Not bit-identical (the kernel taps are summed before the products), so the exact path (``--memory-format
contiguous``) keeps diffusers' form.

:func:`pack` makes a channels_last model's 3x3 and 1x1 convolutions on the CPU reorder their weights into oneDNN's
blocked layout once (at their first call, or at once: ``pack(..., now=True)``, as a copied checkpoint load does) and
keep only that, instead of PyTorch reordering every weight on every call (eager convolutions do: at the UNet's 8x8
level the reorder costs as much as the convolution). Memory stays as it was. The same oneDNN kernel computes:
bfloat16 outputs are bit-identical here, float32 ones equal or, for the few shapes where the plain path picks
another kernel, within 2e-6 (the tests check both; at first use per dtype a small convolution checks that this build
and CPU compute the blocked form at all, else nothing packs). The blocked layout oneDNN wants depends on the input's
size too (float32 1280-channel 3x3 kernels on the 2-core machine: blocks of 16 output channels at 4x4, of 32 from
8x8 on), so a weight is packed for the size of its first call and packed again, once, when the size changes to one
that wants another layout (:meth:`PackedConv2d._repack` learns which do from the first kernel of each shape); one
packed for 16x16 whatever the input was reordered at every call at the SD1.5 UNet's 4x4 level (256 px): its float32
step took 1.65 s instead of 0.95 (diffusers 1.32). The SD1.5-size UNet's step on the 2-core machine: bfloat16 0.79
-> 0.56 s at 256, 2.99 -> 2.65 s at 512 (float32 channels_last 1.69 -> 1.17 s and 5.6 -> 4.6 s); packing costs about
a second once, less from the layout a file stores (contiguous) than from channels_last, so those kernels are loaded
as stored and packed from that (:func:`to_channels_last` leaves them be). 1x1 kernels packed for their input size
run as fast or faster than plain ones (float32, 2,560 to 1,280 channels at 4x4: 0.48 against 2.28 ms; 320 at 32x32:
0.59 against 0.70), and no longer reorder at each call (44 reorders, 23 ms of a 256 px step). Whatever moves, casts
or loads into such a convolution gets the plain weight back first (:meth:`PackedConv2d.unpack`), and its
``state_dict`` holds the plain weight, so other code sees an ordinary ``Conv2d``.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from nodegraph import heap

from .attention import use_banded
from .loading import release_mapped
from .loading.weights import PACKED_KERNELS


class InferenceResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D's forward for eval mode, without its temporary copies (see the module docstring)."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
        if self.training or args or kwargs:
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden = F.silu(self.norm1(input_tensor), inplace=True)
        hidden = self.conv1(hidden)
        if temb is not None and self.time_embedding_norm == "default":  # "group" (VAE decoders) ignores temb
            hidden = hidden + (self.time_emb_proj(F.silu(temb))[:, :, None, None] if self.time_emb_proj is not None
                               else temb)
        hidden = F.silu(self.norm2(hidden), inplace=True)
        hidden = self.conv2(hidden)
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        return hidden.add_(shortcut) if hidden.shape == shortcut.shape else hidden + shortcut


def _phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel [O, C, 3, 3] as the 2x2 kernels of the four output phases of a nearest 2x upsampling followed
    by it, [4 * O, C, 2, 2] ordered (row phase, column phase, output channel), summed in float64. Output row 2i
    reads upsampled rows 2i-1, 2i, 2i+1, that is input rows i-1, i, i: taps (w0, w1 + w2); row 2i+1 reads input
    rows i, i, i+1: taps (w0 + w1, w2). Columns alike."""
    w = weight.double()

    def halves(k: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, c = k.unbind(dim)
        return torch.stack([a, b + c], dim), torch.stack([a + b, c], dim)

    kernels = [col for row in halves(w, 2) for col in halves(row, 3)]
    return torch.cat(kernels, 0)


#: The phase upsampler computes its convolution this many bytes of output at a time (see its forward).
UPSAMPLE_BAND_BYTES = 4 << 20


class InferenceUpsample2D(Upsample2D):
    """Upsample2D's nearest 2x + 3x3 convolution as one 2x2 convolution of the input (see the module docstring)."""

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs):
        conv = self.conv if self.name == "conv" else self.Conv2d_0
        n, _, h, w = hidden_states.shape
        if (self.training or args or kwargs or torch.compiler.is_compiling() or conv._forward_hooks
                or conv._forward_pre_hooks or (output_size is not None and tuple(output_size) != (2 * h, 2 * w))):
            return super().forward(hidden_states, output_size, *args, **kwargs)  # LoRA hooks see the conv run
        weight, bias = self._phases(conv)
        out_channels = weight.shape[0] // 4
        out = torch.empty(n, h, 2, w, 2, out_channels, dtype=hidden_states.dtype, device=hidden_states.device)
        # The 2x2 convolution's output (four phases of out_channels) is as large as the upsampled map itself: made a
        # band of rows at a time, it adds a band to the decode's peak instead of another copy of its largest map.
        rows = max(1, UPSAMPLE_BAND_BYTES // (n * (w + 1) * weight.shape[0] * hidden_states.element_size()))
        for r0 in range(0, h + 1, rows):
            r1 = min(h + 1, r0 + rows)  # output rows r0..r1-1 read input rows r0-1..r1-1 (zeros outside)
            band = hidden_states[:, :, max(r0 - 1, 0):min(r1, h)]
            if r0 == 0 or r1 == h + 1:
                band = F.pad(band, (0, 0, int(r0 == 0), int(r1 == h + 1)))
            z = F.conv2d(band, weight, bias, padding=(0, 1))  # [n, 4 * out, r1 - r0, w + 1]
            phases = z.permute(0, 2, 3, 1).unflatten(3, (2, 2, out_channels))  # a view when z is channels_last
            for a in (0, 1):  # output row 2i + a is row i + a of the convolution's output
                i0, i1 = max(r0 - a, 0), min(r1 - a, h)
                for b in (0, 1):
                    if i1 > i0:
                        out[:, i0:i1, a, :, b] = phases[:, i0 + a - r0:i1 + a - r0, b:b + w, a, b]
        return out.view(n, 2 * h, 2 * w, out_channels).permute(0, 3, 1, 2)  # channels_last

    def _phases(self, conv: torch.nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Kept beside the module (not a buffer: state_dicts stay diffusers'), rebuilt when the weights change
        # (in place: _version; replaced, moved or cast: the tensor itself).
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None
                    for t in (conv.weight, conv.bias))
        cached = getattr(self, "_phase_cache", None)
        if cached is None or cached[0] != key:
            weight = _phase_kernels(conv.weight.detach()).to(conv.weight.dtype)
            weight = weight.contiguous(memory_format=torch.channels_last)
            bias = conv.bias.detach().repeat(4) if conv.bias is not None else None
            cached = self._phase_cache = (key, weight, bias)
        return cached[1], cached[2]


class PackedConv2d(torch.nn.Conv2d):
    """A 3x3 or 1x1 Conv2d holding its weight in oneDNN's blocked layout from its first inference call on the CPU (see
    the module docstring and :func:`pack`)."""

    packs_weight = True  # inputs go channels_last even while the weight still has its loaded layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        blocked_now = (x.device.type == "cpu" and x.dtype == weight.dtype and not torch.compiler.is_compiling()
                       and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                             or (self.bias is not None and self.bias.requires_grad))))
        if weight.layout == torch.strided:
            if not (blocked_now and _packable(self) and packing_works(weight.dtype)):
                return super().forward(x)
            weight = self._pack(x.shape)
        elif not blocked_now:  # autograd, another device or dtype, torch.compile: the plain weight
            return self._conv_forward(x, weight.to_dense().contiguous(memory_format=torch.channels_last), self.bias)
        elif getattr(weight, "packed_for", None) != tuple(x.shape[-2:]):
            weight = self._repack(x.shape)  # another input size may want another blocked layout: once per change
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, self.padding, self.stride, self.dilation,
                                                       self.groups, "none", [], "")

    def _repack(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        """The blocked weight for inputs of ``input_shape`` after it was packed for another size: kept as it is where
        that size wants the same layout. Which sizes do is learnt per weight shape from the first weight repacked
        between them (its bytes compared before and after), so of a model's many kernels of one shape only one is
        reordered to find out: the SD1.5 UNet's 3x3 kernels keep one layout from 8x8 to 128x128 here, while switching
        sizes repacked all 98 kernels (1.3-1.6 s on the 2-core machine)."""
        weight, size = self.weight, tuple(input_shape[-2:])
        if getattr(weight, "packed_for", None) is None:
            return self._pack(input_shape)
        key = (tuple(weight.shape), weight.dtype, tuple(self.padding), tuple(self.stride), tuple(self.dilation),
               self.groups, frozenset((weight.packed_for, size)))
        same = _SAME_LAYOUT.get(key)
        if same:
            weight.packed_for = size
            return weight
        if same is not None:
            return self._pack(input_shape)
        before = _fingerprint(weight)
        weight = self._pack(input_shape)
        after = _fingerprint(weight) if before is not None else None
        if after is not None:  # a wrong answer would cost time (a reorder at every call), never the result
            _SAME_LAYOUT[key] = before[0] == after[0] and torch.equal(before[1], after[1])
            while len(_SAME_LAYOUT) > _LAYOUT_MEMORY:
                _SAME_LAYOUT.pop(next(iter(_SAME_LAYOUT)), None)
        return weight

    def _pack(self, input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The weight in the blocked layout oneDNN's kernel picks for inputs of ``input_shape`` (default 16x16).
        The layout depends on the input's size too: float32 1280-channel kernels on the 2-core machine want blocks
        of 16 output channels for 4x4 maps (the SD1.5 UNet's deepest level at 256 px) and of 32 from 8x8 on; a
        kernel packed for the wrong one is reordered again at every call (33 ms instead of 6 at that level)."""
        hint = list(input_shape) if input_shape is not None else [1, self.in_channels, 16, 16]
        current = self.weight
        # made in the mode the weight was (an inference tensor or not), so that it can replace its data in place
        with torch.inference_mode(current.is_inference()), torch.no_grad():
            if current.layout == torch.strided:
                source = current.detach().to_mkldnn()
            elif self.kernel_size == (1, 1):  # oneDNN's reorder between two blocked 1x1 layouts runs 10-15x slower
                source = current.detach().to_dense().to_mkldnn()
            else:
                source = current.detach()
            blocked = torch._C._nn.mkldnn_reorder_conv2d_weight(
                source, list(self.padding), list(self.stride), list(self.dilation), self.groups, hint)
            del source
        if current.layout != torch.strided:
            current.data = blocked  # in place: a model sharing this weight (share_packed) keeps sharing it
        else:
            self.weight = torch.nn.Parameter(blocked, requires_grad=False)
            release_mapped(current)  # a kernel of a mapped file (--map-weights): its pages leave the process's RSS
            del current
            # the plain weight just freed lies amid the heap, where glibc would keep it: a model's worth of them
            # otherwise raises the first step's peak by a quarter of the weights
            heap.trim()
        self.weight.packed_for = tuple(hint[-2:])
        return self.weight

    def unpack(self) -> None:
        """The plain channels_last weight back (an ordinary Conv2d from then on)."""
        if self.weight.layout != torch.strided:
            dense = self.weight.to_dense().contiguous(memory_format=torch.channels_last)
            self.weight = torch.nn.Parameter(dense, requires_grad=False)
        self.__class__ = torch.nn.Conv2d

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(), ...: on the plain weight
        self.unpack()
        return self._apply(fn, recurse)  # an ordinary Conv2d's now

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.layout != torch.strided:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.unpack()
        self._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # an ordinary Conv2d's now


#: Whether two input sizes want one blocked layout, by (weight shape, dtype, convolution, the two sizes): learnt from
#: the first weight of that shape repacked between them (see PackedConv2d._repack). At most ``_LAYOUT_MEMORY``
#: answers, the oldest forgotten first (a server asked for ever new sizes would otherwise grow it without end).
_SAME_LAYOUT: dict[tuple, bool] = {}
_LAYOUT_MEMORY = 4096
#: A blocked weight's fingerprint: its bytes and at most this many of its 32-bit words, every word of a small one, else
#: at a prime stride (blocks are powers of two wide: an even stride could see the same offset in every block).
_FINGERPRINT_WORDS = 1 << 16
_STRIDES = (1, 7, 31, 127, 509, 2039, 8191, 32749, 131071)


def _fingerprint(weight: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """Its bytes and a sample of its words, for a blocked weight whose values are mostly distinct (a constant or
    zero kernel looks alike in every layout); None otherwise or where this build cannot show its bytes."""
    try:
        nbytes = torch.ops.mkldnn._nbytes(weight)
        raw = (ctypes.c_char * nbytes).from_address(torch.ops.mkldnn.data_ptr(weight))
        words = torch.frombuffer(raw, dtype=torch.int32, count=nbytes // 4)
    except (RuntimeError, AttributeError, NotImplementedError, ValueError):  # ops this build lacks
        return None
    stride = next((p for p in _STRIDES if p * _FINGERPRINT_WORDS >= words.numel()), _STRIDES[-1])
    sample = words[::stride].clone()
    return (nbytes, sample) if 2 * sample.unique().numel() >= sample.numel() else None


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether this build and CPU run blocked-weight convolutions in ``dtype`` and give the plain ones' numbers."""
    try:
        if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
            return False
        generator = torch.Generator().manual_seed(0)
        conv = torch.nn.Conv2d(16, 32, 3, padding=1).to(dtype).to(memory_format=torch.channels_last).eval()
        x = torch.randn(2, 16, 9, 7, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            expected = conv(x)
            conv.__class__ = PackedConv2d
            got = torch.ops.mkldnn._convolution_pointwise(x, conv._pack(), conv.bias, [1, 1], [1, 1], [1, 1], 1,
                                                          "none", [], "")
        return torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    except (RuntimeError, AttributeError, NotImplementedError):  # no oneDNN, or an op this build lacks
        return False


def _packable(conv: torch.nn.Conv2d) -> bool:
    weight = conv.weight
    return (conv.kernel_size in PACKED_KERNELS and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and weight.device.type == "cpu" and weight.layout == torch.strided
            and weight.dtype in (torch.float32, torch.bfloat16)
            # packed from either layout alike; from the file's (contiguous) in about half the time
            and (weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)))


def pack(module: torch.nn.Module, now: bool = False) -> int:
    """Make ``module``'s 3x3 and 1x1 convolutions :class:`PackedConv2d`: each reorders its weight into oneDNN's blocked
    layout at its first inference call on the CPU (where this machine computes that form: :func:`packing_works`),
    or with ``now`` at once, and keeps only that. Call it before :func:`to_channels_last`, which then leaves their
    kernels in the layout they were loaded in. Returns how many."""
    count = 0
    for conv in module.modules():
        if type(conv) is torch.nn.Conv2d and _packable(conv):
            conv.__class__ = PackedConv2d
            count += 1
        if now and type(conv) is PackedConv2d and conv.weight.layout == torch.strided and _packable(conv) \
                and packing_works(conv.weight.dtype):
            with torch.no_grad():
                conv._pack()
    return count


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s 4-D weights and buffers channels_last, as ``module.to(memory_format=torch.channels_last)``
    makes them, except the kernels of its :class:`PackedConv2d`: they are packed (at load or first call) from whatever
    layout they have (from a file's, contiguous, in 35-45 ms instead of 64-70 for a 1280-channel kernel), so a
    channels_last copy before would only cost time. The kernels of a memory-mapped file (``--map-weights``) that
    are copied here give the file's pages back (:func:`~.loading.release_mapped`)."""
    with torch.no_grad():
        for owner in module.modules():
            packed = type(owner) is PackedConv2d
            for name, t in [*owner._parameters.items(), *owner._buffers.items()]:
                if (t is None or t.dim() != 4 or t.layout != torch.strided or (packed and name == "weight")
                        or t.is_contiguous(memory_format=torch.channels_last)):
                    continue
                plain = t.data
                t.data = plain.contiguous(memory_format=torch.channels_last)
                release_mapped(plain)
    return module


def channels_last_packed(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with channels_last weights whose 3x3 and 1x1 convolutions keep blocked ones (:func:`pack`) and banded
    bfloat16 attention (nodes/attention.py): the CPU's fast layout for a denoiser (and a ControlNet beside it)."""
    pack(module)
    to_channels_last(module)
    use_banded(module)
    trim_stages(module)
    return module


def _trim_before_stage(stage: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not torch.compiler.is_compiling():
        heap.trim_if_due()


def trim_stages(module: torch.nn.Module) -> int:
    """Give the heap's freed pages back to the OS before each stage (down, mid and up block) of ``module``'s UNets,
    VAE encoders and decoders and ControlNets when they run on the CPU, at most every ``heap.STAGE_TRIM_S``.

    A stage's intermediates (attention bands, feed-forward activations, VAE maps below glibc's 32 MB mmap threshold)
    are freed into the heap, which keeps them; the next stage's allocations, of other sizes, fragment it further.
    Measured on the SD1.5-size UNet at 512 (float32, one step): peak above the step's start 283-298 -> 198-209 MB,
    step time unchanged (2 ms per trim, 9 per step). Numerics are untouched. Returns how many stages it hooked."""
    count = 0
    for owner in module.modules():
        stages = [*getattr(owner, "down_blocks", ()), getattr(owner, "mid_block", None),
                  *getattr(owner, "up_blocks", ())]
        for stage in stages:
            if isinstance(stage, torch.nn.Module) and _trim_before_stage not in stage._forward_pre_hooks.values():
                stage.register_forward_pre_hook(_trim_before_stage, with_kwargs=True)
                count += 1
    return count


def share_packed(module: torch.nn.Module, like: torch.nn.Module) -> None:
    """When ``like``'s convolutions pack (:func:`pack`), make ``module``'s equal ones (same name, configuration and
    weights) use the very same blocked weights, packing them now where still plain, and let the rest pack too: a
    model built from another (AnimateDiff's from a UNet) holds no second copy."""
    theirs = {name: m for name, m in like.named_modules() if type(m) is PackedConv2d}
    if not theirs:
        return
    with torch.no_grad():
        for name, conv in module.named_modules():
            other = theirs.get(name)
            if other is None or type(conv) is not torch.nn.Conv2d or conv.extra_repr() != other.extra_repr():
                continue
            if other.weight.layout == torch.strided:
                if not (_packable(other) and packing_works(other.weight.dtype)):
                    continue
                other._pack()
            if conv.weight.dtype == other.weight.dtype and torch.equal(conv.weight, other.weight.to_dense()):
                conv.__class__ = PackedConv2d
                conv.weight = other.weight
    pack(module)


def same_conv3x3(conv: torch.nn.Module | None) -> bool:
    """Whether ``conv`` is a plain Conv2d with a 3x3 kernel that keeps the map's size (stride 1, zero padding 1)."""
    return (type(conv) is torch.nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _fits_upsample(block: torch.nn.Module) -> bool:
    conv = getattr(block, "conv" if getattr(block, "name", None) == "conv" else "Conv2d_0", None)
    return (type(block) is Upsample2D and block.use_conv and not block.use_conv_transpose and block.interpolate
            and block.norm is None and same_conv3x3(conv))


def _fits(block: torch.nn.Module) -> bool:
    return (type(block) is ResnetBlock2D and block.upsample is None and block.downsample is None
            and block.time_embedding_norm != "scale_shift" and not block.skip_time_act
            and block.output_scale_factor == 1.0 and isinstance(block.nonlinearity, torch.nn.SiLU))


def apply(module: torch.nn.Module, upsample: bool = False, attention: bool = False) -> torch.nn.Module:
    """Give ``module``'s fitting ResnetBlock2Ds the inference forward (in place), with ``upsample`` its fitting
    Upsample2Ds the phase form and its VAE decoders the banded one of nodes/lean_decode.py, and with ``attention``
    its attentions banded bfloat16 attention on the CPU (nodes/attention.py: the fast layout's), and its stages heap
    trims (:func:`trim_stages`); returns ``module``."""
    from . import lean_decode

    for block in module.modules():
        if _fits(block):
            block.__class__ = InferenceResnetBlock2D
        elif upsample and _fits_upsample(block):
            block.__class__ = InferenceUpsample2D
        elif upsample and lean_decode.fits(block):
            block.__class__ = lean_decode.InferenceDecoder
    if attention:
        use_banded(module)
    trim_stages(module)
    return module
