#!/usr/bin/env python
"""Does memory grow over many runs? The shipped text-to-image workflow, run ``--runs`` times in one process on the
embedded demo model, each run with a new prompt and seed (so only the loaded model is a cache hit: the prompt is
encoded, the latent sampled, decoded and saved every time), as a server answering prompts one after another does.

Prints the process's resident memory (RSS) after runs 1, 20, 50 and the last, the growth from run 20 (when the
allocator has warmed up) to the last, with what the result cache holds then (earlier runs' prompts, latents and
images are kept within its budget, so part of the growth is by design), the median time of a run, and RSS after what
``POST /free`` does (the cache cleared, then the library's ``free()``).

    python benchmarks/soak_memory.py                  # 100 runs (about a minute or two on a laptop CPU)
    python benchmarks/soak_memory.py --runs 300 --cache-gb 0.05
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1024**2


def rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def soak(runs: int, cache_gb: float) -> dict:
    import nodegraph as ng
    import nodes
    from nodes.demo import shapes

    combos = shapes.all_combos()
    with tempfile.TemporaryDirectory() as out:
        cache = ng.ResultCache(max_bytes=int(cache_gb * 1024**3))
        executor = ng.Executor(ng.build_registry(), cache=cache, settings=ng.Settings(output_dir=out))
        wf = ng.load(ROOT / "workflows" / "text-to-image.json")
        memory, held, times, model_loads = {}, {}, [], 0
        for i in range(1, runs + 1):
            # a new prompt (a caption the model knows, made unique) and seed: nothing but the model is reused
            wf.set("2", "text", f"{shapes.caption(*combos[i % len(combos)])}, take {i}")
            wf.set("5", "seed", i)
            started = time.perf_counter()
            result = executor.run(wf)
            times.append(time.perf_counter() - started)
            if result.status != "success":
                raise SystemExit(f"run {i} failed: {result.errors}")
            model_loads += result.nodes["1"].status == "ran"
            del result
            memory[i], held[i] = rss(), cache.nbytes
        stats = cache.stats()
        cache.clear()
        nodes.free()
        memory["free"] = rss()
    return {"memory": memory, "held": held, "times": times, "stats": stats, "model_loads": model_loads}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="consecutive runs (default 100; at least 20)")
    parser.add_argument("--cache-gb", type=float, default=8.0, help="the result cache's budget (default 8)")
    args = parser.parse_args(argv)
    if args.runs < 20:
        parser.error("--runs must be at least 20 (growth is measured from run 20)")
    before = rss()
    out = soak(args.runs, args.cache_gb)
    memory, times, last = out["memory"], out["times"], args.runs
    print(f"{args.runs} runs of workflows/text-to-image.json on demo-lcm, a new prompt and seed each "
          f"(RSS before anything loaded: {before / MB:.0f} MB)\n")
    held = out["held"]
    print("| after run | RSS (MB) | cache holds (MB) |\n| ---: | ---: | ---: |")
    for i in sorted({1, 20, 50, last} & set(memory)):
        print(f"| {i} | {memory[i] / MB:.1f} | {held[i] / MB:.2f} |")
    print(f"| then /free | {memory['free'] / MB:.1f} | 0 |")
    growth, cached = memory[last] - memory[20], held[last] - held[20]
    print(f"\ngrowth run 20 -> {last}: {growth / MB:+.2f} MB ({100 * growth / memory[20]:+.2f}%), of which "
          f"{cached / MB:.2f} MB are results the cache keeps (prompts, latents, images of earlier runs; within its "
          f"budget); not held by the cache: {(growth - cached) / MB:+.2f} MB")
    print(f"median run: {1000 * statistics.median(times):.0f} ms (first run, loading the model: "
          f"{1000 * times[0]:.0f} ms); the model was loaded {out['model_loads']} time(s)")
    s = out["stats"]
    print(f"cache at the end: {s['entries']} entries, {s['bytes'] / MB:.1f} MB held (each storage once; "
          f"{s['shared_bytes'] / MB:.1f} MB more if counted per entry), {s['model_entries']} holding models "
          f"({s['model_bytes'] / MB:.1f} MB), {s['evictions']} evictions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
