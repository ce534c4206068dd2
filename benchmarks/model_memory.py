"""Load time and peak memory of the models a graph loads beside a checkpoint, at full size: the library's own
``from_pretrained`` of a folder against our loader of the same weights as one file.

    python benchmarks/model_memory.py                      # both models, built once under ~/.cache/nodegraph-bench
    python benchmarks/model_memory.py --models controlnet --dtypes float32 --rounds 3

* ``controlnet``: a random-weight ControlNet of diffusers' default (SD1.5) configuration, 361M parameters, as a
  diffusers folder and as an original-layout ``.safetensors`` file (``LoadControlNet``'s loader).
* ``image-encoder``: a random-weight CLIP ViT-H/14 vision encoder with projection (the IP-Adapter SD1.5 encoder's
  shape, 632M parameters), as a transformers folder and as one ``.safetensors`` file (``LoadIPAdapter``'s).

Each load runs in a fresh process after the files were read once (page cache warm); every weight is then read once
(as a first run would: mapped pages become resident then), and the table gives medians over ``--rounds``
interleaved rounds of the load time, that read, the peak RSS above the interpreter (with torch, diffusers and
transformers imported) and that over the bytes of the loaded weights.
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
    "from_pretrained (folder)": "library",
    "nodegraph (single file, default: mapped where guarded)": None,
    "nodegraph (single file, --no-map-weights)": False,
}


def build(cache: Path, model: str) -> tuple[Path, Path]:
    folder, single = cache / f"{model}-random", cache / f"{model}-random.safetensors"
    if not (folder / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        if model == "controlnet":
            from diffusers import ControlNetModel

            ControlNetModel().save_pretrained(folder)  # diffusers' defaults are SD1.5's
        else:
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")).save_pretrained(folder)
    if not single.is_file():
        from nodes.testing import tiny_adapters

        write = (tiny_adapters.write_controlnet_single_file if model == "controlnet"
                 else tiny_adapters.write_image_encoder_single_file)
        write(folder, single)
    return folder, single


def child(model_name: str, engine: str, path: Path, dtype_name: str) -> dict:
    import torch
    from diffusers import ControlNetModel  # noqa: F401 - imports are not part of a load
    from transformers import CLIPVisionModelWithProjection  # noqa: F401

    import nodegraph as ng
    from nodes.control import load_controlnet
    from nodes.ipadapter import load_image_encoder

    dtype = getattr(torch, dtype_name)
    base = rss_now()
    start = time.perf_counter()
    if ENGINES[engine] == "library":
        cls = ControlNetModel if model_name == "controlnet" else CLIPVisionModelWithProjection
        model = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    else:
        settings = ng.Settings(models_dir=Path(tempfile.mkdtemp()), device="cpu", dtype=dtype_name,
                               map_weights=ENGINES[engine])
        model = (load_controlnet(path, settings) if model_name == "controlnet"
                 else load_image_encoder(path, settings)[0])
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
    ap.add_argument("--models", nargs="+", choices=["controlnet", "image-encoder"],
                    default=["controlnet", "image-encoder"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "ENGINE", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, engine, path, dtype = args.child
        print(json.dumps(child(model, engine, Path(path), dtype)))
        return
    print("| model | engine | dtype | load s | +read s | peak over base GB | weights GB | peak / weights |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        folder, single = build(args.cache.expanduser(), model)
        warm(folder)
        warm(single)
        for dtype in args.dtypes:
            samples: dict[str, list[dict]] = {label: [] for label in ENGINES}
            for _ in range(args.rounds):
                for label, how in ENGINES.items():
                    path = folder if how == "library" else single
                    out = subprocess.run([sys.executable, __file__, "--child", model, label, str(path), dtype],
                                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
                    samples[label].append(json.loads(out.strip().splitlines()[-1]))
            for label, runs in samples.items():
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(f"| {model} | {label} | {dtype} | {med['seconds']:.2f} | {med['touch']:.2f} | "
                      f"{med['peak'] / 1e9:.2f} | {med['weights'] / 1e9:.2f} | {med['peak'] / med['weights']:.2f} |")


if __name__ == "__main__":
    main()
