"""A 4-step LCM generation through the graph and through diffusers' own pipeline, same weights and settings.

    python benchmarks/lcm_latency.py                      # a tiny random LCM built on the fly
    python benchmarks/lcm_latency.py --ckpt PATH --size 512 --rounds 3

Each side runs in its own process (so peak memory is its own), alternating sides round by round so that machine
noise hits both alike. Times are medians over the rounds, split into encode (text encoder), denoise (UNet loop)
and decode (VAE); model loading is excluded on both sides. PATH is a diffusers folder with an LCM-distilled UNet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background", "a blue circle on a red background"]


def run_graph(ckpt: Path, size: int, runs: int) -> list[dict]:
    import nodegraph as ng

    # a models folder whose checkpoints/ is the folder holding the checkpoint (file routes refuse links out)
    root = Path(tempfile.mkdtemp())
    (root / "checkpoints").symlink_to(ckpt.resolve().parent, target_is_directory=True)
    settings = ng.Settings(models_dir=root, dtype="float32", output_dir=tempfile.mkdtemp())
    executor = ng.Executor(ng.build_registry(), settings=settings)
    name = ckpt.name
    out = []
    for i in range(runs + 1):  # the first run loads the checkpoint and warms up
        wf = ng.Workflow()
        wf.add("ckpt", "LoadCheckpoint", ckpt=name)
        wf.add("pos", "CLIPEncode", clip=ng.Link("ckpt", "clip"), text=PROMPTS[i % len(PROMPTS)] + f" {i}")
        wf.add("sched", "LCMScheduler", model=ng.Link("ckpt", "model"), steps=4)
        wf.add("empty", "EmptyLatent", width=size, height=size, vae=ng.Link("ckpt", "vae"))
        wf.add("sample", "LCMSampler", model=ng.Link("ckpt", "model"), positive=ng.Link("pos", "conditioning"),
               latent=ng.Link("empty", "latent"), schedule=ng.Link("sched", "schedule"), seed=i, guidance=8.0)
        wf.add("decode", "VAEDecode", vae=ng.Link("ckpt", "vae"), latent=ng.Link("sample", "latent"))
        t0 = time.perf_counter()
        result = executor.run(wf, outputs=["decode"])
        total = time.perf_counter() - t0
        if i:
            d = {nid: r.duration for nid, r in result.nodes.items()}
            out.append({"encode": d["pos"], "denoise": d["sample"], "decode": d["decode"], "total": total})
    return out


def run_pipeline(ckpt: Path, size: int, runs: int) -> list[dict]:
    import torch
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(ckpt, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    spent = {"encode": 0.0, "decode": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper

    pipe.encode_prompt = timed(pipe.encode_prompt, "encode")
    pipe.vae.decode = timed(pipe.vae.decode, "decode")
    out = []
    for i in range(runs + 1):
        spent.update(encode=0.0, decode=0.0)
        t0 = time.perf_counter()
        pipe(PROMPTS[i % len(PROMPTS)] + f" {i}", num_inference_steps=4, guidance_scale=8.0, height=size,
             width=size, generator=torch.Generator("cpu").manual_seed(i), output_type="np")
        total = time.perf_counter() - t0
        if i:
            out.append({"encode": spent["encode"], "decode": spent["decode"],
                        "denoise": total - spent["encode"] - spent["decode"], "total": total})
    return out


def child(side: str, ckpt: Path, size: int, runs: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    times = (run_graph if side == "graph" else run_pipeline)(ckpt, size, runs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a diffusers LCM folder (default: a tiny random one)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--runs", type=int, default=5, help="timed generations per round")
    parser.add_argument("--child", choices=["graph", "pipeline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ckpt is None:
        from nodes.testing.tiny import build_tiny_sd

        args.ckpt = build_tiny_sd(Path(tempfile.mkdtemp()) / "checkpoints" / "tiny-lcm", lcm=True)
    if args.child:
        child(args.child, args.ckpt, args.size, args.runs)
        return
    results: dict[str, dict] = {"graph": {"times": [], "rss": []}, "pipeline": {"times": [], "rss": []}}
    for _ in range(args.rounds):
        for side in ("graph", "pipeline"):
            proc = subprocess.run([sys.executable, __file__, "--child", side, "--ckpt", str(args.ckpt),
                                   "--size", str(args.size), "--runs", str(args.runs)],
                                  capture_output=True, text=True, check=True)
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side]["times"] += doc["times"]
            results[side]["rss"].append(doc["peak_rss_mb"])
    print(f"4-step LCM, {args.size}x{args.size}, {args.ckpt.name}, {args.rounds} rounds x {args.runs} runs "
          f"(median seconds)")
    print(f"{'side':10s} {'encode':>9s} {'denoise':>9s} {'decode':>9s} {'total':>9s} {'peak RSS MB':>12s}")
    medians = {}
    for side, data in results.items():
        med = {k: statistics.median(t[k] for t in data["times"]) for k in ("encode", "denoise", "decode", "total")}
        medians[side] = med
        print(f"{side:10s} {med['encode']:9.4f} {med['denoise']:9.4f} {med['decode']:9.4f} {med['total']:9.4f} "
              f"{max(data['rss']):12.0f}")
    ratio = medians["graph"]["total"] / medians["pipeline"]["total"]
    print(f"graph / pipeline total time: {ratio:.3f}")


if __name__ == "__main__":
    main()
