"""A cluster that speaks TLS, set up as docs/scale-out.md says: certificates named in Dask's configuration (a YAML
file every process reads), ``nodegraph cluster`` and ``nodegraph worker`` started from the command line, and a
server-side runner that finds the certificates in the same configuration. A client without them gets nowhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")
pytest.importorskip("cryptography")  # Security.temporary() makes the certificates

import dask  # noqa: E402
from distributed.security import Security  # noqa: E402

import nodegraph as ng  # noqa: E402
from nodegraph.cluster import DaskRunner  # noqa: E402
from nodegraph.library import BUILTIN, load_library  # noqa: E402
from nodegraph.registry import build_registry  # noqa: E402

from ..serving import ROOT, free_port  # noqa: E402
from .test_cluster import settings_in, text_to_image  # noqa: E402


def tls_config(folder: Path) -> dict:
    """A self-signed certificate for every role, in files, and the configuration that names them."""
    temporary = Security.temporary()
    (folder / "cert.pem").write_text(temporary.tls_ca_file)
    (folder / "key.pem").write_text(temporary.tls_client_key)
    pair = {"cert": str(folder / "cert.pem"), "key": str(folder / "key.pem")}
    return {"distributed": {"comm": {"require-encryption": True, "tls": {
        "ca-file": str(folder / "cert.pem"), "scheduler": pair, "worker": pair, "client": pair}}}}


def dotted(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def started(args: list[str], env: dict, log: Path, pattern: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """A ``nodegraph`` subprocess, once its log shows ``pattern`` (returns the first group)."""
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "nodegraph", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not (match := re.search(pattern, log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"nodegraph {args[0]} did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return proc, match.group(1)


def test_a_cluster_configured_for_tls_runs_prompts_and_refuses_clients_without_the_certificates(tmp_path):
    import yaml

    config = tls_config(tmp_path)
    (tmp_path / "dask").mkdir()
    (tmp_path / "dask" / "distributed.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "DASK_CONFIG": str(tmp_path / "dask"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("models", "input", "output", "temp"):
        (tmp_path / name).mkdir()
    processes = []
    try:
        scheduler, address = started(["cluster", "--port", str(free_port())], env, tmp_path / "scheduler.log",
                                     r"nodegraph scheduler at (\S+)")
        processes.append(scheduler)
        assert address.startswith("tls://")  # the configuration asks for encryption: tls without --protocol
        worker, _ = started(["worker", "--scheduler", address, "--models", str(tmp_path / "models"),
                             "--device", "cpu"], env, tmp_path / "worker.log", r"nodegraph worker (\S+)")
        processes.append(worker)
        # what `nodegraph serve --scheduler` reads, as any Dask client (dotted keys: a nested dict would replace
        # the whole of distributed.comm, timeouts included)
        with dask.config.set(dotted(config)):
            executor = ng.Executor(build_registry([], load_library(BUILTIN)), settings=settings_in(tmp_path))
            runner = DaskRunner.connect(address, executor)
            try:
                result = runner.run(executor.compile(text_to_image(seed=4, steps=2)), run_id="over-tls")
                assert result.status == "success"
                assert (tmp_path / "output" / result.ui["7"]["images"][0]["filename"]).is_file()
                assert all(address.startswith("tls://") for address in runner.workers())
            finally:
                runner.close()
        # someone else's certificate: the handshake fails
        with pytest.raises((OSError, TimeoutError)):
            distributed.Client(address, security=Security.temporary(), timeout="3s")
    finally:
        for proc in processes:
            proc.terminate()
            proc.wait(20)
