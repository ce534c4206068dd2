"""Winograd F(2x2, 3x3) convolutions (nodes/winograd.py) against oneDNN's direct ones, on this CPU.

    python benchmarks/winograd.py                      # per-shape table at 256 and 512, then whole UNet steps
    python benchmarks/winograd.py --sizes 512 --rounds 3 --max-channels 640 1280

The first table times one convolution at each 3x3 shape of an SD1.5-size UNet and VAE decoder (stride 1) for the
given image sizes: oneDNN's direct convolution with its weight blocked for that input (what the fast layout runs
otherwise, nodes/fastpaths.py) against Winograd's form, best of 5, with each one's rms error against float64
relative to the output's rms, and the bytes the transformed kernel adds. The second runs whole UNet steps (random
SD1.5-size weights, the fast layout) in processes of their own, the forms interleaved over ``--rounds``, medians,
with the process's RSS after them: direct only, then Winograd's form for the 3x3 stride-1 convolutions of at most
each ``--max-channels`` input and output channels (640: what the fast layout does for a mapped float32 file; 1280:
every one), their transformed kernels replacing the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes.winograd import conv3x3, transformed_kernel  # noqa: E402 - after the path


def conv_shapes(size: int) -> list[tuple[str, int, int, int]]:
    """(where, map side, in, out) of the SD1.5 UNet's and VAE decoder's 3x3 stride-1 convolutions at ``size``."""
    side = size // 8
    unet = [(f"UNet L{i}", side >> i, c, c) for i, c in enumerate((320, 640, 1280, 1280))]
    vae = [(f"VAE {side << i}", side << i, c, c) for i, c in enumerate((512, 512, 256, 128))]
    return unet + vae


def best_ms(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


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

                d, wg = best_ms(direct), best_ms(winograd)
                added = (u.numel() - weight.numel()) * weight.element_size() / 1e6
                print(f"| {size} | {where} | {side}x{side} | {cin} | {d:.1f} | {wg:.1f} | {d / wg:.2f} | "
                      f"{err(direct):.1e} | {err(winograd):.1e} | {added:.1f} |", flush=True)


def unet_step(size: int, dtype_name: str, max_channels: int, steps: int) -> dict:
    """In this process: one SD1.5-size UNet (random weights, the fast layout), ``steps`` timed steps at ``size``
    after a warm-up, Winograd for 3x3 convolutions of at most ``max_channels`` (0: none)."""
    from diffusers import UNet2DConditionModel

    from benchmarks.load_memory import rss_now
    from nodes import fastpaths

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval()
    if dtype != torch.float32:
        unet.to(dtype)
    fastpaths.apply(unet, attention=True)
    fastpaths.pack(unet, now=True)
    fastpaths.to_channels_last(unet)
    added = 0
    plain = fastpaths.PackedConv2d.forward
    if max_channels:
        for conv in unet.modules():
            if (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                    and conv.padding == (1, 1) and max(conv.in_channels, conv.out_channels) <= max_channels):
                weight = conv.weight.to_dense() if conv.weight.layout != torch.strided else conv.weight
                conv._bench_transformed = transformed_kernel(weight.detach())
                # the transformed kernel replaces the blocked one (the plain forward is then never reached)
                added += conv._bench_transformed.nbytes - weight.nbytes

        def forward(self, x):
            u = getattr(self, "_bench_transformed", None)
            if u is not None and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0:
                return conv3x3(x, u, self.bias)
            return plain(self, x)

        fastpaths.PackedConv2d.forward = forward
        for conv in unet.modules():
            if getattr(conv, "_bench_transformed", None) is not None:
                conv.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    latent = torch.randn(1, 4, size // 8, size // 8).to(dtype).contiguous(memory_format=torch.channels_last)
    context = torch.randn(1, 77, 768).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(steps + 1):
            t = time.perf_counter()
            unet(latent, 500, encoder_hidden_states=context).sample
            if i:
                times.append(time.perf_counter() - t)
    return {"step": statistics.median(times), "rss_gb": rss_now() / 1e9, "added_mb": added / 1e6}


def unet_table(sizes: list[int], dtype_name: str, rounds: int, max_channels: list[int], steps: int) -> None:
    forms = [0, *max_channels]
    results: dict[tuple[int, int], list[dict]] = {}
    for _ in range(rounds):
        for size in sizes:
            for form in forms:
                out = subprocess.run([sys.executable, __file__, "--child", str(size), str(form), "--dtype",
                                      dtype_name, "--steps", str(steps)], capture_output=True, text=True, check=True)
                results.setdefault((size, form), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n| size | convolutions | UNet step s ({dtype_name}) | x direct | RSS GB after | kernels MB added |")
    print("| --- " * 6 + "|")
    for size in sizes:
        base = statistics.median(r["step"] for r in results[size, 0])
        for form in forms:
            rs = results[size, form]
            step = statistics.median(r["step"] for r in rs)
            label = "direct (oneDNN, blocked)" if not form else (
                "Winograd, all 3x3" if form >= 1280 else f"Winograd up to {form} channels")
            print(f"| {size} | {label} | {step:.3f} | {step / base:.2f} | "
                  f"{statistics.median(r['rss_gb'] for r in rs):.2f} | {rs[0]['added_mb']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed UNet steps per process")
    ap.add_argument("--max-channels", type=int, nargs="+", default=[640, 1280])
    ap.add_argument("--no-unet", action="store_true", help="the per-shape table only")
    ap.add_argument("--no-shapes", action="store_true", help="the UNet steps only")
    ap.add_argument("--child", type=int, nargs=2, metavar=("SIZE", "MAX_CHANNELS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(unet_step(args.child[0], args.dtype, args.child[1], args.steps)))
        return
    if not args.no_shapes:
        shape_table(args.sizes, getattr(torch, args.dtype))
    if not args.no_unet:
        unet_table(args.sizes, args.dtype, args.rounds, args.max_channels, args.steps)


if __name__ == "__main__":
    main()
