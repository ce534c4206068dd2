"""Load and soak, shortened: a real ``nodegraph serve`` on the demo model and several ComfyUI clients at once, each on
its own websocket, with invalid and cancelled prompts mixed in. ``benchmarks/soak_server.py`` runs the same driver
(``tests.serving.soak``) at full size (200 prompts from 20 clients) and prints its table."""

from __future__ import annotations

import json
import urllib.request

import pytest

from ..serving import running_server, soak

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    dirs = {name: root / name for name in ("models", "input", "output", "data", "temp")}
    for path in dirs.values():
        path.mkdir()
    with running_server(dirs, probe="/system_stats") as url:
        yield url


@pytest.fixture(scope="module")
def result(server):
    import asyncio

    return asyncio.run(soak(server, clients=4, prompts=5, invalid=1, cancelled=1, timeout=240))


def test_every_valid_prompt_completes_with_its_images_and_none_is_lost(result):
    assert result.lost == []
    assert result.failures == []
    assert result.count("valid", "success") == result.count("valid") == 12


def test_invalid_prompts_are_refused_with_their_node_errors(result):
    refused = [p.refused for p in result.prompts if p.kind == "invalid"]
    assert len(refused) == 4 and all(r is not None for r in refused)
    assert {node for r in refused for node in r["node_errors"]} <= {"3", "5"}


def test_cancelled_prompts_are_deleted_or_interrupted_and_only_they(result):
    cancelled = [p for p in result.prompts if p.kind in ("delete", "interrupt")]
    assert len(cancelled) == 4
    assert all(p.end in ("deleted", "interrupted", "success") for p in cancelled)
    assert all(p.end in ("success", None) for p in result.prompts if p.kind == "valid")


def test_each_client_hears_its_prompts_end_in_the_order_it_sent_them(result):
    assert result.order_errors == []


def test_each_client_hears_only_of_its_own_prompts(result):
    assert result.messages > 0
    assert result.foreign == []


def test_the_server_still_answers_with_an_empty_queue_afterwards(server, result):
    assert result.answers_after
    with urllib.request.urlopen(server + "/queue", timeout=10) as resp:
        assert json.load(resp) == {"queue_running": [], "queue_pending": []}
