#!/usr/bin/env python
"""Load and soak a real server: ``nodegraph serve`` in a subprocess on a free loopback port, with fresh folders, and
``--clients`` ComfyUI clients (default 20), each on its own websocket, each sending ``--prompts`` prompts (default 10:
200 in all) of the shipped text-to-image workflow on the embedded demo model, each with its own text and seed, at
most ``--in-flight`` of its own waiting or running at once. Mixed in, per client: ``--invalid`` invalid prompts (a
text for an integer, a link to a missing node: each must be refused with 400 and its node errors) and
``--cancelled`` cancelled ones (clients take turns: deleted from ``/queue`` while waiting, or ``POST /interrupt``
once its ``execution_start`` is heard).

Prints one table: every valid prompt completed (history entry ``success`` with its images), prompts lost (accepted,
not deleted, and without a history entry: must be 0), completions out of each client's order of sending, messages a
client heard about another client's prompts (must be 0), latency from sending to ``execution_success`` (median, p95,
max: queueing included; and the part from ``execution_start``), and the server's RSS after the first 20 completions
and at the end (drift). Exits 1 when a prompt was lost, out of order, failed, or heard by the wrong client, or RSS
grew more than ``--max-drift`` percent. ``tests/server/test_soak.py`` runs the same driver (``tests/serving.py``'s
``soak``) shortened. Runs end sooner with ``OMP_WAIT_POLICY=PASSIVE`` where the cores are shared (see the README).

    python benchmarks/soak_server.py                         # 20 clients x 10 prompts (20-90 s on 2 cores)
    python benchmarks/soak_server.py --clients 4 --prompts 5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package, run from anywhere

from tests.serving import running_server, soak  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    parser.add_argument("--prompts", type=int, default=10, help="prompts per client (default 10)")
    parser.add_argument("--invalid", type=int, default=1, help="invalid prompts per client (default 1)")
    parser.add_argument("--cancelled", type=int, default=1, help="cancelled prompts per client (default 1)")
    parser.add_argument("--in-flight", type=int, default=2, help="a client's own prompts queued at once (default 2)")
    parser.add_argument("--max-drift", type=float, default=5.0,
                        help="RSS growth after the first 20 completions that fails the run, in %% (default 5)")
    args = parser.parse_args(argv)
    if args.invalid + args.cancelled > args.prompts:
        parser.error("--invalid plus --cancelled must not exceed --prompts")
    with tempfile.TemporaryDirectory(prefix="nodegraph-soak-") as root:
        dirs = {name: Path(root) / name for name in ("models", "input", "output", "data", "temp")}
        for path in dirs.values():
            path.mkdir()
        with running_server(dirs, probe="/system_stats") as url:
            result = asyncio.run(soak(url, args.clients, args.prompts, args.invalid, args.cancelled, args.in_flight))
    print(f"{args.clients} clients x {args.prompts} prompts of workflows/text-to-image.json on demo-lcm "
          f"({args.invalid} invalid and {args.cancelled} cancelled per client, {args.in_flight} in flight each)\n")
    print(result.table())
    problems = result.lost + result.failures + result.order_errors + result.foreign
    if result.rss_first and (result.rss_last - result.rss_first) / result.rss_first * 100 > args.max_drift:
        problems.append(f"the server's RSS grew more than {args.max_drift}% after the first 20 completions")
    for line in problems[:20]:
        print("  " + line)
    return 1 if problems or not result.answers_after else 0


if __name__ == "__main__":
    sys.exit(main())
