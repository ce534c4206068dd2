"""Our graph against diffusers' pipeline, side by side: a 4-step LCM image on a full-size SD1.5 architecture.

    python benchmarks/speed.py                          # 256 and 512, every engine below, 3 rounds
    python benchmarks/speed.py --sizes 256 --rounds 2 --engines "diffusers fp32" "nodegraph fp32"
    python benchmarks/speed.py --device cuda --sizes 512 768  # on a GPU: fp32 and fp16 engines, peak VRAM

The weights are random (``benchmarks/load_memory.py`` builds them once under ``~/.cache/nodegraph-bench``: UNet
860M, VAE 84M, CLIP-L, a diffusers folder and the same weights as one original-layout ``.safetensors``), plus a
random TAESD-architecture tiny VAE (diffusers' ``AutoencoderTiny`` defaults). Every engine runs the same job: a
prompt, 4 LCM steps, batch 1, no classifier-free guidance, decode to pixels.

Each engine runs in a process of its own, one per round, engines interleaved within a round so that machine drift
hits all alike: it loads (diffusers: ``from_pretrained`` of the folder; nodegraph: ``LoadCheckpoint`` of the single
file, mapped where a lease guards it as by default, or copied: ``--no-map-weights``), then per size one warm-up
image and ``--runs`` timed ones. The table gives medians over rounds and runs: the load, the text encoder, one UNet step, the VAE decode and the whole image, the process's peak RSS (GB = 1e9 bytes)
and that peak less the process's RSS before the load (the interpreter with torch, diffusers and transformers)
over the bytes of the weights it loaded, and the time relative to diffusers in the same precision and to diffusers
in float32. ``--compile`` engines compile the UNet in
their warm-up image of each size (``nodes/compilation.py``; the compile time is not in the table).

``--device cuda`` runs the fp32 and fp16 engines on the GPU (the CPU generator as everywhere, so images are the
same), synchronising before each part's clock is read, and adds each process's peak of allocated GPU memory.

``floor`` rows: the FLOPs of each part (counted by ``torch.utils.flop_counter`` on meta tensors) divided by this
machine's measured rate for each kind of operation (convolutions, matrix products, attention) in that precision: a
lower bound no engine on these kernels reaches, since normalisations and activations are left out. The decode is
counted as our VAEs compute it (upsamplers in phases, ``nodes/fastpaths.py``): diffusers' own decode does 15% more.
"""

from __future__ import annotations

import argparse
import json
import os
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

PROMPT = "a red circle on a blue background"
STEPS = 4
# label -> (engine, dtype, vae, compiled)
ENGINES = {
    "diffusers fp32": ("diffusers", "float32", "full", False),
    "nodegraph fp32": ("nodegraph", "float32", "full", False),  # the default: the file mapped, guarded
    "nodegraph fp32 copied": ("nodegraph copied", "float32", "full", False),  # --no-map-weights
    "diffusers bf16": ("diffusers", "bfloat16", "full", False),
    "nodegraph bf16": ("nodegraph", "bfloat16", "full", False),
    "diffusers bf16 tiny VAE": ("diffusers", "bfloat16", "tiny", False),
    "nodegraph bf16 tiny VAE": ("nodegraph", "bfloat16", "tiny", False),
    "nodegraph bf16 --compile": ("nodegraph", "bfloat16", "full", True),
    "nodegraph bf16 tiny VAE --compile": ("nodegraph", "bfloat16", "tiny", True),
    "diffusers fp16": ("diffusers", "float16", "full", False),
    "nodegraph fp16": ("nodegraph", "float16", "full", False),
    "diffusers fp16 tiny VAE": ("diffusers", "float16", "tiny", False),
    "nodegraph fp16 tiny VAE": ("nodegraph", "float16", "tiny", False),
    "nodegraph fp16 --compile": ("nodegraph", "float16", "full", True),
}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
FAST = {"cpu": "bfloat16", "cuda": "float16"}  # the low precision each device's engines compare in
PARTS = ("encode", "step", "decode", "total")


