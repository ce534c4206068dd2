#!/usr/bin/env python
"""How well the embedded demo model (``nodes/data/demo``) draws what its prompt says.

Scores, with the deterministic judge of :mod:`nodes.demo.shapes`, a fixed list of 200 captions: 100 from
the 12 held-out (shape, colour, background) triples the model never saw in training and 100 seen
triples. Each caption i uses seed i (image geometry for the VAE check, ``torch.Generator().manual_seed(i)``
for sampling). Rows:

* ``vae recon``   the VAE's reconstruction (posterior mean, decoded) of dataset images of the captions;
* ``teacher``     diffusers' StableDiffusionPipeline with the teacher UNet (``teacher_unet/``) and a
                  DDIMScheduler (from the shipped scheduler config) at 25 steps, classifier-free guidance
                  ``--teacher-guidance`` (several values may be given);
* ``lcm N``       diffusers' LatentConsistencyModelPipeline (the shipped folder, unchanged) at 1, 2 and 4
                  steps, guidance ``--lcm-guidance`` (w = g - 1 goes into the guidance embedding);
* ``teacher+LCM-LoRA N`` with ``--lora FILE``: StableDiffusionPipeline with the teacher, an LCMScheduler and that
                  LCM-LoRA at guidance ``--lora-guidance`` (1: no CFG);
* ``graph LCM N, DTYPE`` the LCM through a nodegraph graph, one run per caption with a new prompt and seed, in each
                  of ``--graph-dtypes`` (in float32 the images equal the pipeline's up to float rounding:
                  channels_last weights on the CPU; bfloat16 is the default on CPUs that compute it natively, and
                  the row says whether it draws as well; the time is what a user of the engine waits for an image).

Columns give the fraction fully correct on seen / held-out / all captions, the per-attribute accuracy on
all 200, and the time for one image (batch 1, median of ``--timing-runs``) at ``--threads`` threads.
``--grid PATH`` also writes a captioned grid of 4-step LCM samples (``docs/demo_grid.png``).

    python benchmarks/demo_quality.py                       # table
    python benchmarks/demo_quality.py --grid docs/demo_grid.png --json /tmp/demo_quality.json
    python benchmarks/demo_quality.py --model /tmp/candidate --device cuda --skip-graph   # a GPU recipe search
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes.demo import shapes  # noqa: E402

DEMO_DIR = ROOT / "nodes" / "data" / "demo"
N_CAPTIONS = 200


def benchmark_captions() -> list[tuple[str, bool]]:
    """The fixed list: (caption, held_out) x 200, held-out and seen interleaved."""
    seen = shapes.train_combos()
    pick = np.random.default_rng(1234).choice(len(seen), size=N_CAPTIONS // 2, replace=True)
    out = []
    for i in range(N_CAPTIONS // 2):
        out.append((shapes.caption(*shapes.HELD_OUT[i % len(shapes.HELD_OUT)]), True))
        out.append((shapes.caption(*seen[int(pick[i])]), False))
    return out


def summarise(images, items) -> dict:
    verdicts = [shapes.judge(img, cap) for img, (cap, _) in zip(images, items)]
    held = [v["correct"] for v, (_, h) in zip(verdicts, items) if h]
    seen = [v["correct"] for v, (_, h) in zip(verdicts, items) if not h]
    res = {k: float(np.mean([v[k] for v in verdicts])) for k in ("shape", "colour", "background", "correct")}
    res["seen"] = float(np.mean(seen))
    res["held_out"] = float(np.mean(held))
    return res


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def load_pipelines(folder: Path, device: str = "cpu"):
    from diffusers import (
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    lcm = LatentConsistencyModelPipeline.from_pretrained(folder, local_files_only=True)
    teacher_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="teacher_unet", local_files_only=True)
    sd = StableDiffusionPipeline(
        vae=lcm.vae,
        text_encoder=lcm.text_encoder,
        tokenizer=lcm.tokenizer,
        unet=teacher_unet,
        scheduler=DDIMScheduler.from_config(lcm.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for p in (lcm, sd):
        p.set_progress_bar_config(disable=True)
        p.to(device)
    return lcm, sd


def generate(pipe, prompts, seeds, batch: int = 50, **kwargs) -> list:
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        out = pipe(prompts[i : i + batch], generator=gens, height=64, width=64, **kwargs).images
        images.extend(out)
    return images


def vae_recon(vae, items) -> list:
    images = []
    for i, (cap, _) in enumerate(items):
        rng = np.random.default_rng([4321, i])
        images.append(shapes.render(*shapes.parse_caption(cap), *shapes.random_geometry(rng)))
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1).to(vae.device)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    rec = ((rec * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return list(rec)


def graph_runs(model: Path, items, steps: int, guidance: float, device: str = "cpu",
               dtype: str | None = None) -> tuple[list, float]:
    """The same captions and seeds through a nodegraph graph (LoadCheckpoint -> CLIPEncode -> LCMScheduler ->
    EmptyLatent -> LCMSampler -> VAEDecode), one run per caption, each with a new prompt and seed (so the prompt is
    encoded, the latent sampled and decoded every time; only the loaded checkpoint is reused from the cache).
    ``dtype`` None is the engine's own choice for the device. Returns the images and the median time of a run in
    ms."""
    import shutil
    import tempfile

    import nodegraph as ng
    from nodegraph import Link as L
    from nodes.images import tensor_to_pils

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(model, Path(tmp) / "checkpoints" / "candidate")  # model files must lie in the models folder
        wf = ng.Workflow()
        wf.add("ckpt", "LoadCheckpoint", ckpt="candidate")
        wf.add("pos", "CLIPEncode", clip=L("ckpt", "clip"), text="")
        wf.add("sched", "LCMScheduler", model=L("ckpt", "model"), steps=steps)
        wf.add("latent", "EmptyLatent", width=64, height=64, vae=L("ckpt", "vae"))
        wf.add("sample", "LCMSampler", model=L("ckpt", "model"), positive=L("pos", "conditioning"),
               latent=L("latent", "latent"), schedule=L("sched", "schedule"), guidance=guidance)
        wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample", "latent"))
        wf.outputs = ["decode"]
        executor = ng.Executor(ng.build_registry(), settings=ng.Settings(models_dir=Path(tmp), device=device,
                                                                         output_dir=Path(tmp) / "out", dtype=dtype))
        executor.run(wf)  # load the checkpoint (not timed)
        images, times = [], []
        for i, (caption, _) in enumerate(items):
            wf.set("pos", "text", caption)
            wf.set("sample", "seed", i)
            t = time.perf_counter()
            result = executor.run(wf)
            times.append(time.perf_counter() - t)
            images.append(tensor_to_pils(result.output("decode", "image"))[0])
    return images, 1000 * statistics.median(times[1:])


def make_grid(pipe, path: Path, guidance: float) -> None:
    from PIL import Image, ImageDraw

    seen = shapes.train_combos()
    rng = np.random.default_rng(7)
    held = [shapes.HELD_OUT[i] for i in range(0, 12, 2)]  # 6 held-out triples
    seen_pick = [seen[int(j)] for j in rng.choice(len(seen), size=10, replace=False)]
    combos = [(c, False) for c in seen_pick] + [(c, True) for c in held]
    prompts = [shapes.caption(*c) for c, _ in combos]
    images = generate(pipe, prompts, list(range(len(prompts))), num_inference_steps=4, guidance_scale=guidance)
    tile, cols = 128, 4
    rows = (len(prompts) + cols - 1) // cols
    label_h = 30
    grid = Image.new("RGB", (cols * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, (combo, held_out)) in enumerate(zip(images, combos)):
        r, c = divmod(k, cols)
        x, y = c * tile, r * (tile + label_h)
        grid.paste(img.resize((tile, tile), Image.NEAREST), (x, y))
        ok = shapes.judge(img, prompts[k])["correct"]
        text = f"{combo[1]} {combo[0]}\non {combo[2]}" + (" (held out)" if held_out else "")
        draw.text((x + 3, y + tile + 2), text, fill=(0, 120, 0) if ok else (200, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    print(f"wrote {path} (green label: judged correct, red: not)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEMO_DIR)
    p.add_argument("--threads", type=int, default=1, help="1: lowest batch-1 latency at this model size")
    p.add_argument("--device", default="cpu", help="where the pipelines and graphs run (the targets are the CPU's)")
    p.add_argument("--skip-graph", action="store_true", help="leave out the graph rows")
    p.add_argument("--graph-dtypes", nargs="+", default=["float32", "bfloat16"],
                   help="precisions of the graph rows ('auto': the engine's choice for the device)")
    p.add_argument("--teacher-guidance", type=float, nargs="+", default=[4.0])
    p.add_argument("--lcm-guidance", type=float, default=3.0)
    p.add_argument("--lcm-steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--timing-runs", type=int, default=20)
    p.add_argument("--skip-teacher", action="store_true")
    p.add_argument("--lora", type=Path, default=None,
                   help="an LCM-LoRA for the teacher (scripts/train_demo_model.py --stages lcm_lora,export_lora)")
    p.add_argument("--lora-guidance", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="first 20 captions only, 3 timing runs (smoke test)")
    p.add_argument("--grid", type=Path, default=None, help="write a captioned grid of 4-step samples here")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    lcm, sd = load_pipelines(args.model, args.device)
    items = benchmark_captions()
    if args.quick:
        items, args.timing_runs = items[:20], 3
    prompts = [c for c, _ in items]
    seeds = list(range(len(items)))
    rows = {}

    rows["vae recon"] = summarise(vae_recon(lcm.vae, items), items)
    rows["vae recon"]["ms"] = float("nan")

    if not args.skip_teacher:
        for g in args.teacher_guidance:
            name = f"teacher DDIM 25, g {g:g}"
            rows[name] = summarise(generate(sd, prompts, seeds, num_inference_steps=25, guidance_scale=g), items)
            gen = torch.Generator()
            rows[name]["ms"] = median_ms(
                lambda: sd(prompts[1], num_inference_steps=25, guidance_scale=g, generator=gen.manual_seed(0),
                           height=64, width=64),
                max(3, args.timing_runs // 4),
            )

    for n in args.lcm_steps:
        name = f"LCM {n} step{'s' if n > 1 else ''}, g {args.lcm_guidance:g}"
        rows[name] = summarise(
            generate(lcm, prompts, seeds, num_inference_steps=n, guidance_scale=args.lcm_guidance), items
        )
        gen = torch.Generator()
        rows[name]["ms"] = median_ms(
            lambda: lcm(prompts[1], num_inference_steps=n, guidance_scale=args.lcm_guidance,
                        generator=gen.manual_seed(0), height=64, width=64),
            args.timing_runs,
        )

    if args.lora is not None:
        from diffusers import LCMScheduler, StableDiffusionPipeline

        lcm_scheduler = LCMScheduler.from_config(lcm.scheduler.config)
        with_lora = StableDiffusionPipeline(**{**sd.components, "scheduler": lcm_scheduler})
        with_lora.load_lora_weights(str(args.lora.parent), weight_name=args.lora.name)
        with_lora.set_progress_bar_config(disable=True)
        for n in args.lcm_steps:
            name = f"teacher+LCM-LoRA {n} step{'s' if n > 1 else ''}, g {args.lora_guidance:g}"
            rows[name] = summarise(generate(with_lora, prompts, seeds, num_inference_steps=n,
                                            guidance_scale=args.lora_guidance), items)
            gen = torch.Generator()
            rows[name]["ms"] = median_ms(
                lambda: with_lora(prompts[1], num_inference_steps=n, guidance_scale=args.lora_guidance,
                                  generator=gen.manual_seed(0), height=64, width=64),
                args.timing_runs,
            )

    for dtype in [] if args.skip_graph else args.graph_dtypes:
        for n in args.lcm_steps:
            name = f"graph LCM {n} step{'s' if n > 1 else ''}, g {args.lcm_guidance:g}, {dtype}"
            images, ms = graph_runs(args.model, items, n, args.lcm_guidance, args.device,
                                    None if dtype == "auto" else dtype)
            rows[name] = {**summarise(images, items), "ms": ms}

    where = f"{args.threads} threads" if args.device == "cpu" else args.device
    print(f"\ndemo model {args.model} - judge on {len(items)} captions ({sum(h for _, h in items)} held-out), "
          f"{where}\n")
    header = f"| {'':40} | seen | held-out | all correct | shape | colour | background | ms/image |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in rows.items():
        ms = "-" if np.isnan(r["ms"]) else f"{r['ms']:.1f}"
        print(f"| {name:40} | {r['seen']:4.0%} | {r['held_out']:8.0%} | {r['correct']:11.0%} | {r['shape']:5.0%} "
              f"| {r['colour']:6.0%} | {r['background']:10.0%} | {ms:>8} |")

    if args.grid:
        make_grid(lcm, args.grid, args.lcm_guidance)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
