"""What switching image sizes costs a loaded UNet: blocked kernels repacked for each new size.

    python benchmarks/size_switch.py                                    # float32, sizes 512 640 512 640 256 512
    python benchmarks/size_switch.py --sizes 512 768 512 --rounds 3 --dtype bfloat16
    python benchmarks/size_switch.py --no-map-weights --sizes 512 640   # a copied load packs at once, for 16x16

oneDNN wants a convolution's weight in a blocked layout that can depend on the input's size, so the fast layout's
kernels (``nodes/fastpaths.py``) are packed for the size they first see and checked again when it changes. Two forms,
each in processes of its own, interleaved over ``--rounds``, medians: ``learnt`` (the product: of the kernels of one
shape, the first repacked between two sizes shows whether the layout changed, the rest follow) and ``repack all``
(what it did before: every kernel repacked at every change). The SD1.5-size single file is loaded as the product
loads it; for each size of ``--sizes`` in turn the table gives the first UNet step (repacks included), how many
kernels were repacked and in how many seconds, and a second step at that size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMS = ("learnt", "repack all")


def child(form: str, sizes: list[int], dtype_name: str, map_weights: bool | None) -> list[dict]:
    import torch

    from benchmarks.load_memory import product_checkpoint
    from nodes import fastpaths

    if form == "repack all":
        fastpaths._fingerprint = lambda weight: None  # nothing learnt: every change repacks every kernel
    unet = product_checkpoint(dtype_name, map_weights=map_weights).unet
    pack = fastpaths.PackedConv2d._pack
    spent = {"n": 0, "s": 0.0}

    def timed(self, input_shape=None):
        start = time.perf_counter()
        try:
            return pack(self, input_shape)
        finally:
            spent["n"] += 1
            spent["s"] += time.perf_counter() - start

    fastpaths.PackedConv2d._pack = timed
    dtype = getattr(torch, dtype_name)
    context = torch.randn(1, 77, 768).to(dtype)
    rows = []
    with torch.inference_mode():
        for size in sizes:
            latent = torch.randn(1, 4, size // 8, size // 8).to(dtype).contiguous(memory_format=torch.channels_last)
            spent.update(n=0, s=0.0)
            times = []
            for _ in range(2):
                start = time.perf_counter()
                unet(latent, 500, encoder_hidden_states=context)
                times.append(time.perf_counter() - start)
            rows.append({"size": size, "first": times[0], "repacks": spent["n"], "repack_s": spent["s"],
                         "second": times[1]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 640, 512, 640, 256, 512])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--map-weights", action=argparse.BooleanOptionalAction, default=None,
                    help="as the CLI option (default: mapped where guarded; a copied load packs its kernels at once)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.sizes, args.dtype, args.map_weights)))
        return
    runs: dict[str, list[list[dict]]] = {form: [] for form in FORMS}
    for _ in range(args.rounds):
        for form in FORMS:
            mapping = [] if args.map_weights is None else [f"--{'' if args.map_weights else 'no-'}map-weights"]
            out = subprocess.run([sys.executable, __file__, "--child", form, "--dtype", args.dtype, *mapping,
                                  "--sizes", *map(str, args.sizes)], check=True, capture_output=True, text=True).stdout
            runs[form].append(json.loads(out.strip().splitlines()[-1]))
    loaded = {None: "mapped where guarded", True: "mapped", False: "copied"}[args.map_weights]
    print(f"SD1.5-size UNet, {args.dtype}, {loaded}, {args.rounds} rounds, medians\n")
    print("| # | size | form | first step s | kernels repacked | repacking s | second step s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, size in enumerate(args.sizes):
        for form in FORMS:
            def median(field):
                return statistics.median(run[i][field] for run in runs[form])
            print(f"| {i + 1} | {size} | {form} | {median('first'):.2f} | {median('repacks'):.0f} | "
                  f"{median('repack_s'):.2f} | {median('second'):.2f} |")


if __name__ == "__main__":
    main()
