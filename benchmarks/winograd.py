"""Winograd F(2x2, 3x3) convolutions against oneDNN's direct ones, on this CPU: measured, not adopted.

    python benchmarks/winograd.py                      # per-shape table at 256 and 512, then whole UNet steps
    python benchmarks/winograd.py --sizes 512 --rounds 3 --max-channels 640 1280

Winograd's F(2x2, 3x3) computes each 2x2 block of a 3x3 convolution's output from the 4x4 block of its input
around it: input block and kernel transformed by fixed matrices of 0, +-1 and +-1/2 (B^T d B, G g G^T), then over
all channels 16 matrix products of [blocks x in-channels] by [in-channels x out-channels], transformed back
(A^T m A): 4 multiply-adds per output value and channel pair instead of 9, for a kernel of 16 values where it held 9
and four times the map's values through memory on each side of the products. The form here computes in bands of
rows (``BAND_BYTES`` of transformed input each: whole maps are fresh memory at every call) and transforms a kernel
with one matrix product over its own memory.

The first table times one convolution at each 3x3 shape of an SD1.5-size UNet and VAE decoder (stride 1) for the
given image sizes: oneDNN's direct convolution with its weight blocked for that input (what the fast layout runs,
nodes/fastpaths.py) against Winograd's form, best of 5, with each one's rms error against float64 relative to the
output's rms, and the bytes the transformed kernel adds. The second loads the SD1.5-size single file as the product
does (``checkpoint.load``, float32, mapped where guarded) and runs whole UNet steps, in processes of their own, the
forms interleaved over ``--rounds``, medians: direct only, then Winograd's form for its 3x3 stride-1 convolutions of
``--min-channels`` to each ``--max-channels`` input and output channels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attention import best_seconds  # noqa: E402 - after the path

_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_AT = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))


def transformed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel [out, in, 3, 3] as the 16 matrices G g G^T, [16, in, out] in its dtype: the transpose of a
    contiguous [16, out, in], made by one product with the kernel's own memory (each matrix a sum of at most nine
    taps, halved or quartered), which ``bmm`` reads as it is. Products in float64 and a copy of their layout made
    fresh memory for every kernel: 3.75 s for the SD1.5 UNet's first step, against 0.7 s."""
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


def conv_shapes(size: int) -> list[tuple[str, int, int, int]]:
    """(where, map side, in, out) of the SD1.5 UNet's and VAE decoder's 3x3 stride-1 convolutions at ``size``."""
    side = size // 8
    unet = [(f"UNet L{i}", side >> i, c, c) for i, c in enumerate((320, 640, 1280, 1280))]
    vae = [(f"VAE {side << i}", side << i, c, c) for i, c in enumerate((512, 512, 256, 128))]
    return unet + vae