def build(cache: Path) -> tuple[Path, Path, Path]:
    """The SD1.5-size folder and single file (load_memory.py's), and a random full-size tiny VAE folder."""
    return *build_sd15(cache), random_folder(cache, "taesd-random", "AutoencoderTiny")


# --- one engine in its own process -------------------------------------------------------------------------------


class Timer:
    """Seconds spent in wrapped callables, per part (on a GPU, with the work queued before and in them finished)."""

    def __init__(self, device: str = "cpu"):
        self.spent: dict[str, float] = {}
        self.sync = _synchronizer(device)

    def wrap(self, fn, part: str):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.spent[part] = self.spent.get(part, 0.0) + time.perf_counter() - start
        return timed


def _synchronizer(device: str):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def run_diffusers(folder: Path, taesd: Path, dtype_name: str, vae: str, sizes: list[int], runs: int,
                  batch: int = 1, device: str = "cpu") -> dict:
    import torch
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel  # noqa: F401 - imports are not part of a load

    dtype = getattr(torch, dtype_name)
    base = rss_now()
    start = time.perf_counter()
    # the UNet has no guidance embedding (an LCM-LoRA-style model), so the pipeline is diffusers' LCM-LoRA recipe
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if vae == "tiny":
        pipe.vae = AutoencoderTiny.from_pretrained(taesd, torch_dtype=dtype)
    pipe.to(device)
    _synchronizer(device)()
    load = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    timer = Timer(device)
    pipe.encode_prompt = timer.wrap(pipe.encode_prompt, "encode")
    pipe.unet.forward = timer.wrap(pipe.unet.forward, "unet")
    pipe.vae.decode = timer.wrap(pipe.vae.decode, "decode")

    def image(size: int, seed: int) -> None:
        pipe(f"{PROMPT} {size} {seed}", num_inference_steps=STEPS, guidance_scale=1.0, height=size, width=size,
             output_type="np", generator=torch.Generator("cpu").manual_seed(seed), num_images_per_prompt=batch)

    weights = _weight_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
    return {"load": load, "base_rss": base, "weights": weights, **_measure(image, timer, sizes, runs, device)}


def _weight_bytes(*modules) -> int:
    return sum(t.nbytes for m in modules for t in (*m.parameters(), *m.buffers()))


def run_nodegraph(single: Path, taesd: Path, dtype_name: str, vae: str, sizes: list[int], runs: int,
                  compiled: bool = False, batch: int = 1, device: str = "cpu", map_weights: bool | None = None) -> dict:
    import nodegraph as ng
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel  # noqa: F401 - imports are not
    from diffusers.loaders import single_file_utils  # noqa: F401 - part of a load (as for diffusers above)
    from transformers import CLIPTextModel  # noqa: F401

    import nodes.checkpoint  # noqa: F401

    models = Path(tempfile.mkdtemp())
    # file routes refuse links that lead out of a folder, so the folders themselves are the links
    (models / "checkpoints").symlink_to(single.parent, target_is_directory=True)
    (models / "vae_approx").symlink_to(taesd.parent, target_is_directory=True)
    settings = ng.Settings(models_dir=models, output_dir=tempfile.mkdtemp(), dtype=dtype_name, compile=compiled,
                           device=device, map_weights=map_weights)
    executor = ng.Executor(ng.build_registry(), settings=settings)

    def workflow(size: int, seed: int) -> ng.Workflow:
        wf = ng.Workflow()
        wf.add("ckpt", "LoadCheckpoint", ckpt=single.name)
        decoder = ng.Link("ckpt", "vae")
        if vae == "tiny":
            wf.add("taesd", "LoadTinyVAE", vae=taesd.name)
            decoder = ng.Link("taesd", "vae")
        wf.add("pos", "CLIPEncode", clip=ng.Link("ckpt", "clip"), text=f"{PROMPT} {size} {seed}")
        wf.add("sched", "LCMScheduler", model=ng.Link("ckpt", "model"), steps=STEPS)
        wf.add("empty", "EmptyLatent", width=size, height=size, batch=batch, vae=ng.Link("ckpt", "vae"))
        wf.add("sample", "LCMSampler", model=ng.Link("ckpt", "model"), positive=ng.Link("pos", "conditioning"),
               latent=ng.Link("empty", "latent"), schedule=ng.Link("sched", "schedule"), seed=seed, guidance=1.0)
        wf.add("decode", "VAEDecode", vae=decoder, latent=ng.Link("sample", "latent"))
        return wf

    base = rss_now()
    loaded = executor.run(workflow(8, 0), outputs=["ckpt", *(["taesd"] if vae == "tiny" else [])])
    load = sum(r.duration for r in loaded.nodes.values())
    held = [loaded.output("ckpt", "model").unet, loaded.output("ckpt", "vae").vae,
            loaded.output("ckpt", "clip").text_encoder, *([loaded.output("taesd", "vae").vae] if vae == "tiny" else [])]
    weights = _weight_bytes(*held)
    del held, loaded
    timer = Timer(device)

    def image(size: int, seed: int) -> None:
        result = executor.run(workflow(size, seed), outputs=["decode"])
        d = {nid: r.duration for nid, r in result.nodes.items()}
        timer.spent.update(encode=d["pos"], unet=d["sample"], decode=d["decode"])

    return {"load": load, "base_rss": base, "weights": weights, **_measure(image, timer, sizes, runs, device)}


