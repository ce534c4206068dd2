"""Load time and peak memory of a full-size SD1.5 ControlNet: diffusers' ``ControlNetModel.from_pretrained`` of its
folder against ``LoadControlNet``'s loader of the same weights as one original-layout file.

    python benchmarks/controlnet_memory.py                 # builds the ControlNet once under ~/.cache/nodegraph-bench
    python benchmarks/controlnet_memory.py --dtypes float32 --rounds 3

A random-weight ControlNet of diffusers' default (SD1.5) configuration, 361M parameters, saved once as a diffusers
folder and as an original-layout ``.safetensors`` file. Each load runs in a fresh process after the files were
read once (page cache warm); every weight is then read once (as a first run would: mapped pages become resident
then), and the table gives medians over ``--rounds`` interleaved rounds of the load time, that read, the peak RSS
above the interpreter (with torch and diffusers imported) and that over the bytes of the loaded weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_memory import peak_rss, rss_now, warm  # noqa: E402 - after the path above

ENGINES = {
    "diffusers from_pretrained (folder)": "diffusers",
    "nodegraph (single file, default: mapped where guarded)": None,
    "nodegraph (single file, --no-map-weights)": False,
}


def build(cache: Path) -> tuple[Path, Path]:
    folder, single = cache / "controlnet-sd15-random", cache / "controlnet-sd15-random.safetensors"
    if not (folder / "config.json").is_file():
        import torch
        from diffusers import ControlNetModel

        torch.manual_seed(0)
        ControlNetModel().save_pretrained(folder)  # diffusers' defaults are SD1.5's
    if not single.is_file():
        from nodes.testing.tiny_adapters import write_controlnet_single_file

        write_controlnet_single_file(folder, single)
    return folder, single


def child(engine: str, path: Path, dtype_name: str) -> dict:
    import torch
    from diffusers import ControlNetModel  # noqa: F401 - imports are not part of a load

    import nodegraph as ng
    from nodes.control import load_controlnet

    dtype = getattr(torch, dtype_name)
    base = rss_now()
    start = time.perf_counter()
    if ENGINES[engine] == "diffusers":
        model = ControlNetModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    else:
        settings = ng.Settings(models_dir=Path(tempfile.mkdtemp()), device="cpu", dtype=dtype_name,
                               map_weights=ENGINES[engine])
        model = load_controlnet(path, settings)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    tensors = [*model.parameters(), *model.buffers()]  # not state_dict(): it would unpack blocked kernels
    with torch.no_grad():
        for t in tensors:
            if t.layout == torch.strided:  # blocked (packed) kernels are in memory of their own already
                t.float().sum()
    touch = time.perf_counter() - start
    weights = sum(t.nbytes for t in tensors)
    return {"seconds": seconds, "touch": touch, "peak": peak_rss() - base, "weights": weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nodegraph-bench")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, path, dtype = args.child
        print(json.dumps(child(engine, Path(path), dtype)))
        return
    folder, single = build(args.cache.expanduser())
    warm(folder)
    warm(single)
    print("| engine | dtype | load s | +read s | peak over base GB | weights GB | peak / weights |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in args.dtypes:
        samples: dict[str, list[dict]] = {label: [] for label in ENGINES}
        for _ in range(args.rounds):
            for label, how in ENGINES.items():
                path = folder if how == "diffusers" else single
                out = subprocess.run([sys.executable, __file__, "--child", label, str(path), dtype], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout
                samples[label].append(json.loads(out.strip().splitlines()[-1]))
        for label, runs in samples.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"| {label} | {dtype} | {med['seconds']:.2f} | {med['touch']:.2f} | {med['peak'] / 1e9:.2f} | "
                  f"{med['weights'] / 1e9:.2f} | {med['peak'] / med['weights']:.2f} |")


if __name__ == "__main__":
    main()
