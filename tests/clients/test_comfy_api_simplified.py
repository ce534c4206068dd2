"""comfy-api-simplified (``ComfyApiWrapper``), unchanged, against ``nodegraph serve``: it posts prompts as bytes with
no Content-Type, connects its websocket after queueing and ends on ``executing(null)`` or an empty queue, reads
``/history/{id}`` at once, fetches images with ``/view``, and uploads with no declared type into a subfolder."""

from __future__ import annotations

import pytest

from . import prompts
from .conftest import decoded, is_square

simplified = pytest.importorskip("comfy_api_simplified")


@pytest.fixture
def api(server):
    return simplified.ComfyApiWrapper(server)


def test_a_prompt_is_queued_waited_for_and_its_image_fetched(api):
    workflow = simplified.ComfyWorkflowWrapper(prompts.text_to_image("simplified"))
    images = api.queue_and_wait_images(workflow, prompts.SAVE_TITLE)
    [(name, data)] = images.items()
    assert name.startswith("simplified") and name.endswith(".png")
    assert is_square(decoded(data))


def test_the_workflow_wrapper_edits_a_prompt_by_title_and_the_change_is_run(api):
    workflow = simplified.ComfyWorkflowWrapper(prompts.text_to_image("simplified-seed"))
    workflow.set_node_param("KSampler", "seed", 8)
    first = next(iter(api.queue_and_wait_images(workflow, prompts.SAVE_TITLE).values()))
    workflow.set_node_param("KSampler", "seed", 9)
    second = next(iter(api.queue_and_wait_images(workflow, prompts.SAVE_TITLE).values()))
    assert decoded(first).tobytes() != decoded(second).tobytes()


def test_an_uploaded_image_in_a_subfolder_feeds_an_image_to_image_prompt(api, source_png, server_dirs):
    uploaded = api.upload_image(source_png, subfolder="simplified-uploads")
    assert uploaded == {"name": "halves.png", "subfolder": "simplified-uploads", "type": "input"}
    assert (server_dirs["input"] / "simplified-uploads" / "halves.png").read_bytes() == source_png.read_bytes()
    image = f"{uploaded['subfolder']}/{uploaded['name']}"
    images = api.queue_and_wait_images(prompts.image_to_image(image, "simplified-img2img"), prompts.SAVE_TITLE)
    [(name, data)] = images.items()
    result = decoded(data).convert("RGB")
    assert result.size == (64, 64)
    # at denoise 0.6 the picture still shows through: red on the left, blue on the right
    left, right = result.getpixel((8, 32)), result.getpixel((56, 32))
    assert left[0] > left[2] and right[2] > right[0], (left, right)


def test_queue_history_object_info_and_system_stats_answer_its_calls(api):
    prompt_id = api.queue_prompt(prompts.text_to_image("simplified-queue"))["prompt_id"]
    assert isinstance(api.get_queue()["queue_pending"], list)
    assert "LoadCheckpoint" in api.get_object_info()
    assert api.get_system_stats()["system"]["python_version"]
    api.interrupt()
    assert isinstance(api.get_history(prompt_id), dict)
