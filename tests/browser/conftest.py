"""Browser tests: a real ``nodegraph serve`` with tiny random models, driven through Debian's chromium.

The server runs in a subprocess for the whole session, with the test node package in ``nodepkg/`` (an image
source that needs no model, a node that always fails, a node with every widget kind). Each test gets a fresh
browser context (empty localStorage, so the page starts from the default example) and leaves a screenshot in
``$NODEGRAPH_ARTIFACTS`` (or the test's tmp_path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..serving import running_server

CHROMIUM = os.environ.get("NODEGRAPH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
HERE = Path(__file__).resolve().parent
VIEWPORT = {"width": 1280, "height": 800}


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
    with running_server(server_dirs, "--node-path", str(HERE / "nodepkg")) as url:
        yield url


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
    # predicates are functions, never bare expressions: polling those uses eval, which the page's CSP refuses
    page.wait_for_function("() => window.nodegraph && document.body.classList.contains('ready')")
    page.base_url = server
    page.js_errors = errors
    yield page
    try:
        page.screenshot(path=str(artifacts / f"{request.node.name}.png"))
    finally:
        context.close()
    assert not errors, errors
