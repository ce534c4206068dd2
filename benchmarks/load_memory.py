"""Load time and peak memory of a full-size SD1.5 checkpoint: diffusers' pipeline against our loader.

    python benchmarks/load_memory.py                       # builds the checkpoint once under ~/.cache/nodegraph-bench
    python benchmarks/load_memory.py --cache /tmp/bench --dtypes float32

Builds, locally and once, a random-weight SD1.5-size model (UNet 860M, VAE 84M, CLIP-L text encoder) from
diffusers/transformers configurations written here, saved as a diffusers folder and as one original-layout
``.safetensors`` file (``nodes.testing.tiny.write_single_file``). Each load then runs in a fresh process of its own,
after the files were read once (page cache warm), and reports its wall time and its peak RSS (:func:`peak_rss`);
loads are interleaved over ``--rounds`` rounds and the table shows medians.
``weights`` is the size of the loaded parameters and buffers in the requested dtype. After the load every weight is
read once (``+touch s``), as a first run would: diffusers keeps float32 weights memory-mapped and untouched pages
are not resident, so ``load peak`` alone would flatter it; ``peak`` is taken after that pass. Both include the
interpreter with torch, diffusers and transformers imported (``base``, measured before the load starts), and the
imports are not part of the load time. ``--map-weights`` keeps a single file's tensors memory-mapped where they
are used as stored (its float32 in float32; in bfloat16 it streams, as the row shows), as diffusers does with a
folder (see :mod:`nodes.loading.assemble`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "diffusers from_pretrained (folder)": ("pipeline", "folder"),
    "nodegraph load_components (folder)": ("ours", "folder"),
    "nodegraph load_components (single file)": ("ours", "single"),
    "nodegraph single file, --map-weights": ("ours-mapped", "single"),
}


def build(cache: Path) -> tuple[Path, Path]:
    """The diffusers folder and the single file, built with random weights unless already there."""
    folder, single = cache / "sd15-random", cache / "sd15-random.safetensors"
    if not (folder / "model_index.json").is_file():
        import torch
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from nodes.loading.assemble import CLIP_BPE_DIR
        from nodes.tokenizers import write_clip_tokenizer_subset

        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
        tokenizer_dir = cache / "tokenizer-src"
        write_clip_tokenizer_subset(tokenizer_dir, 49408 - 514, CLIP_BPE_DIR)
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(
            tokenizer_dir), unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(folder)
        del pipe, unet, vae, text_encoder
    if not single.is_file():
        from nodes.testing.tiny import write_single_file

        write_single_file(folder, single)
    return folder, single


def product_checkpoint(dtype_name: str, cache: Path = Path.home() / ".cache" / "nodegraph-bench",
                       map_weights: bool | None = None):
    """The single file (built unless there) loaded in this process as ``LoadCheckpoint`` loads it
    (``nodes.checkpoint.load``: the fast layout, mapped where guarded unless ``map_weights`` is False), on the CPU in
    ``dtype_name``."""
    import tempfile

    import nodegraph as ng
    from nodes import checkpoint

    single = build(cache)[1]
    models = Path(tempfile.mkdtemp())
    (models / "checkpoints").symlink_to(single.parent, target_is_directory=True)
    settings = ng.Settings(models_dir=models, device="cpu", dtype=dtype_name, map_weights=map_weights)
    return checkpoint.load(settings, single.name)


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None where there is none (not Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(f"{field}:")), None)


def rss_now() -> int:
    """This process's resident memory now in bytes (0 where /proc is missing)."""
    return _status_bytes("VmRSS") or 0


def child(engine: str, path: Path, dtype_name: str) -> dict:
    """One load in this (fresh) process: seconds, peak and base RSS, bytes of the loaded weights."""
    import torch

    dtype = getattr(torch, dtype_name)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401 - imports
    from transformers import CLIPTextModel  # noqa: F401 - are not part of a load

    from nodes.loading import load_components

    base = rss_now()
    start = time.perf_counter()
    if engine == "pipeline":
        pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                       safety_checker=None)
        models = [pipe.unet, pipe.vae, pipe.text_encoder]
    else:
        from nodes.checkpoint import stored_dtype

        mapped = engine == "ours-mapped" and stored_dtype(path) == dtype  # as --map-weights decides
        c = load_components(path, device="cpu", dtype=dtype, clone_weights=not mapped)
        models = [c.unet, c.vae, c.text_encoder]
    seconds = time.perf_counter() - start
    load_peak = peak_rss()
    start = time.perf_counter()
    with torch.no_grad():  # every weight read once, as a run would: memory-mapped weights become resident here
        for m in models:
            for t in [*m.parameters(), *m.buffers()]:
                t.float().sum()
    touch = time.perf_counter() - start
    peak = peak_rss()
    seen: set[int] = set()
    weights = 0
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                weights += t.untyped_storage().nbytes()
    return {"seconds": seconds, "touch": touch, "load_peak": load_peak, "peak": peak, "base": base, "weights": weights}


def peak_rss() -> int:
    """This process's peak resident memory in bytes: Linux's ``VmHWM``, which starts afresh at exec. ``ru_maxrss``
    does not: a child forked from a parent that holds memory (one that has just built the models) reports at least
    the parent's resident size at the fork (it read 4.9 GB for a load that peaked at 3.3)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def random_folder(cache: Path, name: str, class_name: str) -> Path:
    """``cache / name``: a diffusers model of its class's default configuration with random weights (seed 0), saved
    there unless already there."""
    folder = cache / name
    if not (folder / "config.json").is_file():
        import diffusers
        import torch

        torch.manual_seed(0)
        getattr(diffusers, class_name)().save_pretrained(folder)
    return folder


def warm(path: Path) -> None:
    for p in [path] if path.is_file() else sorted(path.rglob("*.safetensors")):
        with p.open("rb") as f:
            while f.read(1 << 24):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nodegraph-bench")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2, help="loads per engine and dtype, interleaved; medians")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, path, dtype_name = args.child
        print(json.dumps(child(engine, Path(path), dtype_name)))
        return
    folder, single = build(args.cache.expanduser())
    if args.build_only:
        return
    warm(folder)
    warm(single)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    gb = 1e9
    print(f"{'engine':40} {'dtype':8} {'load s':>6} {'+touch s':>8} {'base GB':>7} {'load peak':>9} "
          f"{'peak GB':>7} {'weights GB':>10} {'peak/weights':>12} {'(peak-base)/weights':>19}")
    for dtype_name in args.dtypes:
        results: dict[str, list[dict]] = {label: [] for label in ENGINES}
        for _ in range(args.rounds):
            for label, (engine, which) in ENGINES.items():
                path = folder if which == "folder" else single
                out = subprocess.run([sys.executable, __file__, "--child", engine, str(path), dtype_name], env=env,
                                     cwd=ROOT, check=True, capture_output=True, text=True).stdout
                results[label].append(json.loads(out.strip().splitlines()[-1]))
        for label, runs in results.items():
            r = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            print(f"{label:40} {dtype_name:8} {r['seconds']:6.1f} {r['touch']:8.1f} {r['base'] / gb:7.2f} "
                  f"{r['load_peak'] / gb:9.2f} {r['peak'] / gb:7.2f} {r['weights'] / gb:10.2f} "
                  f"{r['peak'] / r['weights']:12.2f} {(r['peak'] - r['base']) / r['weights']:19.2f}", flush=True)

if __name__ == "__main__":
    main()
