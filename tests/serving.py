"""A real ``nodegraph serve`` in a subprocess, for the tests that talk to it as a browser or a client would."""

from __future__ import annotations

import contextlib
import json
import os
import socket
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
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