def shape_table(sizes: list[int], dtype: torch.dtype) -> None:
    print("| size | conv | map | channels | direct ms | Winograd ms | speed-up | err direct | err Winograd "
          "| kernel MB added |")
    print("| --- " * 10 + "|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for size in sizes:
            for where, side, cin, cout in conv_shapes(size):
                conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
                x = torch.randn(1, cin, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
                weight, bias = conv.weight.detach(), conv.bias.detach()
                blocked = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1,
                                                                      list(x.shape))
                u = transformed_kernel(weight)

                def direct():
                    return torch.ops.mkldnn._convolution_pointwise(x, blocked, bias, [1, 1], [1, 1], [1, 1], 1,
                                                                   "none", [], "")

                def winograd():
                    return conv3x3(x, u, bias)

                exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)

                def err(fn):
                    return ((fn().double() - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()

                d, wg = best_seconds(direct) * 1e3, best_seconds(winograd) * 1e3
                added = (u.numel() - weight.numel()) * weight.element_size() / 1e6
                print(f"| {size} | {where} | {side}x{side} | {cin} | {d:.1f} | {wg:.1f} | {d / wg:.2f} | "
                      f"{err(direct):.1e} | {err(winograd):.1e} | {added:.1f} |", flush=True)


def unet_step(size: int, dtype_name: str, min_channels: int, max_channels: int, steps: int) -> dict:
    """In this process: the SD1.5-size single file loaded as the product loads it, ``steps`` timed UNet steps at
    ``size`` after a warm-up, Winograd's form for its 3x3 convolutions of ``min_channels`` to ``max_channels``
    channels (0: none)."""
    from benchmarks.load_memory import product_checkpoint
    from nodes import fastpaths

    unet = product_checkpoint(dtype_name).unet
    dtype = getattr(torch, dtype_name)
    plain = fastpaths.PackedConv2d.forward
    chosen = [conv for conv in unet.modules() if type(conv) is fastpaths.PackedConv2d
              and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
              and min_channels <= min(conv.in_channels, conv.out_channels)
              and max(conv.in_channels, conv.out_channels) <= max_channels]
    added = sum(conv.weight.numel() * 7 // 9 * conv.weight.element_size() for conv in chosen)

    def forward(self, x):
        if self not in chosen_set:
            return plain(self, x)
        u = getattr(self, "_bench_transformed", None)
        if u is None:
            weight = self.weight.to_dense() if self.weight.layout != torch.strided else self.weight
            u = self._bench_transformed = transformed_kernel(weight.detach().contiguous())
        return conv3x3(x, u, self.bias)

    chosen_set = set(chosen)
    fastpaths.PackedConv2d.forward = forward
    latent = torch.randn(1, 4, size // 8, size // 8).to(dtype).contiguous(memory_format=torch.channels_last)
    context = torch.randn(1, 77, 768).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(steps + 1):
            t = time.perf_counter()
            unet(latent, 500, encoder_hidden_states=context).sample
            if i:
                times.append(time.perf_counter() - t)
    return {"step": statistics.median(times), "added_mb": added / 1e6, "convs": len(chosen)}


def unet_table(sizes: list[int], dtype_name: str, rounds: int, min_channels: int, max_channels: list[int],
               steps: int) -> None:
    forms = [0, *max_channels]
    results: dict[tuple[int, int], list[dict]] = {}
    for _ in range(rounds):
        for size in sizes:
            for form in forms:
                out = subprocess.run([sys.executable, __file__, "--child", str(size), str(min_channels), str(form),
                                      "--dtype", dtype_name, "--steps", str(steps)], capture_output=True, text=True,
                                     check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                results.setdefault((size, form), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n| size | convolutions | UNet step s ({dtype_name}) | x direct | kernels | kernel MB added |")
    print("| --- " * 6 + "|")
    for size in sizes:
        base = statistics.median(r["step"] for r in results[size, 0])
        for form in forms:
            rs = results[size, form]
            step = statistics.median(r["step"] for r in rs)
            label = "direct (oneDNN, blocked)" if not form else f"Winograd, {min_channels} to {form} channels"
            print(f"| {size} | {label} | {step:.3f} | {step / base:.2f} | {rs[0]['convs']} | {rs[0]['added_mb']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed UNet steps per process")
    ap.add_argument("--min-channels", type=int, default=256)
    ap.add_argument("--max-channels", type=int, nargs="+", default=[640, 1280])
    ap.add_argument("--no-unet", action="store_true", help="the per-shape table only")
    ap.add_argument("--no-shapes", action="store_true", help="the UNet steps only")
    ap.add_argument("--child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        size, low, high = args.child
        print(json.dumps(unet_step(size, args.dtype, low, high, args.steps)))
        return
    if not args.no_shapes:
        shape_table(args.sizes, getattr(torch, args.dtype))
    if not args.no_unet:
        unet_table(args.sizes, args.dtype, args.rounds, args.min_channels, args.max_channels, args.steps)


if __name__ == "__main__":
    main()
