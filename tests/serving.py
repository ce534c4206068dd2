"""A real ``nodegraph serve`` in a subprocess, for the tests that talk to it as a browser or a client would."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


class ServerURL(str):
    """The server's URL, with its ``process`` (for the tests that stop or kill it themselves)."""

    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(dirs: dict[str, Path], *extra_args: str, probe: str = "/object_info") -> Iterator[ServerURL]:
    """The URL of a server over the folders ``dirs`` (models, input, output, data, temp), on the CPU, until the
    block ends; its log is ``dirs["data"] / "server.log"`` (appended to: a restarted server keeps the earlier log)
    and is shown when it fails to start."""
    port = free_port()
    env = {**os.environ, "NODEGRAPH_TEMP": str(dirs["temp"]), "HF_HUB_OFFLINE": "1"}
    log_path = dirs["data"] / "server.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodegraph", "serve", "--port", str(port), "--models", str(dirs["models"]),
             "--input", str(dirs["input"]), "--output", str(dirs["output"]), "--data", str(dirs["data"]),
             "--device", "cpu", *extra_args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = ServerURL(f"http://127.0.0.1:{port}")
        url.process = proc
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + probe, timeout=5) as resp:
                    json.load(resp)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("the server did not start:\n" + log_path.read_text()) from None
                time.sleep(0.3)
        try:
            yield url
        finally:
            terminate(proc, 15)


def terminate(proc: subprocess.Popen, wait: float) -> None:
    """Ask ``proc`` to stop; kill it after ``wait`` seconds."""
    proc.terminate()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- load and soak: many ComfyUI clients on one server ---------------------------------------------------------------

#: what the soak's clients ask for: the shipped text-to-image workflow (demo-lcm), each prompt with its own text and
#: seed
SOAK_WORKFLOW = ROOT / "workflows" / "text-to-image.json"
COLOURS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle")
ENDS = {"execution_success": "success", "execution_interrupted": "interrupted", "execution_error": "error"}


