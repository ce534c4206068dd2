#!/usr/bin/env python
"""Throughput and latency of a server in front of a Dask cluster, against the same server running prompts itself.

Each setup is real processes on loopback: ``nodegraph serve`` alone; or ``nodegraph cluster`` (the scheduler),
``--workers`` ``nodegraph worker`` processes and ``nodegraph serve --scheduler``. Every process runs torch on one
thread (``OMP_NUM_THREADS=1``), so that N workers on N cores are N GPUs in miniature. Per setup:

- under load: ``--clients`` ComfyUI clients each queue ``--prompts`` prompts at once (default 8 x 5 = 40) of the
  shipped text-to-image workflow on the embedded demo model, each prompt its own text and seed (nothing cached);
  the wall time until the last ``execution_success``, prompts per second, the time from ``/prompt`` to success
  (queueing included) and to the first ``progress`` message;
- idle: one client sends 5 prompts one after another; the time from ``/prompt`` to its first ``progress`` message
  (the cost of going through the cluster: the scheduler, the worker, the events on their way back).

The soak driver of ``tests/serving.py`` does the talking (and checks nothing was lost, failed or misdelivered).

    python benchmarks/cluster.py                       # local, 1 worker, 2 workers (about 2 minutes on 2 cores)
    python benchmarks/cluster.py --workers 1 2 4 --clients 8 --prompts 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests package, run from anywhere

from tests.serving import free_port, running_server, soak, terminate  # noqa: E402


@contextmanager
def process(args: list[str], log: Path):
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nodegraph", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        terminate(proc, 20)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.2)


@contextmanager
def cluster(dirs: dict[str, Path], workers: int):
    """A scheduler and ``workers`` workers on loopback; yields the scheduler's address once all have joined."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = dirs["data"] / "cluster.log"
    with ExitStack() as stack:
        scheduler = stack.enter_context(process(["cluster", "--port", str(port)], log))
        wait_for_port(port, scheduler)
        for _ in range(workers):
            stack.enter_context(process(["worker", "--scheduler", address, "--models", str(dirs["models"]),
                                         "--input", str(dirs["input"]), "--device", "cpu"], log))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=180)
        yield address


def measure(label: str, dirs: dict[str, Path], extra: list[str], clients: int, prompts: int) -> dict:
    with running_server(dirs, *extra, probe="/system_stats") as url:
        asyncio.run(soak(url, 1, 1, 0, 0, 1))  # warm-up: the model loaded where prompts run
        # other clients' prompts each time: nothing a run computes is in the cache yet
        loaded = asyncio.run(soak(url, clients, prompts, 0, 0, prompts, first_client=1))
        idle = asyncio.run(soak(url, 1, 5, 0, 0, 1, first_client=1 + clients))
    problems = loaded.lost + loaded.failures + loaded.order_errors + loaded.foreign + idle.lost + idle.failures
    if problems:
        raise SystemExit(f"{label}: " + "; ".join(problems[:5]))

    def first_progress(result) -> list[float]:
        return [p.progressed - p.submitted for p in result.prompts if p.progressed is not None]

    latencies = sorted(loaded.latencies)
    return {"label": label, "prompts": len(latencies), "wall": loaded.wall, "rate": len(latencies) / loaded.wall,
            "latency": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
            "progress_loaded": statistics.median(first_progress(loaded)),
            "progress_idle": statistics.median(first_progress(idle))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes (default 1 2)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=5, help="prompts per client, all queued at once")
    parser.add_argument("--no-local", action="store_true", help="leave out the server running prompts itself")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every process started here
    rows = []
    with tempfile.TemporaryDirectory(prefix="nodegraph-cluster-bench-") as root:
        setups = ([] if args.no_local else [("one process, no cluster", 0)]) + \
                 [(f"cluster, {n} worker{'s' if n > 1 else ''}", n) for n in args.workers]
        for label, workers in setups:
            dirs = {name: Path(root) / label.replace(" ", "_").replace(",", "") / name
                    for name in ("models", "input", "output", "data", "temp")}
            for path in dirs.values():
                path.mkdir(parents=True)
            print(f"{label} ...", file=sys.stderr, flush=True)
            if workers == 0:
                rows.append(measure(label, dirs, [], args.clients, args.prompts))
                continue
            with cluster(dirs, workers) as address:
                rows.append(measure(label, dirs, ["--scheduler", address], args.clients, args.prompts))
    base = next((r["rate"] for r in rows if r["label"].endswith(" 1 worker")), rows[0]["rate"])
    total = args.clients * args.prompts
    print(f"{total} prompts ({args.clients} clients x {args.prompts}, queued at once) of workflows/text-to-image.json "
          f"on demo-lcm, one torch thread per process, {os.cpu_count()} cores\n")
    print(f"| setup | {total} prompts | prompts/s | vs 1 worker | /prompt -> success, median / p95 "
          f"| -> first progress, loaded | -> first progress, idle |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['wall']:.1f} s | {r['rate']:.2f} | {r['rate'] / base:.2f}x "
              f"| {r['latency']:.2f} / {r['p95']:.2f} s | {r['progress_loaded'] * 1000:.0f} ms "
              f"| {r['progress_idle'] * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
