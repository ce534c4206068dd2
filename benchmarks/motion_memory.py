"""Time and peak memory of giving an SD1.5-size UNet an AnimateDiff motion module (``ApplyMotionModule``), against
diffusers' ``UNetMotionModel.from_unet2d`` of the same models.

    python benchmarks/motion_memory.py                     # float32 and bfloat16, 2 rounds
    python benchmarks/motion_memory.py --dtypes float32 --rounds 3

The checkpoint is ``benchmarks/load_memory.py``'s random SD1.5-size one (UNet 860M parameters); the motion module a
random ``MotionAdapter`` of diffusers' default configuration (the v1-5-2 layout, 453M parameters) as a diffusers
folder, built once under ``~/.cache/nodegraph-bench``. Each engine runs in a fresh process: it loads both (not
measured: diffusers with ``from_pretrained``, nodegraph with ``LoadCheckpoint`` and ``LoadMotionModule``), reads
every weight once, then the process's peak RSS is reset (``/proc/self/clear_refs``) and the motion UNet is built.
The table gives medians of that build's time and its peak RSS above the RSS before it, over the bytes of the UNet
and the motion module's weights.
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

from load_memory import build as build_sd15, peak_rss, random_folder, rss_now, warm  # noqa: E402 - after the path

ENGINES = ("diffusers from_unet2d", "nodegraph ApplyMotionModule")


def build(cache: Path) -> tuple[Path, Path, Path]:
    return *build_sd15(cache), random_folder(cache, "motion-adapter-random", "MotionAdapter")


def _read_all(*modules) -> int:
    import torch

    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    with torch.no_grad():
        for t in tensors:
            if t.layout == torch.strided:  # blocked kernels are in memory of their own already
                t.float().sum()
    return sum(t.nbytes for t in tensors)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts afresh from the RSS now


def child(engine: str, folder: Path, single: Path, motion: Path, dtype_name: str) -> dict:
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    if engine == ENGINES[0]:
        dtype = getattr(torch, dtype_name)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        adapter = MotionAdapter.from_pretrained(motion, torch_dtype=dtype)
        weights = _read_all(unet, adapter)
        _reset_peak()
        base, start = rss_now(), time.perf_counter()
        with torch.no_grad():
            animated = UNetMotionModel.from_unet2d(unet, adapter)
    else:
        import nodegraph as ng

        models = Path(tempfile.mkdtemp())
        (models / "checkpoints").symlink_to(single.parent, target_is_directory=True)
        (models / "animatediff_models").symlink_to(motion.parent, target_is_directory=True)
        settings = ng.Settings(models_dir=models, device="cpu", dtype=dtype_name)
        executor = ng.Executor(ng.build_registry(), settings=settings)
        wf = ng.Workflow()
        wf.add("ckpt", "LoadCheckpoint", ckpt=single.name)
        wf.add("mm", "LoadMotionModule", motion_module=motion.name)
        wf.add("anim", "ApplyMotionModule", model=ng.Link("ckpt", "model"),
               motion_module=ng.Link("mm", "motion_module"))
        loaded = executor.run(wf, outputs=["ckpt", "mm"])
        weights = _read_all(loaded.output("ckpt", "model").unet, loaded.output("mm", "motion_module").adapter)
        _reset_peak()
        base, start = rss_now(), time.perf_counter()
        result = executor.run(wf, outputs=["anim"])
        assert result.status == "success", result.errors
        animated = result.output("anim", "model").unet
    seconds = time.perf_counter() - start
    assert animated is not None
    return {"seconds": seconds, "peak": peak_rss() - base, "weights": weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nodegraph-bench")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, folder, single, motion, dtype = args.child
        print(json.dumps(child(engine, Path(folder), Path(single), Path(motion), dtype)))
        return
    folder, single, motion = build(args.cache.expanduser())
    for path in (folder, single, motion):
        warm(path)
    print("| engine | dtype | build s | peak over base GB | weights GB | peak / weights |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in args.dtypes:
        samples: dict[str, list[dict]] = {label: [] for label in ENGINES}
        for _ in range(args.rounds):
            for label in ENGINES:
                out = subprocess.run([sys.executable, __file__, "--child", label, str(folder), str(single),
                                      str(motion), dtype], cwd=ROOT, capture_output=True, text=True, check=True)
                samples[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for label, runs in samples.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"| {label} | {dtype} | {med['seconds']:.2f} | {med['peak'] / 1e9:.2f} | "
                  f"{med['weights'] / 1e9:.2f} | {med['peak'] / med['weights']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