def _measure(image, timer: Timer, sizes: list[int], runs: int, device: str = "cpu") -> dict:
    out = {}
    for size in sizes:
        samples = []
        for i in range(runs + 1):  # the first image at a size warms the kernels up for its shapes (or compiles)
            timer.spent.clear()
            start = time.perf_counter()
            image(size, i)
            total = time.perf_counter() - start
            if i:
                samples.append({"encode": timer.spent["encode"], "step": timer.spent["unet"] / STEPS,
                                "decode": timer.spent["decode"], "total": total})
            else:
                out[f"first {size}"] = total
        out[str(size)] = samples
    out["peak_rss"] = peak_rss()
    if device.startswith("cuda"):
        import torch

        out["peak_vram"] = torch.cuda.max_memory_allocated()
    return out


# --- floors ------------------------------------------------------------------------------------------------------


def floors(folder: Path, taesd: Path, sizes: list[int], dtypes: list[str], batch: int = 1,
           device: str = "cpu") -> dict:
    """Per precision and size: each part's FLOPs over this machine's rates, in seconds."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from nodes import fastpaths

    def counted(fn) -> dict[str, float]:
        with FlopCounterMode(display=False) as mode:
            fn()
        kinds = {"conv": 0.0, "mm": 0.0, "attention": 0.0}
        for op, flops in mode.get_flop_counts()["Global"].items():
            name = str(op)
            # on meta tensors attention decomposes into batched matrix products
            kind = "conv" if "convolution" in name else "attention" if "bmm" in name else "mm"
            kinds[kind] += flops
        return kinds

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        # the decoder as our VAEs run it in the fast layout: upsamplers in phases (nodes/fastpaths.py), 15% fewer
        # FLOPs than diffusers' decode at any size
        vae = fastpaths.apply(AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
                              upsample=True).eval()
        tiny = AutoencoderTiny.from_config(AutoencoderTiny.load_config(taesd))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        work = {"encode": counted(lambda: text(torch.zeros(1, 77, dtype=torch.long)))}
        for size in sizes:
            z = torch.zeros(batch, 4, size // 8, size // 8)
            work[f"step {size}"] = counted(lambda: unet(z, torch.tensor(1), torch.zeros(batch, 77, 768)))
            work[f"decode {size}"] = counted(lambda: vae.decode(z))
            work[f"tiny decode {size}"] = counted(lambda: tiny.decode(z))
    out = {"gflop": {part: sum(k.values()) / 1e9 for part, k in work.items()}}
    for dtype_name in dtypes:
        rates = _rates(getattr(torch, dtype_name), device)
        out[dtype_name] = {"rates": {k: r / 1e9 for k, r in rates.items()},
                           "seconds": {part: sum(k[kind] / rates[kind] for kind in k) for part, k in work.items()}}
    return out


def _rates(dtype, device: str = "cpu") -> dict[str, float]:
    """FLOP/s of this machine for a large matrix product, a 3x3 convolution and self-attention (the faster of SDPA
    and, in bfloat16 on the CPU, the banded attention the fast layout runs there: nodes/attention.py)."""
    import torch
    import torch.nn.functional as F

    sync = _synchronizer(device)

    def best(fn, flops: float) -> float:
        fn()
        times = []
        for _ in range(5):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return flops / min(times)

    layout = torch.channels_last if device == "cpu" else torch.contiguous_format  # as the engines run them
    a = torch.randn(4096, 1280, dtype=dtype, device=device)
    b = torch.randn(1280, 1280, dtype=dtype, device=device)
    x = torch.randn(1, 320, 64, 64, dtype=dtype, device=device).to(memory_format=layout)
    w = torch.randn(320, 320, 3, 3, dtype=dtype, device=device).to(memory_format=layout)
    q = torch.randn(1, 8, 4096, 40, dtype=dtype, device=device)
    attention_flops = 4 * 8 * 4096 * 4096 * 40
    with torch.no_grad():
        rates = {"mm": best(lambda: a @ b, 2 * 4096 * 1280 * 1280),
                 "conv": best(lambda: F.conv2d(x, w, padding=1), 2 * 320 * 320 * 9 * 64 * 64),
                 "attention": best(lambda: F.scaled_dot_product_attention(q, q, q), attention_flops)}
        if device == "cpu" and dtype == torch.bfloat16:
            from nodes.attention import banded_attention

            rates["attention"] = max(rates["attention"], best(lambda: banded_attention(q, q, q), attention_flops))
    return rates


# --- the table ---------------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, single, taesd = build(args.cache)
    if args.child == "floors":
        print(json.dumps(floors(folder, taesd, args.sizes, ["float32", FAST[args.device]], args.batch,
                                args.device)))
        return
    engine, dtype_name, vae, compiled = ENGINES[args.child]
    if engine == "diffusers":
        doc = run_diffusers(folder, taesd, dtype_name, vae, args.sizes, args.runs, args.batch, args.device)
    else:
        doc = run_nodegraph(single, taesd, dtype_name, vae, args.sizes, args.runs, compiled, args.batch,
                            args.device, map_weights=False if engine == "nodegraph copied" else None)
    print(json.dumps(doc))


def spawn(args: argparse.Namespace, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--cache", str(args.cache), "--runs", str(args.runs),
           "--batch", str(args.batch), "--device", args.device, "--sizes", *map(str, args.sizes)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nodegraph-bench")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--engines", nargs="+", choices=list(ENGINES), metavar="ENGINE",
                    help="default: those in float32 and the device's fast precision (bf16 on the CPU, fp16 on CUDA)")
    ap.add_argument("--device", default="cpu", choices=list(FAST))
    ap.add_argument("--rounds", type=int, default=3, help="processes per engine, engines interleaved")
    ap.add_argument("--runs", type=int, default=1, help="timed images per size in each process, after a warm-up")
    ap.add_argument("--batch", type=int, default=1, help="images per run (one prompt)")
    ap.add_argument("--json", type=Path, help="also write the raw samples here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cache = args.cache.expanduser()
    if args.engines is None:
        args.engines = [label for label, (engine, dtype, _, _) in ENGINES.items()
                        if dtype in ("float32", FAST[args.device])
                        and (args.device == "cpu" or engine != "nodegraph copied")]  # maps only on the CPU
    if args.child:
        child(args)
        return
    for path in build(args.cache):  # loads are timed with the page cache warm, for every engine alike
        warm(path)
    results: dict[str, list[dict]] = {label: [] for label in args.engines}
    for round_ in range(args.rounds):
        for label in args.engines:
            results[label].append(spawn(args, label))
            print(f"round {round_ + 1}/{args.rounds}: {label} done", file=sys.stderr, flush=True)
            if args.json:  # a long run interrupted keeps what it measured
                args.json.write_text(json.dumps({"results": results}, indent=1))
    bound = spawn(args, "floors")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "floors": bound}, indent=1))
    print(table(results, bound, args))


def table(results: dict[str, list[dict]], bound: dict, args: argparse.Namespace) -> str:
    gb = 1e9
    gpu = args.device != "cpu"
    where = _device_name(args.device) if gpu else f"{os.cpu_count()} CPU threads"
    lines = [f"4 LCM steps, batch {args.batch}, no CFG; random SD1.5-size weights; {where}; "
             f"medians of {args.rounds} processes x {args.runs} image(s) after a warm-up",
             "", "| engine | size | load s | first image s | encode s | UNet step s | decode s | total s | peak RSS GB "
             + ("| peak VRAM GB " if gpu else "")
             + "| (peak - base) / weights | x diffusers same dtype | x diffusers fp32 |",
             "| --- " * (13 if gpu else 12) + "|"]
    med: dict[tuple[str, int], dict] = {}
    for label, docs in results.items():
        for size in args.sizes:
            samples = [s for d in docs for s in d[str(size)]]
            med[label, size] = {p: statistics.median(s[p] for s in samples) for p in PARTS}
    for size in args.sizes:
        for label, docs in results.items():
            engine, dtype_name, vae, _ = ENGINES[label]
            m = med[label, size]
            same = f"diffusers {SHORT[dtype_name]}" + (" tiny VAE" if vae == "tiny" else "")
            ratio = lambda ref: f"{m['total'] / med[ref, size]['total']:.2f}" if (ref, size) in med else "-"  # noqa
            first = statistics.median(d[f"first {size}"] for d in docs)
            lines.append(f"| {label} | {size} | {statistics.median(d['load'] for d in docs):.1f} | {first:.1f} | "
                         f"{m['encode']:.3f} | {m['step']:.3f} | {m['decode']:.3f} | {m['total']:.2f} | "
                         f"{max(d['peak_rss'] for d in docs) / gb:.1f} | "
                         + (f"{max(d['peak_vram'] for d in docs) / gb:.1f} | " if gpu else "")
                         + f"{max((d['peak_rss'] - d['base_rss']) / d['weights'] for d in docs):.2f} | "
                         + f"{ratio(same)} | {ratio('diffusers fp32')} |")
        for dtype_name in ("float32", FAST[args.device]):
            short = SHORT[dtype_name]
            s = bound[dtype_name]["seconds"]
            total = s["encode"] + STEPS * s[f"step {size}"] + s[f"decode {size}"]
            tiny = s["encode"] + STEPS * s[f"step {size}"] + s[f"tiny decode {size}"]
            lines.append(f"| floor {short} | {size} | | | {s['encode']:.3f} | {s[f'step {size}']:.3f} | "
                         f"{s[f'decode {size}']:.3f} (tiny {s[f'tiny decode {size}']:.3f}) | "
                         f"{total:.2f} (tiny {tiny:.2f}) | | | | |" + (" |" if gpu else ""))
    g = bound["gflop"]
    lines += ["", "GFLOP: encode {:.0f}; ".format(g["encode"]) + "; ".join(
        f"{size}: UNet step {g[f'step {size}']:.0f}, decode {g[f'decode {size}']:.0f}, "
        f"tiny decode {g[f'tiny decode {size}']:.0f}" for size in args.sizes)]
    for dtype_name in ("float32", FAST[args.device]):
        r = bound[dtype_name]["rates"]
        lines.append(f"measured GFLOP/s {dtype_name}: matmul {r['mm']:.0f}, 3x3 conv {r['conv']:.0f}, "
                     f"attention {r['attention']:.0f}")
    return "\n".join(lines)


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))


if __name__ == "__main__":
    main()
