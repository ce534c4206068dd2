"""comfykit (``ComfyKit``), unchanged, against ``nodegraph serve``: it runs API-format workflow files whose node
titles carry its parameter markers, uploads a local picture for a LoadImage titled ``$~image!`` (with the type
guessed from its name), waits on the websocket (connected before it queues) for ``executing(null)``, and answers
``/view`` URLs, which its own downloader fetches."""

from __future__ import annotations

import json

import pytest

from . import prompts
from .conftest import decoded, is_square

comfykit = pytest.importorskip("comfykit")
from comfykit.utils.file_util import download_files  # noqa: E402  (after the skip)


@pytest.fixture
def kit(server):
    # no kit.close(): in 0.1.12 it calls a close() its local executors lack (they open a session per request)
    return comfykit.ComfyKit(comfyui_url=server, executor_type="websocket")


def workflow_file(tmp_path, prompt, name="workflow.json"):
    path = tmp_path / name
    path.write_text(json.dumps(prompt))
    return path


async def fetch_one(result) -> bytes:
    assert result.status == "completed", result.msg
    [url] = result.images
    async with download_files(url) as path:
        with open(path, "rb") as f:
            return f.read()


async def test_a_workflow_file_runs_with_its_parameters_and_its_image_is_fetched(kit, tmp_path):
    prompt = prompts.text_to_image("comfykit")
    prompt["6"]["_meta"]["title"] = "Positive, $prompt.text!"
    prompt["3"]["_meta"]["title"] = "KSampler, $seed"
    result = await kit.execute(workflow_file(tmp_path, prompt), {"prompt": "a blue square", "seed": 3})
    data = await fetch_one(result)
    assert is_square(decoded(data))
    assert list(result.images_by_var) == ["9"]


async def test_a_local_picture_is_uploaded_and_run_image_to_image(kit, tmp_path, source_png, server_dirs):
    prompt = prompts.image_to_image("placeholder.png", "comfykit-img2img", load_title="Picture, $~image!")
    result = await kit.execute(workflow_file(tmp_path, prompt), {"image": str(source_png)})
    data = await fetch_one(result)
    assert (server_dirs["input"] / source_png.name).is_file()
    result_image = decoded(data).convert("RGB")
    left, right = result_image.getpixel((8, 32)), result_image.getpixel((56, 32))
    assert left[0] > left[2] and right[2] > right[0], (left, right)


async def test_the_http_executor_polls_the_history_to_the_same_end(server, tmp_path):
    kit = comfykit.ComfyKit(comfyui_url=server, executor_type="http")
    result = await kit.execute(workflow_file(tmp_path, prompts.text_to_image("comfykit-http")))
    data = await fetch_one(result)
    assert is_square(decoded(data))
