"""Attention kernels on this CPU at the shapes of an SD1.5 UNet and VAE: which one they should run, per shape.

    python benchmarks/attention.py                 # 256 and 512, float32 and bfloat16
    python benchmarks/attention.py --sizes 768 --dtypes bfloat16
    python benchmarks/attention.py --family sdxl --sizes 1024 --dtypes bfloat16   # or sd2: heads of 64 channels

For each attention at an image size (the UNet's self-attention over the latent cells of each level: SD1.5's 8 heads
of 40/80/160 channels, or with ``--family`` SD2's or SDXL's heads of 64; its cross-attention to 77 prompt tokens;
the VAE's middle attention, one head of 512 channels over the latent cells), the best of 5 runs of:

* ``sdpa``     torch's scaled_dot_product_attention (what diffusers' AttnProcessor2_0 runs; on the CPU a fused,
               blocked kernel);
* ``math``     the textbook form: scores = q k^T (one matrix product per head), softmax, then times v;
* ``sliced``   the math form over slices of 1,024 queries (diffusers' sliced attention: bounded memory);
* ``math f32 softmax``  the math form in bfloat16 with the softmax computed in float32 (bfloat16 runs only);
* ``banded``   nodes/attention.py: the math form over bands of queries whose scores stay in cache (what the fast
               layout runs in bfloat16 on the CPU).

GFLOP/s count 4 * heads * queries * keys * channels per attention; ``err`` is the rms difference from the
attention of the float32 inputs in float64, relative to its rms (so a bfloat16 row includes what rounding the
inputs costs). The script ends with the choice per shape: the fastest kernel at most twice as far from the
reference as SDPA.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nodes.attention import banded_attention

#: Per family: the UNet levels that attend (the last one: its middle block, at the same cells) as (level, channels,
#: heads). SD1.x: 8 heads at every level; SD2.x and SDXL: heads of 64 channels; SDXL attends from its second level.
FAMILIES = {
    "sd15": ((0, 320, 8), (1, 640, 8), (2, 1280, 8), (3, 1280, 8)),
    "sd2": ((0, 320, 5), (1, 640, 10), (2, 1280, 20), (3, 1280, 20)),
    "sdxl": ((1, 640, 10), (2, 1280, 20)),
}
TOKENS = 77


def shapes(size: int, family: str = "sd15") -> list[tuple[str, int, int, int, int]]:
    """(name, heads, queries, keys, head size) of every attention of ``family`` at ``size``."""
    out = []
    for level, channels, heads in FAMILIES[family]:
        cells = (size // 8 >> level) ** 2
        out.append((f"self L{level}", heads, cells, cells, channels // heads))
        out.append((f"cross L{level}", heads, cells, TOKENS, channels // heads))
    cells = (size // 8) ** 2
    out.append(("VAE middle", 1, cells, cells, 512))
    return out


def math_attention(q, k, v, slice_size: int | None = None, float_softmax: bool = False):
    scale = q.shape[-1] ** -0.5
    if slice_size is None:
        slice_size = q.shape[-2]
    out = torch.empty_like(q)
    for start in range(0, q.shape[-2], slice_size):
        scores = torch.matmul(q[..., start:start + slice_size, :] * scale, k.transpose(-1, -2))
        weights = scores.float().softmax(-1).to(q.dtype) if float_softmax else scores.softmax(-1)
        out[..., start:start + slice_size, :] = torch.matmul(weights, v)
    return out


def best_seconds(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--family", choices=list(FAMILIES), default="sd15", help="whose attention shapes")
    args = ap.parse_args()
    print("| size | dtype | attention | queries x keys x head | kernel | ms | GFLOP/s | err |")
    print("| --- " * 8 + "|")
    choice: dict[tuple, str] = {}
    torch.manual_seed(0)
    with torch.inference_mode():
        for size in args.sizes:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                for name, heads, queries, keys, head in shapes(size, args.family):
                    q32, k32, v32 = (torch.randn(1, heads, n, head) for n in (queries, keys, keys))
                    reference = F.scaled_dot_product_attention(q32.double(), k32.double(), v32.double())
                    q, k, v = (t.to(dtype) for t in (q32, k32, v32))
                    kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                               "math": lambda: math_attention(q, k, v),
                               "sliced": lambda: math_attention(q, k, v, slice_size=1024),
                               "banded": lambda: banded_attention(q, k, v).unflatten(-1, (heads, -1)).transpose(1, 2)}
                    if dtype == torch.bfloat16:
                        kernels["math f32 softmax"] = lambda: math_attention(q, k, v, float_softmax=True)
                    flops = 4 * heads * queries * keys * head
                    timings = {}
                    for kernel, fn in kernels.items():
                        seconds = best_seconds(fn)
                        err = ((fn().double() - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()
                        timings[kernel] = (seconds, err)
                        print(f"| {size} | {dtype_name} | {name} | {queries} x {keys} x {head} | {kernel} | "
                              f"{seconds * 1e3:.2f} | {flops / seconds / 1e9:.0f} | {err:.1e} |", flush=True)
                    # as accurate as SDPA (twice its error at most): rounding differs, precision must not
                    bound = max(2 * timings["sdpa"][1], 1e-6)
                    fastest = min((s, kernel) for kernel, (s, e) in timings.items() if e <= bound)[1]
                    choice[size, dtype_name, name] = fastest
    print()
    for (size, dtype_name, name), kernel in choice.items():
        print(f"{size} {dtype_name} {name}: {kernel}")


if __name__ == "__main__":
    main()
