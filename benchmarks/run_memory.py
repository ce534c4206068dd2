"""Peak memory of one process that loads the SD1.5-size single file and draws images, node by node.

    python benchmarks/run_memory.py                                   # bfloat16 where the CPU computes it, 512 px
    python benchmarks/run_memory.py --folder                          # the same weights as a diffusers folder
    python benchmarks/run_memory.py --dtype float32 --images 2 --steps 4 --no-map-weights  # copied

The job of ``benchmarks/speed.py`` (a prompt, ``--steps`` LCM steps, batch 1, no guidance, decode) in one process
through the executor, as ``nodegraph run`` or a server runs it: LoadCheckpoint of the random-weight single file that
``benchmarks/load_memory.py`` builds (or, with ``--folder``, the diffusers folder of the same weights), then per
image CLIPEncode, LCMSampler and VAEDecode run one at a time. For each node the table gives its seconds and the
process's RSS at its start, its peak (Linux's ``VmHWM``, reset before the node through ``/proc/self/clear_refs``)
and its end, each above the RSS before the load (the interpreter with torch, diffusers and transformers imported)
less the weights; and the peak above that base over the weights: the ratio issue #14's memory target puts at 1.15.
Linux only (it reads and resets ``/proc/self``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_memory import _status_bytes, build, warm  # noqa: E402 - after the path above


def _status(field: str) -> int:
    value = _status_bytes(field)
    if value is None:
        raise SystemExit("this benchmark reads /proc/self/status (Linux only)")
    return value


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from the current RSS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nodegraph-bench")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the node library's for the CPU")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--map-weights", action=argparse.BooleanOptionalAction, default=None,
                    help="as the CLI option; default: nodegraph's (a float32 file in float32 mapped where guarded)")
    ap.add_argument("--folder", action="store_true", help="load the diffusers folder instead of the single file")
    args = ap.parse_args()

    import torch  # noqa: F401 - imports are part of the base, not of the load
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import single_file_utils  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    import nodegraph as ng
    import nodes.checkpoint  # noqa: F401

    # the checkpoint the run loads, by name, from the checkpoints folder both lie in
    ckpt = build(args.cache.expanduser())[0 if args.folder else 1]
    warm(ckpt)
    models = Path(tempfile.mkdtemp())
    (models / "checkpoints").symlink_to(ckpt.parent, target_is_directory=True)
    settings = ng.Settings(models_dir=models, output_dir=tempfile.mkdtemp(), dtype=args.dtype,
                           map_weights=args.map_weights)
    executor = ng.Executor(ng.build_registry(), settings=settings)

    def workflow(seed: int) -> ng.Workflow:
        wf = ng.Workflow()
        wf.add("ckpt", "LoadCheckpoint", ckpt=ckpt.name)
        wf.add("pos", "CLIPEncode", clip=ng.Link("ckpt", "clip"), text=f"a red circle on a blue background {seed}")
        wf.add("sched", "LCMScheduler", model=ng.Link("ckpt", "model"), steps=args.steps)
        wf.add("empty", "EmptyLatent", width=args.size, height=args.size, batch=1, vae=ng.Link("ckpt", "vae"))
        wf.add("sample", "LCMSampler", model=ng.Link("ckpt", "model"), positive=ng.Link("pos", "conditioning"),
               latent=ng.Link("empty", "latent"), schedule=ng.Link("sched", "schedule"), seed=seed, guidance=1.0)
        wf.add("decode", "VAEDecode", vae=ng.Link("ckpt", "vae"), latent=ng.Link("sample", "latent"))
        return wf

    mb = 1e6
    base = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    loaded = executor.run(workflow(0), outputs=["ckpt"])
    seconds = time.perf_counter() - start
    held = [loaded.output("ckpt", "model").unet, loaded.output("ckpt", "vae").vae,
            loaded.output("ckpt", "clip").text_encoder]
    weights = sum(t.nbytes for m in held for t in (*m.parameters(), *m.buffers()))
    del held, loaded
    print(f"{ckpt.name}, {settings.dtype or 'default dtype'}, {args.size} px, {args.steps} steps"
          f", map_weights={settings.map_weights}: weights {weights / 1e9:.2f} GB, base {base / 1e9:.2f} GB\n")
    print("| image | node | s | start MB | peak MB | end MB | (peak - base) / weights |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    peak_hwm = _status("VmHWM")
    print(f"| - | LoadCheckpoint | {seconds:.1f} | | {(peak_hwm - base - weights) / mb:.0f} | "
          f"{(_status('VmRSS') - base - weights) / mb:.0f} | {(peak_hwm - base) / weights:.3f} |")
    worst = peak_hwm
    for image in range(args.images):
        wf = workflow(image + 1)
        for node, label in (("pos", "CLIPEncode"), ("sample", "LCMSampler"), ("decode", "VAEDecode")):
            before = _status("VmRSS")
            _reset_peak()
            start = time.perf_counter()
            executor.run(wf, outputs=[node])
            seconds = time.perf_counter() - start
            peak = _status("VmHWM")
            worst = max(worst, peak)
            print(f"| {image + 1} | {label} | {seconds:.1f} | {(before - base - weights) / mb:.0f} | "
                  f"{(peak - base - weights) / mb:.0f} | {(_status('VmRSS') - base - weights) / mb:.0f} | "
                  f"{(peak - base) / weights:.3f} |", flush=True)
    print(f"\npeak over the whole run: {(worst - base) / weights:.3f} of the weights above the base")


if __name__ == "__main__":
    main()
