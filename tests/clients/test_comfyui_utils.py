"""comfyui-utils (``ComfyAPI``), unchanged, against ``nodegraph serve``: it posts the prompt as bytes
(application/octet-stream), reads node ids of ``executing`` as integers, ends on the first ``executed`` of its prompt,
finds an already finished prompt in ``/history`` by comparing the prompt it sent with the one stored, and fetches
the file with ``/view``."""

from __future__ import annotations

import pytest

from . import prompts
from .conftest import decoded, is_square

utils = pytest.importorskip("comfyui_utils.comfy")


class Recorder(utils.Callbacks):
    def __init__(self):
        self.positions, self.progress, self.outputs = [], [], []

    async def queue_position(self, position):
        self.positions.append(position)

    async def in_progress(self, node_id, progress, total):
        self.progress.append((node_id, progress, total))

    async def completed(self, outputs, cached):
        self.outputs.append((outputs, cached))


async def test_a_prompt_is_submitted_followed_and_its_image_fetched(server):
    api = utils.ComfyAPI(server.removeprefix("http://"))
    heard = Recorder()
    await api.submit(prompts.text_to_image("comfyui-utils"), heard)
    [(outputs, cached)] = heard.outputs
    [image] = outputs["images"]
    # the client only names nodes it knows: every node id it heard is one it sent
    assert {node for node, _, _ in heard.progress} <= {3, 4, 5, 6, 7, 8, 9}
    got = []

    async def keep(data):
        got.append(data.read())

    await api.fetch(image, keep)
    assert is_square(decoded(got[0]))


async def test_a_prompt_that_already_ran_is_found_in_the_history(server):
    """The same prompt again: every node's result is cached, so the run may be over before the client listens; it
    then looks the prompt up in /history by its content."""
    api = utils.ComfyAPI(server.removeprefix("http://"))
    prompt = prompts.text_to_image("comfyui-utils-again")
    await api.submit(prompt, Recorder())
    heard = Recorder()
    await api.submit(prompt, heard)
    [(outputs, _)] = heard.outputs
    assert outputs["images"][0]["filename"].startswith("comfyui-utils-again")
