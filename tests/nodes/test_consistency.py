"""Consistency Models: LoadConsistencyModel -> ConsistencySampler gives ConsistencyModelPipeline's images.

Tiny class-conditional and unconditional models (diffusers' test UNet config) are written as real pipeline folders
into the test models folder's consistency_models/; the reference is the pipeline loaded from the same folder.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L
from nodes.images import read_workflow_from_png
from nodes.testing.tiny_families import build_tiny_consistency

from .conftest import generator, max_diff

IMAGENET, BEDROOM = "tiny-cm-imagenet", "tiny-cm-bedroom"  # class-conditional (1000 classes), unconditional
TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def cm_models(models_root):
    """The tiny consistency models, and two Stable Diffusion checkpoints put in their folder by mistake."""
    folder = models_root / "consistency_models"
    build_tiny_consistency(folder / IMAGENET, num_classes=1000, seed=40)
    build_tiny_consistency(folder / BEDROOM, num_classes=None, seed=41)
    sd = models_root / "checkpoints" / "tiny-sd"
    shutil.copytree(sd, folder / "mistakes" / "sd-pipeline", dirs_exist_ok=True)
    shutil.copytree(sd / "unet", folder / "mistakes" / "sd-unet" / "unet", dirs_exist_ok=True)
    shutil.copytree(sd / "scheduler", folder / "mistakes" / "sd-unet" / "scheduler", dirs_exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def cm_pipelines(cm_models):
    from diffusers import ConsistencyModelPipeline

    pipes = {name: ConsistencyModelPipeline.from_pretrained(cm_models / name, local_files_only=True)
             for name in (IMAGENET, BEDROOM)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def sampler_graph(model: str, **inputs) -> ng.Workflow:
    wf = ng.Workflow()
    wf.add("load", "LoadConsistencyModel", model=model)
    wf.add("sample", "ConsistencySampler", model=L("load", "model"), **inputs)
    return wf


def generate(executor, model: str, **inputs) -> torch.Tensor:
    result = executor.run(sampler_graph(model, **inputs), outputs=["sample"])
    assert result.status == "success", result.errors or result.nodes
    return result.output("sample", "image")


def pipeline_image(pipe, seed: int, **kwargs) -> torch.Tensor:
    """The pipeline's ``output_type="pt"`` image in IMAGE's layout. Without class labels, a class-conditional
    pipeline draws them from torch's global generator: seeded with ``seed`` here (and restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = pipe(generator=generator(seed), output_type="pt", **kwargs).images
    return images.permute(0, 2, 3, 1)


