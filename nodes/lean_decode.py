"""A VAE decoder that holds fewer full-size maps at once: the fast layout's decode on the CPU.

diffusers' Decoder keeps each up block's input alive through the whole block (its loop variable), and a ResnetBlock2D
holds its input, the normalised copy of it and the convolution's output at once. At the decoder's last level (SD's:
128 channels at the image's size, after an upsampler of 256) those are the decode's largest tensors: 2-3 of them
beside the weights decide a 512 px decode's peak. Here:

- GroupNorm -> SiLU -> 3x3 convolution runs over bands of rows (:func:`norm_act_conv`): the group statistics come
  first, from the whole map, then each band is normalised, activated and convolved with its neighbours' edge rows,
  so the normalised map never exists in full; the second convolution of a block adds its bands straight into the
  shortcut (or the block's input, which it owns).
- Blocks take their input by hand-over (a one-item list they empty), so the input is freed as soon as the block no
  longer reads it, not when the caller's variable moves on; the input of a block whose shortcut is written over it
  gives back its pages past the shortcut's once read (``nodegraph.heap.discard``).
- The heap gives back what the last step freed before each ResNet, upsampler and banded convolution
  (``heap.trim_if_due``): the bands' buffers, a few MB each, would otherwise pile up in the heap (240 MB under the
  last upsampler of an SD decode at 512 in bfloat16).

The numbers are those of GroupNorm, SiLU and the convolution up to rounding (the statistics are summed in another
order and the affine map is folded into one scale and shift per channel): within 1e-5 of diffusers in float32, and
in bfloat16 as close to float32 as diffusers' form (the tests check both). Only for channels_last maps on the CPU
of at least ``MIN_BYTES``; everything else (CUDA, smaller maps, hooks, training, SpatialNorm decoders) runs
diffusers' forward. Measured on the SD1.5-size VAE at 512 (``benchmarks/speed.py``) in the README.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

from nodegraph import heap

from .fastpaths import InferenceResnetBlock2D, _trim_before_stage, same_conv3x3

#: Maps smaller than this run diffusers' forward: their copies are small beside the decode's peak, and bands of
#: them cost time (a float32 decode at 256 ran 3.5% longer with 16 MB here; at 64 MB it runs in the same time).
MIN_BYTES = 64 << 20
#: Each band normalises about this many bytes of float32 input at a time (4 MB rather than 8: an SD decode at 512
#: peaked 9 MB lower in float32 and 14 MB in bfloat16, in the same time).
BAND_BYTES = 4 << 20


def _conv3x3(conv: torch.nn.Module) -> bool:
    return same_conv3x3(conv) and not conv._forward_hooks and not conv._forward_pre_hooks


def _group_norm(norm: torch.nn.Module) -> bool:
    return (type(norm) is torch.nn.GroupNorm and norm.affine and not norm._forward_hooks
            and not norm._forward_pre_hooks)


def _bands(rows: int, channels: int, width: int, batch: int) -> int:
    return max(1, min(rows, BAND_BYTES // max(1, 4 * channels * width * batch)))


@torch.no_grad()
def group_scale_shift(x: torch.Tensor, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of channels_last ``x`` as a float32 scale and shift per sample and channel, [n, 1, 1, c]: the
    statistics of each group over bands of rows (sums of deviations in float32 within a band, Chan's pairwise
    update of mean and squared deviations in float64 across bands), then the affine weights folded in."""
    n, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    rows = _bands(h, c, w, n)
    count, mean, m2 = 0, torch.zeros(n, c, dtype=torch.float64), torch.zeros(n, c, dtype=torch.float64)
    for r0 in range(0, h, rows):
        band = nhwc[:, r0:r0 + rows].reshape(n, -1, c)
        # sums of deviations from the band's first row, whose mean is near the band's: stable in float32, and
        # four times faster than torch.var_mean across rows of channels_last maps
        pivot = band[:, :w].float().mean(1, keepdim=True)
        dev = band.float().sub_(pivot) if band.dtype != torch.float32 else band - pivot
        s1 = dev.sum(1).double()
        s2 = dev.mul_(dev).sum(1).double()
        k = dev.shape[1]
        mean_b = pivot.squeeze(1).double() + s1 / k
        delta = mean_b - mean
        total = count + k
        mean += delta * (k / total)
        m2 += (s2 - s1.square() / k) + delta.square() * (count * k / total)
        count = total
    # channels -> groups: equal counts per channel, so the group mean is the channels' mean
    g = norm.num_groups
    mean_c, m2_c = mean.view(n, g, c // g), m2.view(n, g, c // g)
    mean_g = mean_c.mean(2, keepdim=True)
    m2_g = (m2_c + (mean_c - mean_g).square() * count).sum(2, keepdim=True)
    rstd = (m2_g / (count * (c // g)) + norm.eps).rsqrt()
    scale = (norm.weight.double().view(1, g, c // g) * rstd).view(n, c)
    shift = norm.bias.double().view(1, c) - (mean_g * rstd).view(n, g, 1).expand(n, g, c // g).reshape(n, c) \
        * norm.weight.double().view(1, c)
    return scale.float().view(n, 1, 1, c), shift.float().view(n, 1, 1, c)


@torch.no_grad()
def norm_act_conv(x: torch.Tensor, norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d,
                  into: torch.Tensor | None = None, shortcut: torch.nn.Conv2d | None = None):
    """``conv(silu(norm(x)))`` for channels_last ``x``, a band of rows at a time; with ``into`` (a map of the
    output's shape) its bands are added into it in place and ``into`` is returned.

    With ``shortcut`` (a 1x1 convolution to at most half of ``x``'s channels, for a single image: see
    :func:`_fits_overwrite`) it returns ``(output, shortcut(x))``, the latter written over ``x``'s own storage,
    which then holds no valid ``x``: each band's shortcut rows fill bytes of ``x`` rows before the band's halo,
    which no later band reads."""
    n, c, h, w = x.shape
    scale, shift = group_scale_shift(x, norm)
    heap.trim_if_due()  # the statistics' float32 bands, and what the caller freed, before this map's bands
    out = into if into is not None else torch.empty(n, conv.out_channels, h, w, dtype=x.dtype, device=x.device,
                                                    memory_format=torch.channels_last)
    rows = _bands(h, c, w, 1)  # image by image: a batch's bands would otherwise shrink to a row or two
    if shortcut is not None:
        rows = max(rows, 2)  # band k >= 1 starts at row 2 or later, so its halo row lies past what was overwritten
        k = shortcut.out_channels
        short = x.new_empty(0).set_(x.untyped_storage(), x.storage_offset(), (1, k, h, w), (h * w * k, 1, w * k, k))
    buf = torch.empty(1, rows + 2, w, c, dtype=torch.float32)
    for i in range(n):
        nhwc = x[i:i + 1].permute(0, 2, 3, 1)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a, b = max(r0 - 1, 0), min(r1 + 1, h)  # input rows the band's outputs read (zeros beyond the map)
            top = a - (r0 - 1)  # 1 when the band starts the map: a zero row above
            band = buf[:, :top + (b - a) + (r1 + 1 - b)]
            rows_in = band[:, top:top + b - a]
            if x.dtype == torch.float32:
                torch.addcmul(shift[i:i + 1], nhwc[:, a:b], scale[i:i + 1], out=rows_in)
            else:  # converted first: an operation mixing bfloat16 and float32 runs an unvectorised loop
                torch.addcmul(shift[i:i + 1], rows_in.copy_(nhwc[:, a:b]), scale[i:i + 1], out=rows_in)
            F.silu(rows_in, inplace=True)
            if top:
                band[:, 0].zero_()
            if r1 + 1 > b:
                band[:, -1].zero_()
            inp = band.to(x.dtype).permute(0, 3, 1, 2)  # [1, c, rows + 2, w], channels_last
            y = F.conv2d(inp, conv.weight, conv.bias, padding=(0, 1))
            if into is not None:
                out[i:i + 1, :, r0:r1].add_(y)
            else:
                out[i:i + 1, :, r0:r1].copy_(y)
            if shortcut is not None:  # after every read of this band's x rows (a single image: i == 0)
                short[:, :, r0:r1].copy_(shortcut(x[:, :, r0:r1]))
    return out if shortcut is None else (out, short)


def _hooked(block: torch.nn.Module) -> bool:
    """Whether hooks other than the stage trims (nodes/fastpaths.py) watch ``block``'s calls."""
    return bool(block._forward_hooks) or any(h is not _trim_before_stage for h in block._forward_pre_hooks.values())


def _lean(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)
            and x.numel() * x.element_size() >= MIN_BYTES and x.dtype in (torch.float32, torch.bfloat16))


def _fits_resnet(block: torch.nn.Module) -> bool:
    # the inference ResnetBlock2D of nodes/fastpaths.py (no resampling, no time embedding, output scale 1)
    return (type(block) is InferenceResnetBlock2D and _group_norm(block.norm1) and _group_norm(block.norm2)
            and _conv3x3(block.conv1) and _conv3x3(block.conv2) and isinstance(block.dropout, torch.nn.Dropout)
            and not block._forward_hooks and not block._forward_pre_hooks)


def resnet(block: InferenceResnetBlock2D, box: list) -> torch.Tensor:
    """``block(x)`` for the ``x`` handed over in ``box`` (emptied), freeing ``x`` once it is read."""
    x = box.pop()
    if not (_lean(x) and _fits_resnet(block)):
        return block(x)
    if _fits_overwrite(x, block.conv_shortcut):
        # the shortcut over the input's bytes: the input, the first convolution's output and bands, instead of
        # those and the shortcut (4 -> 3 maps of the output's size at SD's last level); then one compact copy
        hidden, out = norm_act_conv(x, block.norm1, block.conv1, shortcut=block.conv_shortcut)
        # x is spent: the pages of its storage past the shortcut's hold nothing that the rest of the block needs
        # (67 MB less under the second convolution at SD's last level, in bfloat16 at 512)
        kept = out.numel() * out.element_size()
        heap.discard(x.data_ptr() + kept, x.numel() * x.element_size() - kept)
        del x
        out = norm_act_conv(hidden, block.norm2, block.conv2, into=out)
        del hidden
        return out.clone(memory_format=torch.channels_last)  # frees the input's storage, twice as large
    hidden = norm_act_conv(x, block.norm1, block.conv1)
    out = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    del x
    return norm_act_conv(hidden, block.norm2, block.conv2, into=out)


def _fits_overwrite(x: torch.Tensor, conv: torch.nn.Module | None) -> bool:
    return (conv is not None and x.shape[0] == 1 and x.shape[2] >= 2 and type(conv) is torch.nn.Conv2d
            and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
            and 2 * conv.out_channels <= x.shape[1] and not conv._forward_hooks and not conv._forward_pre_hooks)


def up_block(block: UpDecoderBlock2D, box: list) -> torch.Tensor:
    # Before each ResNet and upsampler, the heap gives back what the last one freed: their bands (a few MB each,
    # below glibc's mmap threshold) otherwise pile up in the heap, 240 MB of it under the last upsampler of an SD
    # decode at 512 in bfloat16, whose output is the decode's largest map.
    for res in block.resnets:
        heap.trim_if_due()
        box = [resnet(res, box)]
    if block.upsamplers is not None:
        for upsampler in block.upsamplers:
            heap.trim_if_due()
            x = box.pop()
            box = [upsampler(x)]
            del x
    return box.pop()


class InferenceDecoder(Decoder):
    """Decoder's forward with fewer full-size maps alive at once (see the module docstring)."""

    def forward(self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training or latent_embeds is not None or sample.device.type != "cpu"
                or torch.compiler.is_compiling() or self._forward_hooks or self._forward_pre_hooks):
            return super().forward(sample, latent_embeds)
        sample = self.mid_block(self.conv_in(sample), None)
        for block in self.up_blocks:
            heap.trim_if_due()  # what the stage before freed (nodes/fastpaths.py trim_stages)
            box = [sample]
            del sample
            sample = up_block(block, box) if type(block) is UpDecoderBlock2D and not _hooked(block) \
                else block(box.pop(), None)
        if (_lean(sample) and _group_norm(self.conv_norm_out) and isinstance(self.conv_act, torch.nn.SiLU)
                and _conv3x3(self.conv_out)):
            return norm_act_conv(sample, self.conv_norm_out, self.conv_out)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


def fits(decoder: torch.nn.Module) -> bool:
    return type(decoder) is Decoder and type(decoder.conv_norm_out) is torch.nn.GroupNorm