def server_rss(pid: int) -> int:
    """The resident memory (VmRSS) of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def soak_prompt(client: int, index: int, kind: str = "valid") -> dict:
    """The text-to-image document for prompt ``index`` of client ``client``: its own text and seed; an ``invalid``
    one (alternately) gives a number as text to an integer input or links to a node that is not there."""
    doc = json.loads(SOAK_WORKFLOW.read_text())
    nodes = doc["nodes"]
    n = client * 1000 + index
    nodes["2"]["inputs"]["text"] = (f"a {COLOURS[n % 6]} {SHAPES[n % 3]} on a {COLOURS[(n + 1 + n // 6) % 6]} "
                                    f"background, client {client} prompt {index}")
    nodes["5"]["inputs"]["seed"] = n
    if kind == "invalid":
        if (client + index) % 2:
            nodes["3"]["inputs"]["steps"] = "four"
        else:
            nodes["5"]["inputs"]["positive"] = {"link": ["99", "conditioning"]}
    return doc


def soak_kinds(prompts: int, invalid: int, cancelled: int, client: int) -> list[str]:
    """What each of a client's prompts is: ``valid``, ``invalid``, or ``delete`` / ``interrupt`` (cancelled while
    waiting, or while running: clients take turns), spread over its prompts (shifted per client)."""
    kinds = ["valid"] * prompts
    slots = [(client + k * prompts // max(1, invalid + cancelled)) % prompts for k in range(invalid + cancelled)]
    for k, slot in enumerate(dict.fromkeys(slots)):
        if k < invalid:
            kinds[slot] = "invalid"
        else:
            kinds[slot] = "delete" if (client + k) % 2 == 0 else "interrupt"
    return kinds


@dataclasses.dataclass
class SoakPrompt:
    client: int
    index: int
    kind: str
    prompt_id: str | None = None
    submitted: float = 0.0
    started: float | None = None  # when the client heard its execution_start
    progressed: float | None = None  # when the client heard its first progress message
    ended: float | None = None
    end: str | None = None  # success / interrupted / error as the client heard it; deleted when it left the queue
    refused: dict | None = None  # the 400 answer of an invalid prompt


@dataclasses.dataclass
class SoakResult:
    prompts: list[SoakPrompt]
    foreign: list[str]  # "client 3 heard executing of a prompt of client 5" and the like
    order_errors: list[str]
    lost: list[str]  # accepted and not deleted, without a history entry
    failures: list[str]  # valid prompts that did not succeed with their images, invalid ones not refused rightly
    rss_first: int | None  # the server's RSS after the first 20 completions
    rss_last: int
    messages: int
    wall: float
    answers_after: bool

    @property
    def latencies(self) -> list[float]:
        return [p.ended - p.submitted for p in self.prompts if p.kind == "valid" and p.ended is not None]

    @property
    def run_times(self) -> list[float]:
        return [p.ended - p.started for p in self.prompts
                if p.kind == "valid" and p.ended is not None and p.started is not None]

    def count(self, kind: str, end: str | None = None) -> int:
        return sum(p.kind == kind and (end is None or p.end == end) for p in self.prompts)

    def table(self) -> str:
        def spread(values: list[float]) -> str:
            values = sorted(values) or [0.0]
            p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
            return f"{statistics.median(values):.2f} / {p95:.2f} / {values[-1]:.2f} s"

        clients = len({p.client for p in self.prompts})
        drift = (f"{(self.rss_last - self.rss_first) / self.rss_first * 100:+.2f}% "
                 f"({self.rss_first / 2**20:.0f} -> {self.rss_last / 2**20:.0f} MB)" if self.rss_first else "n/a")
        cancelled = [p.end for p in self.prompts if p.kind in ("delete", "interrupt")]
        refused = sum(p.refused is not None for p in self.prompts)
        rows = [
            ("prompts (clients x each)", f"{len(self.prompts)} ({clients} x {len(self.prompts) // max(1, clients)})"),
            ("valid: completed / sent", f"{self.count('valid', 'success')} / {self.count('valid')}"),
            ("invalid: refused 400 with node errors", f"{refused} / {self.count('invalid')}"),
            ("cancelled: deleted waiting / interrupted running / finished first",
             f"{cancelled.count('deleted')} / {cancelled.count('interrupted')} / {cancelled.count('success')}"),
            ("prompts lost", str(len(self.lost))),
            ("failures", str(len(self.failures))),
            ("out-of-order completions", str(len(self.order_errors))),
            ("messages heard / of another client's prompt", f"{self.messages} / {len(self.foreign)}"),
            ("latency submit -> success: median / p95 / max", spread(self.latencies)),
            ("of which running (execution_start -> success)", spread(self.run_times)),
            ("throughput", f"{len(self.latencies) / self.wall:.1f} prompts/s ({self.wall:.1f} s)"),
            ("server RSS drift, after 20 completions -> end", drift),
            ("server answers afterwards", "yes" if self.answers_after else "NO"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"| {'measure':<{width}} | value |", f"| {'-' * width} | ----- |"]
        return "\n".join(lines + [f"| {k:<{width}} | {v} |" for k, v in rows])


async def soak(url: ServerURL, clients: int = 20, prompts: int = 10, invalid: int = 1, cancelled: int = 1,
               in_flight: int = 2, timeout: float = 600.0, first_client: int = 0) -> SoakResult:
    """``clients`` ComfyUI clients, each on its own websocket, each sending ``prompts`` prompts (``invalid`` of them
    invalid, ``cancelled`` cancelled) with at most ``in_flight`` of its own waiting or running at once; what every
    client heard, what the history says afterwards, and the server's RSS (``url.process``) along the way. Clients
    draw the prompts of ``soak_prompt(first_client + c, ...)``: another ``first_client`` gives prompts not cached."""
    import aiohttp

    every: list[SoakPrompt] = []
    foreign: list[str] = []
    heard: dict[int, list[tuple[str, str]]] = {}  # client -> (message type, prompt id) in arrival order
    counter = {"messages": 0, "ended": 0}
    rss_first: list[int] = []
    started = time.monotonic()

    async def one_client(session: aiohttp.ClientSession, c: int) -> None:
        cid = f"soak-{c}"
        mine: dict[str, SoakPrompt] = {}
        endings: dict[str, asyncio.Future] = {}
        running: dict[str, float] = {}  # prompt id -> when its execution_start was heard
        progressed: dict[str, float] = {}  # prompt id -> when its first progress was heard
        to_interrupt: set[str] = set()
        heard[c] = []
        loop = asyncio.get_running_loop()

        def ending(pid: str) -> asyncio.Future:
            return endings.setdefault(pid, loop.create_future())

        async def interrupt(pid: str) -> None:
            async with session.post(url + "/interrupt", json={"prompt_id": pid}) as resp:
                assert resp.status == 200, await resp.text()

        def hear(kind: str, pid: str) -> None:
            counter["messages"] += 1
            heard[c].append((kind, pid))
            if kind == "progress":
                progressed.setdefault(pid, time.monotonic())
            if kind == "execution_start":
                running[pid] = time.monotonic()
                if pid in to_interrupt:
                    loop.create_task(interrupt(pid))
            if kind in ENDS and not ending(pid).done():
                ending(pid).set_result((ENDS[kind], time.monotonic()))

        async with session.ws_connect(f"{url}/ws?clientId={cid}", max_msg_size=0) as ws:
            assert (await ws.receive_json())["type"] == "status"
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})

            async def listen() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        message = json.loads(msg.data)
                        pid = (message.get("data") or {}).get("prompt_id")
                        if pid is not None:
                            hear(message["type"], pid)
                    elif msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) > 8:
                        kind, size = struct.unpack(">II", msg.data[:8])
                        if kind == 4:  # a preview that names its prompt
                            hear("preview", json.loads(msg.data[8:8 + size])["prompt_id"])

            listener = asyncio.create_task(listen())
            window = asyncio.Semaphore(in_flight)

            async def await_end(p: SoakPrompt) -> None:
                try:
                    p.end, p.ended = await ending(p.prompt_id)
                    p.started = running.get(p.prompt_id)
                    p.progressed = progressed.get(p.prompt_id)
                    counter["ended"] += 1
                    if counter["ended"] == 20 and not rss_first:
                        rss_first.append(server_rss(url.process.pid))
                finally:
                    window.release()

            waiting = []
            for i, kind in enumerate(soak_kinds(prompts, invalid, cancelled, c)):
                p = SoakPrompt(c, i, kind)
                every.append(p)
                await window.acquire()
                p.submitted = time.monotonic()
                async with session.post(url + "/prompt", json={"prompt": soak_prompt(first_client + c, i, kind),
                                                               "client_id": cid}) as resp:
                    answer = await resp.json()
                    status = resp.status
                if kind == "invalid":
                    window.release()
                    if status == 400 and answer.get("node_errors"):
                        p.refused = answer
                    elif status == 200:  # accepted after all: it must then be accounted for like any other
                        p.prompt_id = answer["prompt_id"]
                        mine[p.prompt_id] = p
                        waiting.append(asyncio.create_task(await_end(p)))
                    continue
                assert status == 200, answer
                p.prompt_id = answer["prompt_id"]
                mine[p.prompt_id] = p
                if kind == "interrupt":
                    to_interrupt.add(p.prompt_id)
                    if p.prompt_id in running:  # it started before we knew it was ours
                        await interrupt(p.prompt_id)
                if kind == "delete":
                    async with session.post(url + "/queue", json={"delete": [p.prompt_id]}) as resp:
                        assert resp.status == 200
                    async with session.get(url + "/queue") as resp:
                        snapshot = await resp.json()
                    queued = {row[1] for rows in snapshot.values() for row in rows}
                    async with session.get(f"{url}/history/{p.prompt_id}") as resp:
                        finished = bool(await resp.json())
                    if p.prompt_id not in queued and not finished:  # deleted: no run, no history entry, ever
                        p.end = "deleted"
                        window.release()
                        continue
                waiting.append(asyncio.create_task(await_end(p)))
            await asyncio.gather(*waiting)
            listener.cancel()
            for kind, pid in heard[c]:
                if pid not in mine:
                    foreign.append(f"client {c} heard {kind} of {pid}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.wait_for(asyncio.gather(*(one_client(session, c) for c in range(clients))), timeout)
        wall = time.monotonic() - started
        rss_last = server_rss(url.process.pid)
        async with session.get(url + "/history", params={"max_items": "10000"}) as resp:
            history = await resp.json()
        async with session.get(url + "/queue") as resp:
            queue_after = await resp.json()
        async with session.get(url + "/system_stats") as resp:
            answers_after = resp.status == 200 and not any(queue_after.values())

    lost, failures, order_errors = [], [], []
    for p in every:
        if p.kind == "invalid" and p.refused is None:
            failures.append(f"invalid prompt {p.client}/{p.index} was not refused with node errors")
        if p.prompt_id is None or p.end == "deleted":
            if p.prompt_id in history:
                failures.append(f"deleted prompt {p.prompt_id} ran")
            continue
        entry = history.get(p.prompt_id)
        if entry is None:
            lost.append(p.prompt_id)
            continue
        status = entry["status"]["status_str"]
        if status != p.end:
            failures.append(f"{p.prompt_id}: the client heard {p.end}, the history says {status}")
        if p.kind == "valid" and (status != "success" or not entry["outputs"].get("7", {}).get("images")):
            failures.append(f"{p.prompt_id} (client {p.client}, prompt {p.index}): {status}, "
                            f"outputs {entry['outputs']}")
    for c in range(clients):
        ran = [p.prompt_id for p in every if p.client == c and p.prompt_id and p.end != "deleted"]
        ended = list(dict.fromkeys(pid for kind, pid in heard[c] if kind in ENDS))
        if ended != ran:
            order_errors.append(f"client {c}: sent {ran}, ended {ended}")
    return SoakResult(every, foreign, order_errors, lost, failures, rss_first[0] if rss_first else None, rss_last,
                      counter["messages"], wall, answers_after)
