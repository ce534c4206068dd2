"""Tests for the embedded demo model: the shapes dataset, its judge, and the shipped diffusers folder."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest

from nodes.demo import shapes

DEMO_DIR = Path(__file__).resolve().parents[2] / "nodes" / "data" / "demo"
#: 4-step LCM samples of N_CAPTIONS seen captions: at least MIN_CORRECT judged fully correct and
#: MIN_COLOURS with shape and background colour right. benchmarks/demo_quality.py measures the model on
#: 200 captions (4-step, guidance 3: 84% fully correct); on these 16 it gives 14 correct, 15 with both colours
#: right. The thresholds leave room for float rounding on other machines and catch a broken model or loader.
N_CAPTIONS = 16
MIN_CORRECT = 10
MIN_COLOURS = 12


def test_captions_round_trip():
    for combo in shapes.all_combos():
        assert shapes.parse_caption(shapes.caption(*combo)) == combo
    assert shapes.caption("square", "orange", "white") == "an orange square on a white background"
    with pytest.raises(ValueError):
        shapes.parse_caption("a photo of a cat")
    with pytest.raises(ValueError):
        shapes.parse_caption("a pink circle on a blue background")


def test_held_out_never_sampled():
    assert len(shapes.HELD_OUT) == 12 and len(set(shapes.HELD_OUT)) == 12
    assert set(shapes.HELD_OUT) <= set(shapes.all_combos())
    _, captions = shapes.sample_batch(np.random.default_rng(0), 2000)
    seen = {shapes.parse_caption(c) for c in captions}
    assert not seen & set(shapes.HELD_OUT)
    assert len(seen) == len(shapes.train_combos())  # every other triple occurs


def test_sampler_is_seeded():
    a, ca = shapes.sample_batch(np.random.default_rng([3, 1]), 8)
    b, cb = shapes.sample_batch(np.random.default_rng([3, 1]), 8)
    assert ca == cb and np.array_equal(a, b)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8


def test_judge_scores_dataset_images_perfectly():
    rng = np.random.default_rng(42)
    images, captions = shapes.sample_batch(rng, 60)
    held, held_captions = shapes.sample_batch(rng, 40, shapes.HELD_OUT)
    for image, text in zip([*images, *held], [*captions, *held_captions]):
        assert shapes.judge(image, text) == {"shape": True, "colour": True, "background": True, "correct": True}


def test_judge_rejects_wrong_captions():
    image = shapes.render("circle", "red", "blue", 10, 12, 30)
    assert shapes.judge(image, "a red square on a blue background") == {
        "shape": False, "colour": True, "background": True, "correct": False}
    assert not shapes.judge(image, "a green circle on a blue background")["colour"]
    assert not shapes.judge(image, "a red circle on a white background")["background"]
    blank = np.zeros((64, 64, 3), np.uint8)
    assert shapes.judge(blank, "a white circle on a black background") == {
        "shape": False, "colour": False, "background": True, "correct": False}


def test_judge_accepts_pil():
    from PIL import Image

    image = shapes.render("triangle", "yellow", "purple", 5, 20, 36)
    assert shapes.judge(Image.fromarray(image), "a yellow triangle on a purple background")["correct"]


# --------------------------------------------------------------------------------------------
# The shipped model
# --------------------------------------------------------------------------------------------


def test_demo_folder_layout_and_size():
    for sub in ("unet", "teacher_unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (DEMO_DIR / sub).is_dir(), sub
    assert json.loads((DEMO_DIR / "model_index.json").read_text())["_class_name"] == "LatentConsistencyModelPipeline"
    assert (DEMO_DIR / "MODEL_CARD.md").is_file()
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*.safetensors"))
    assert total <= 15_000_000
    unet = json.loads((DEMO_DIR / "unet" / "config.json").read_text())
    teacher = json.loads((DEMO_DIR / "teacher_unet" / "config.json").read_text())
    vae = json.loads((DEMO_DIR / "vae" / "config.json").read_text())
    assert unet["time_cond_proj_dim"] and teacher["time_cond_proj_dim"] is None
    assert len(vae["block_out_channels"]) == 3 and vae["latent_channels"] == 4  # 4x downscale: 16x16 latents
    assert unet["sample_size"] == 16 and vae["scaling_factor"] != 0.18215
    scheduler = json.loads((DEMO_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50
    # Text-encoder weights in the text_model.* layout (what transformers 4 and SD checkpoints use).
    from safetensors import safe_open

    with safe_open(DEMO_DIR / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())


@pytest.fixture(scope="module")
def demo_pipeline():
    import torch
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(DEMO_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    return pipe


def test_demo_lcm_draws_the_captions(demo_pipeline):
    """4-step samples of 16 seen captions (seed i for caption i): enough of them judged correct."""
    import torch

    combos = shapes.train_combos()[::10][:N_CAPTIONS]
    prompts = [shapes.caption(*c) for c in combos]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = demo_pipeline(prompts, num_inference_steps=4, guidance_scale=3.0, generator=gens).images
    assert images[0].size == (64, 64)  # default size from the configs: sample_size 16 x VAE scale 4
    verdicts = [shapes.judge(img, text) for img, text in zip(images, prompts)]
    correct = sum(v["correct"] for v in verdicts)
    colours = sum(v["colour"] and v["background"] for v in verdicts)
    assert correct >= MIN_CORRECT, f"{correct}/{len(prompts)} fully correct"
    assert colours >= MIN_COLOURS, f"{colours}/{len(prompts)} with both colours right"
