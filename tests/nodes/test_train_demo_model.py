"""The demo model's training script runs end to end (a few steps of each stage, small batches) and exports a
folder the ordinary loaders read; the exported teacher is the EMA of the trained weights."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_model.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("export") / "demo"
    threads = torch.get_num_threads()
    try:
        script.main(["--work", str(work), "--out", str(out), "--stages", "vae,teacher,distill,export",
                     "--steps-vae", "2", "--steps-teacher", "3", "--steps-distill", "2",
                     "--batch-vae", "4", "--batch-teacher", "4", "--batch-distill", "4"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    return script, work, out


def test_every_stage_finishes_and_logs(trained):
    _, work, _ = trained
    for stage, steps in (("vae", 2), ("teacher", 3), ("distill", 2)):
        state = torch.load(work / f"{stage}.pt", weights_only=False)
        assert state["finished"] and state["step"] == steps, stage
    log = (work / "train.log").read_text()
    assert "teacher: done, 3 steps" in log and "all requested stages finished" in log
    info = json.loads((work / "export_info.json").read_text())
    assert (info["vae_steps"], info["teacher_steps"], info["distill_steps"]) == (2, 3, 2)


def test_the_export_loads_in_diffusers_and_in_a_graph(trained, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    import nodegraph as ng

    from .test_parity import graph, ours

    script, _, out = trained
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, local_files_only=True)
    down, up = script.ATTENTION[script.UNET_ATTENTION]
    assert list(pipe.unet.config.down_block_types) == list(down) and pipe.unet.config.time_cond_proj_dim == 64
    teacher = json.loads((out / "teacher_unet" / "config.json").read_text())
    assert teacher["time_cond_proj_dim"] is None and teacher["up_block_types"] == list(up)

    models = tmp_path / "models"
    shutil.copytree(out, models / "checkpoints" / "trained")  # a symbolic link out of the folder is refused
    executor = ng.Executor(ng.build_registry(), settings=ng.Settings(models_dir=models, output_dir=tmp_path / "out"))
    image = ours(executor, graph("trained", "a red circle on a blue background", steps=2, guidance=3.0))
    assert image.shape == (1, 64, 64, 3)


def test_the_exported_teacher_is_the_ema_of_the_trained_weights(trained):
    from safetensors.torch import load_file

    _, work, out = trained
    state = torch.load(work / "teacher.pt", weights_only=False)
    assert state["ema"]
    exported = load_file(out / "teacher_unet" / "diffusion_pytorch_model.safetensors")
    name = "conv_in.weight"
    assert torch.equal(exported[name], state["ema_unet"][name].to(torch.float16))
    assert not torch.equal(state["ema_unet"][name], state["unet"][name])  # the average lags the raw weights