# (model, seed, node inputs, pipeline arguments)
CASES = {
    "one step, a class": (IMAGENET, 0, dict(class_label=0), dict(num_inference_steps=1, class_labels=0)),
    "timesteps 22, 0": (IMAGENET, 1, dict(timesteps="22, 0", class_label=145),
                        dict(num_inference_steps=None, timesteps=[22, 0], class_labels=145)),
    "timesteps 17, 0": (IMAGENET, 2, dict(timesteps="17, 0", class_label=3),
                        dict(num_inference_steps=None, timesteps=[17, 0], class_labels=3)),
    "two steps": (IMAGENET, 3, dict(steps=2, class_label=999), dict(num_inference_steps=2, class_labels=999)),
    "batch of 2, one class": (IMAGENET, 4, dict(batch=2, timesteps="22, 0", class_label=7),
                              dict(batch_size=2, num_inference_steps=None, timesteps=[22, 0], class_labels=[7, 7])),
    "random classes": (IMAGENET, 5, dict(batch=2), dict(batch_size=2, num_inference_steps=1)),
    "random class, two steps": (IMAGENET, 6, dict(timesteps="22, 0"),
                                dict(num_inference_steps=None, timesteps=[22, 0])),
    "unconditional": (BEDROOM, 7, dict(), dict(num_inference_steps=1)),
    "unconditional, 17, 0, batch of 2": (BEDROOM, 8, dict(batch=2, timesteps="17, 0"),
                                         dict(batch_size=2, num_inference_steps=None, timesteps=[17, 0])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_sampler_gives_the_pipelines_image(executor, cm_pipelines, case):
    model, seed, inputs, reference = CASES[case]
    ours = generate(executor, model, seed=seed, **inputs)
    theirs = pipeline_image(cm_pipelines[model], seed, **reference)
    assert ours.shape == theirs.shape == (inputs.get("batch", 1), 32, 32, 3)
    assert ours.dtype == torch.float32 and 0 <= ours.min() and ours.max() <= 1
    assert ours.std() > 0.05  # a real picture, not one clamped flat
    assert max_diff(ours, theirs) <= TOLERANCE


def test_random_classes_come_from_the_seed_not_from_torchs_global_generator(executor, cm_models, cm_pipelines):
    torch.manual_seed(123)
    first = generate(executor, IMAGENET, seed=5, batch=4)
    executor.cache.clear()
    torch.manual_seed(456)
    assert torch.equal(generate(executor, IMAGENET, seed=5, batch=4), first)
    executor.cache.clear()
    assert not torch.equal(generate(executor, IMAGENET, seed=6, batch=4), first)
    # and they are drawn per image: a batch of one label per image, not one label for all
    labels = torch.randint(0, 1000, (4,), generator=generator(5)).tolist()
    per_image = pipeline_image(cm_pipelines[IMAGENET], 5, batch_size=4, num_inference_steps=1, class_labels=labels)
    assert len(set(labels)) > 1 and max_diff(first, per_image) <= TOLERANCE


def test_the_loader_lists_consistency_models_only(settings, cm_models):
    from nodes.consistency import CONSISTENCY

    names = CONSISTENCY.names(settings)  # other tests may add models of their own to the shared folder
    assert {BEDROOM, IMAGENET} <= set(names) and not [n for n in names if n.startswith("mistakes/")]
    from nodegraph.folders import folders_of

    assert folders_of(ng.build_registry())["consistency_models"] is CONSISTENCY  # so /models lists it


def test_the_loader_gives_the_unet_its_classes_and_scheduler_config(executor, cm_models):
    result = executor.run(sampler_graph(IMAGENET), outputs=["load"])
    model = result.output("load", "model")
    assert model.num_classes == 1000 and model.name == IMAGENET
    assert type(model.unet).__name__ == "UNet2DModel" and not model.unet.training
    assert not any(p.requires_grad for p in model.unet.parameters()) and model.dtype == torch.float32
    assert model.scheduler_config["num_train_timesteps"] == 40 and model.scheduler_config["sigma_max"] == 80.0
    bedroom = executor.run(sampler_graph(BEDROOM), outputs=["load"]).output("load", "model")
    assert bedroom.num_classes is None


@pytest.mark.parametrize("mistake", ["mistakes/sd-pipeline", "mistakes/sd-unet"])
def test_a_stable_diffusion_checkpoint_is_refused_naming_both_families(executor, cm_models, mistake):
    result = executor.run(sampler_graph(mistake), outputs=["load"])
    assert result.nodes["load"].status == "failed"
    message = result.nodes["load"].error["message"]
    assert "a Stable Diffusion checkpoint" in message and "not a Consistency Model" in message
    assert "LoadCheckpoint" in message and "ConsistencyModelPipeline" in message


def test_a_missing_model_says_which_folder_it_is_read_from(executor, cm_models):
    expected = f"consistency models (diffusers folders) are read from {cm_models}"
    try:
        result = executor.run(sampler_graph("diffusers-cd_imagenet64_l2"), outputs=["sample"])
    except ng.ValidationFailed as exc:
        [error] = exc.errors
        assert error.node_id == "load" and "is not one of the choices" in error.message
        assert expected in error.message
        return
    pytest.fail(f"validation let a missing model through: {result.nodes}")


@pytest.mark.parametrize("model, inputs, fragment", [
    (IMAGENET, dict(class_label=1000), "class_label 1000 is out of range: 'tiny-cm-imagenet' has 1000 classes"),
    (BEDROOM, dict(class_label=3), "'tiny-cm-bedroom' is unconditional: it takes no class label"),
    (IMAGENET, dict(timesteps="0, 22"), "strictly descending"),
    (IMAGENET, dict(timesteps="40, 0"), "timesteps must be below 40"),
    (IMAGENET, dict(timesteps="twenty"), "whole numbers"),
    (IMAGENET, dict(steps=41), "trained with 40 timesteps"),
])
def test_bad_sampler_input_is_a_clear_error_on_the_sampler(executor, cm_models, model, inputs, fragment):
    result = executor.run(sampler_graph(model, **inputs), outputs=["sample"])
    assert result.nodes["sample"].status == "failed", result.nodes
    assert fragment in result.nodes["sample"].error["message"]


def test_progress_is_reported_per_step(executor, cm_models):
    seen = []
    executor.events.subscribe(lambda e: seen.append((e.data["value"], e.data["max"]))
                              if e.type == "node_progress" and e.node_id == "sample" else None)
    generate(executor, IMAGENET, timesteps="22, 10, 0", class_label=1)
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_the_imagenet64_example_runs_on_the_tiny_model(executor, cm_models, cm_pipelines):
    from nodegraph.assets import workflows_dir

    wf = ng.load(workflows_dir() / "consistency-imagenet64.json")
    wf.set("1", "model", IMAGENET)
    result = executor.run(wf)
    assert result.status == "success", result.errors or result.nodes
    [saved] = result.ui["3"]["images"]
    png = executor.output_dir / saved["subfolder"] / saved["filename"]
    assert read_workflow_from_png(png) == wf.to_json()
    reference = cm_pipelines[IMAGENET](num_inference_steps=None, timesteps=[22, 0], class_labels=145,
                                       generator=generator(0)).images[0]
    with Image.open(png) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(reference))


def test_in_the_cpus_fast_layout_the_unet_keeps_blocked_weights_and_draws_the_same(settings, cm_models,
                                                                                      monkeypatch):
    from nodes import fastpaths

    if not fastpaths.packing_works(torch.bfloat16):
        pytest.skip("this build or CPU has no blocked bfloat16 convolutions")
    images = {}
    for packing in (True, False):
        if not packing:
            monkeypatch.setattr(fastpaths, "pack", lambda module, now=False: 0)
        fast = settings.replace(dtype="bfloat16", memory_format="auto")
        result = ng.Executor(ng.build_registry(), settings=fast).run(sampler_graph(BEDROOM, seed=3),
                                                                     outputs=["sample", "load"])
        unet = result.output("load", "model").unet
        blocked = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.layout != torch.strided]
        assert bool(blocked) is packing
        images[packing] = torch.as_tensor(result.output("sample", "image"))
    assert torch.equal(images[True], images[False])
