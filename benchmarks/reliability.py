"""Reliability, in one table: the fuzz targets of ``tests/fuzz`` with N generated cases each, a fixed list of hostile
requests, the injected faults and hostile files of the test suite, and a short load-and-soak of a real server.

    python benchmarks/reliability.py [--examples 500] [--seed 0] [--soak-clients 10] [--soak-prompts 5]

Prints, per target (validation, ``nodegraph validate``, ``POST /prompt``, ``POST /nodegraph/import``), the cases
tried, how they were answered (a plan, a validation failure, a refusal) and the failures found: any other exception,
a 500, a traceback in a message, or a case over the time limit. Then the fixed hostile requests against a server
over the real node library and how many were refused with a 4xx. Then the fault tests
(``tests/server/test_faults.py``: a node raising or running out of memory, a model replaced or deleted, a full disk,
a websocket closing, cancelling inside a step; ``test_persistent_queue.py``: ``kill -9`` and restarts) and the
hostile-file tests (``tests/nodes/test_hostile_files.py``) run, counted as faults survived and inputs refused; and
``benchmarks/soak_server.py``'s driver, shortened, counts prompts lost and the server's RSS drift. Every failure
count should be 0, and so should prompts lost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package, run from anywhere

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.fuzz.targets import documents, huge_documents, targets, toy_documents  # noqa: E402
from tests.server.test_hostile_input import TRAVERSALS  # noqa: E402

CASE_LIMIT = 5.0  # seconds a single case may take


def fuzz(target, strategy, examples: int, rng_seed: int) -> tuple[collections.Counter, list[str]]:
    outcomes: collections.Counter = collections.Counter()
    failures: list[str] = []

    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(text):
        start = time.perf_counter()
        try:
            outcomes[target(text)] += 1
        except Exception as exc:  # everything a target may not do is a failure to count, not to stop at
            outcomes["failed"] += 1
            failures.append(f"{type(exc).__name__}: {str(exc)[:160]}")
            return
        if time.perf_counter() - start > CASE_LIMIT:
            outcomes["failed"] += 1
            failures.append(f"took {time.perf_counter() - start:.1f} s")

    run()
    return outcomes, failures


def hostile_requests() -> list[tuple[str, str, bytes]]:
    """(what, path, body): each must be refused with a 4xx."""
    def saving(prefix: str) -> bytes:
        return json.dumps({"prompt": {"format": "nodegraph/workflow", "version": 1, "nodes": {
            "1": {"type": "LoadImage", "inputs": {"image": "cat.png"}},
            "2": {"type": "SaveImage", "inputs": {"images": {"link": ["1", "image"]},
                                                  "filename_prefix": prefix}}}}}).encode()

    cases = [(f"file prefix {name!r}", "/prompt", saving(name)) for name in TRAVERSALS]
    for depth in (65, 1_000, 100_000):
        cases.append((f"{depth} nested brackets", "/prompt", b"{\"prompt\": " + b"[" * depth + b"]" * depth + b"}"))
        cases.append((f"{depth} nested brackets (import)", "/nodegraph/import", b"[" * depth + b"]" * depth))
    for number in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 5000):
        cases.append((f"the number {number[:12].decode()}", "/prompt",
                      saving("ok").replace(b"\"cat.png\"}", b"\"cat.png\", \"x\": " + number + b"}")))
    chain = {str(i): {"class_type": "LatentUpscaleBy", "inputs": {"samples": [str(i + 1), 0]}} for i in range(1, 3000)}
    cases.append(("a 3000-node chain with no output", "/prompt", json.dumps({"prompt": chain}).encode()))
    cases.append(("a cycle", "/prompt", json.dumps({"prompt": {"format": "nodegraph/workflow", "version": 1, "nodes": {
        "1": {"type": "ImageBatch", "inputs": {"image1": {"link": ["2", "image"]}, "image2": {"link": ["2", "image"]}}},
        "2": {"type": "ImageBatch", "inputs": {"image1": {"link": ["1", "image"]}, "image2": {"link": ["1", "image"]}}},
        "3": {"type": "SaveImage", "inputs": {"images": {"link": ["2", "image"]}}}}}}).encode()))
    cases.append(("a body that is not JSON", "/prompt", b"prompt=1"))
    cases.append(("a body over the upload limit", "/prompt", b" " * (33 * 1024 * 1024)))
    return cases


async def refuse_all(root: Path) -> tuple[int, int, list[str]]:
    from aiohttp.test_utils import TestClient, TestServer

    import nodegraph as ng
    from nodegraph.history import History
    from nodegraph.library import load_library
    from nodegraph.server import ServerConfig, create_app

    for name in ("models", "input", "output", "temp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "input" / "cat.png").write_bytes(b"")  # listed, so that only the case's own problem is reported
    settings_ = ng.Settings(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                            temp_dir=root / "temp")
    app = create_app(ng.Executor(ng.build_registry(), settings=settings_), ServerConfig(),
                     History(root / "history.sqlite3"), load_library("nodes"))
    refused, failures = 0, []
    cases = hostile_requests()
    async with TestClient(TestServer(app)) as client:
        for what, path, body in cases:
            resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
            await resp.read()
            if 400 <= resp.status < 500:
                refused += 1
            else:
                failures.append(f"{what}: {resp.status}")
    return len(cases), refused, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="generated cases per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soak-clients", type=int, default=10)
    parser.add_argument("--soak-prompts", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the importer's warnings about odd documents are expected here

    rows = []
    all_failures = []
    with targets() as found:
        for name, target in found.items():
            runs = [(name, toy_documents() if name == "server" else documents(), args.examples)]
            if name != "cli":  # the CLI reads them as the validator does, through a file
                runs.append((f"{name}, long chains", huge_documents(), max(2, args.examples // 50)))
            for label, strategy, n in runs:
                start = time.perf_counter()
                outcomes, failures = fuzz(target, strategy, n, args.seed)
                rows.append((label, sum(outcomes.values()), outcomes, len(failures), time.perf_counter() - start))
                all_failures += [f"{label}: {f}" for f in failures[:5]]

    print(f"{'target':26s} {'cases':>6s} {'valid':>6s} {'invalid':>8s} {'refused':>8s} {'failures':>9s} {'time':>7s}")
    for label, tried, outcomes, failed, seconds in rows:
        print(f"{label:26s} {tried:6d} {outcomes['valid']:6d} {outcomes['invalid']:8d} {outcomes['refused']:8d} "
              f"{failed:9d} {seconds:6.1f}s")

    with tempfile.TemporaryDirectory() as tmp:
        total, refused, failures = asyncio.run(refuse_all(Path(tmp)))
    print(f"\nhostile requests (fixed list): {total}, refused with a 4xx: {refused}, failures: {len(failures)}")
    for line in all_failures + failures:
        print(f"  {line}")

    faults = pytest_counts("tests/server/test_faults.py", "tests/server/test_persistent_queue.py")
    files = pytest_counts("tests/nodes/test_hostile_files.py")
    soaked = soak_once(args.soak_clients, args.soak_prompts)
    fuzz_failures = sum(row[3] for row in rows)
    print("\n| measure | value |\n| --- | --- |")
    print(f"| fuzz cases tried / failures | {sum(row[1] for row in rows)} / {fuzz_failures} |")
    print(f"| hostile requests refused / tried | {refused} / {total} |")
    print(f"| faults injected and survived (tests passed / run) | {faults[0]} / {sum(faults)} |")
    print(f"| hostile files refused (tests passed / run) | {files[0]} / {sum(files)} |")
    print(f"| prompts lost ({soaked['label']}) | {soaked['lost']} |")
    print(f"| soak RSS drift after the first 20 completions | {soaked['drift']} |")


def pytest_counts(*paths: str) -> tuple[int, int]:
    """(passed, not passed) of a pytest run of ``paths`` in a process of its own."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], cwd=root,
                          capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|xfailed|xpassed)", summary)}
    return counts.get("passed", 0), sum(v for k, v in counts.items() if k != "passed")


def soak_once(clients: int, prompts: int) -> dict:
    from tests.serving import running_server, soak

    with tempfile.TemporaryDirectory(prefix="nodegraph-soak-") as root:
        dirs = {name: Path(root) / name for name in ("models", "input", "output", "data", "temp")}
        for path in dirs.values():
            path.mkdir()
        with running_server(dirs, probe="/system_stats") as url:
            result = asyncio.run(soak(url, clients, prompts, 1, 1, 2))
    drift = (f"{(result.rss_last - result.rss_first) / result.rss_first * 100:+.2f}%" if result.rss_first
             else "n/a (fewer than 20 completions)")
    return {"label": f"{clients} clients x {prompts} prompts", "lost": len(result.lost), "drift": drift}


if __name__ == "__main__":
    main()
