"""3x3 convolutions as Winograd's F(2x2, 3x3): 4 multiply-adds per output value and channel pair instead of 9.

Each 2x2 block of the output is computed from the 4x4 block of the input around it. The input block and the kernel
are transformed by fixed matrices of 0, +-1 and +-1/2 (B^T d B and G g G^T), multiplied element by element, which
over all channels is 16 matrix products of [blocks x in-channels] by [in-channels x out-channels], and the result is
transformed back (A^T m A). The products run at the matrix-product rate of the CPU; the transforms are cheap adds,
but they pass four times the map's values through memory on each side, and the transformed kernel holds 16 values
where the kernel holds 9.

So it pays where channels are many and maps are not too large for their channels, and costs least memory where
kernels are small. Measured in float32 on the 2-core development machine (``benchmarks/winograd.py``, oneDNN's
direct convolution with its weight blocked for the input against this form, in bands of rows): an SD1.5 UNet's
320-channel kernels run 1.48x as fast at 64x64 and 1.09x at 96x96, 640 at 32x32 1.62x, 1280 at 16x16 1.89x but at
4x4 0.77x; the VAE decoder's 512-channel ones 1.44-1.65x, its 128-channel ones at 512x512 0.82x. A whole UNet step
took 0.88x the time at 256, 0.83x at 512 and 0.86x at 768 with this form for kernels of at most 640 channels (118 MB
more kernels in float32); for every 3x3 kernel 0.76x at 512, 0.97x at 768 and 1.10x at 256 (its deepest level is
4x4 there), for 1.06 GB more, a third of the UNet's weights. So the fast layout uses it for float32 kernels of at
most :data:`MAX_CHANNELS` channels that lie in a file's map (``nodes/fastpaths.py``), whose pages then leave the
process: the transformed kernel is the only copy in memory. Not in bfloat16, which would round the transformed
values again and was not measured on a CPU that computes it in hardware. The error is below the direct
convolution's (5.5e-7 against 9.5e-7 relative rms in float32 at 320 channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The fast layout computes float32 3x3 convolutions of at most this many input and output channels this way.
MAX_CHANNELS = 640

_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_AT = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))


def transformed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel [out, in, 3, 3] as the 16 matrices G g G^T, [16, in, out] in its dtype: the transpose of a
    contiguous [16, out, in], made by one product with the kernel's own memory (each matrix a sum of at most nine
    taps, halved or quartered), which ``bmm`` reads as it is. Products in float64 and a copy of their layout made
    fresh memory for every kernel: 3.75 s for the SD1.5 UNet's first step, against 0.3 s."""
    g = torch.tensor(_G, dtype=torch.float64)
    taps = torch.kron(g, g).to(weight.dtype)  # [16, 9]: (a, b) x (i, j)
    out, in_channels = weight.shape[:2]
    flat = weight.detach().reshape(out * in_channels, 9)  # a view of a contiguous kernel
    return torch.mm(taps, flat.t()).view(16, out, in_channels).transpose(1, 2)


#: The transformed input of a band of rows, and the products' output, at most this many bytes: large temporaries are
#: fresh memory at every call (slow to fault in), small ones reuse the heap's. Whole maps at once ran SD1.5's
#: 320-channel kernels at 128x128 (1024 px) 0.65x as fast as the direct convolution; bands of 8 MB 1.09x.
BAND_BYTES = 8 << 20


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3x3 convolution (stride 1, zero padding 1) of ``x`` [n, in, h, w] with the kernel ``u`` transformed by
    :func:`transformed_kernel`; channels_last. Odd heights and widths are padded by a row or column of zeros and
    the output cropped."""
    n, c, h, w = x.shape
    k = u.shape[2]
    hb, wb = (h + 1) // 2, (w + 1) // 2  # blocks of 2x2 outputs
    # NHWC with one zero row and column around (and one more where h or w is odd)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + w % 2, 1, 1 + h % 2))
    at = torch.tensor(_AT, dtype=torch.float64)
    at = torch.kron(at, at).to(x.dtype)  # A^T m A of every block at once: [4, 16] x [16, blocks * k]
    out = torch.empty(n, 2 * hb, 2 * wb, k, dtype=x.dtype, device=x.device)
    rows = max(1, BAND_BYTES // (16 * n * wb * max(c, k) * x.element_size()))
    for b0 in range(0, hb, rows):
        b1 = min(hb, b0 + rows)
        # B^T d B, rows then columns; B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        r = [xp[:, 2 * b0 + i:2 * b1 + i:2] for i in range(4)]
        t = torch.empty(4, n, b1 - b0, 2 * wb + 2, c, dtype=x.dtype, device=x.device)
        torch.sub(r[0], r[2], out=t[0])
        torch.add(r[1], r[2], out=t[1])
        torch.sub(r[2], r[1], out=t[2])
        torch.sub(r[1], r[3], out=t[3])
        s = [t[:, :, :, j:j + 2 * wb:2] for j in range(4)]
        v = torch.empty(4, 4, n, b1 - b0, wb, c, dtype=x.dtype, device=x.device)
        torch.sub(s[0], s[2], out=v[:, 0])
        torch.add(s[1], s[2], out=v[:, 1])
        torch.sub(s[2], s[1], out=v[:, 2])
        torch.sub(s[1], s[3], out=v[:, 3])
        del r, s, t
        m = torch.bmm(v.view(16, -1, c), u)  # [16, blocks, k]
        del v
        y = torch.mm(at, m.view(16, -1)).view(2, 2, n, b1 - b0, wb, k)
        del m
        out[:, 2 * b0:2 * b1].view(n, b1 - b0, 2, wb, 2, k).permute(2, 4, 0, 1, 3, 5).copy_(y)
    if h % 2 or w % 2:
        out = out[:, :h, :w].contiguous()
    if bias is not None:
        out += bias
    return out.permute(0, 3, 1, 2)
