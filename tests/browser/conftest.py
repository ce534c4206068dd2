"""Browser tests: a real ``nodegraph serve`` with tiny random models, driven through Debian's chromium.

The server runs in a subprocess for the whole session, with the test node package in ``nodepkg/`` (an image
source that needs no model, a node that always fails, a node with every widget kind). Each test gets a fresh
browser context (empty localStorage, so the page starts from the default example) and leaves a screenshot in
``$NODEGRAPH_ARTIFACTS`` (or the test's tmp_path).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NODEGRAPH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VIEWPORT = {"width": 1280, "height": 800}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sync_playwright_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set NODEGRAPH_CHROMIUM)")
    return sync_playwright


@pytest.fixture(scope="package")
def server_dirs(tmp_path_factory, sync_playwright_or_skip) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server")
    dirs = {name: root / name for name in ("models", "input", "output", "data", "temp")}
    for path in dirs.values():
        path.mkdir()
    from nodes.testing.tiny import build_tiny_sd

    build_tiny_sd(dirs["models"] / "checkpoints" / "tiny-lcm", lcm=True)
    return dirs


@pytest.fixture(scope="package")
def server(server_dirs) -> str:
    port = _free_port()
    env = {**os.environ, "NODEGRAPH_TEMP": str(server_dirs["temp"]), "HF_HUB_OFFLINE": "1"}
    log = open(server_dirs["data"] / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodegraph", "serve", "--port", str(port), "--models", str(server_dirs["models"]),
         "--input", str(server_dirs["input"]), "--output", str(server_dirs["output"]), "--data",
         str(server_dirs["data"]), "--node-path", str(HERE / "nodepkg"), "--device", "cpu"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/object_info", timeout=5) as resp:
                json.load(resp)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                raise RuntimeError("the server did not start:\n" + (server_dirs["data"] / "server.log").read_text())
            time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="package")
def browser(sync_playwright_or_skip):
    with sync_playwright_or_skip() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def artifacts(request, tmp_path) -> Path:
    folder = Path(os.environ.get("NODEGRAPH_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, server, artifacts, request):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # failed requests (a 400 from an invalid prompt, say) are logged by the browser too: those are expected
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    page.goto(server + "/")
    page.wait_for_function("window.nodegraph && document.body.classList.contains('ready')")
    page.base_url = server
    page.js_errors = errors
    yield page
    try:
        page.screenshot(path=str(artifacts / f"{request.node.name}.png"))
    finally:
        context.close()
    assert not errors, errors
