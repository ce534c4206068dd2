"""The model budget on real (tiny) models: the result cache counts a checkpoint's weights once however many handles
share them, evicts the least recently used checkpoint when a budget for one is exceeded, and POST /free gives the
memory back."""

from __future__ import annotations

import gc
import os
import weakref

import psutil
import pytest

import nodegraph as ng
from nodegraph import Link as L
from nodegraph.cache import estimate_nbytes
from nodegraph.history import History
from nodegraph.library import load_library
from nodegraph.server import ServerConfig, create_app
from nodes.testing.tiny import build_tiny_sd
from nodes.testing.tiny_adapters import write_tiny_lora

from .conftest import EXACT


@pytest.fixture(scope="module")
def budget_models(tmp_path_factory):
    """A models folder of its own: two tiny LCM checkpoints of one size, and a LoRA for them."""
    root = tmp_path_factory.mktemp("budget-models")
    build_tiny_sd(root / "checkpoints" / "a", lcm=True, seed=0)
    build_tiny_sd(root / "checkpoints" / "b", lcm=True, seed=1)
    executor = ng.Executor(ng.build_registry(), settings=ng.Settings(**EXACT, models_dir=root))
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt="a")
    wf.outputs = ["ckpt"]
    result = executor.run(wf)
    write_tiny_lora(result.output("ckpt", "model").unet, result.output("ckpt", "clip").text_encoder,
                    root / "loras" / "style.safetensors", rank=4, seed=3)
    return root


@pytest.fixture
def settings(budget_models, tmp_path):
    return ng.Settings(**EXACT, models_dir=budget_models, output_dir=tmp_path / "out", temp_dir=tmp_path / "temp")


def graph(ckpt="a", *, seed=0, prompt="a red circle", lora=False) -> ng.Workflow:
    """Text to image; with ``lora``, through LoRAStack and FreeU, two handles on the checkpoint's weights."""
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt=ckpt)
    model, clip = L("ckpt", "model"), L("ckpt", "clip")
    if lora:
        wf.add("lora", "LoRAStack", model=model, clip=clip,
               loras=[{"lora": "style.safetensors", "strength_model": 0.8, "strength_clip": 0.5}])
        wf.add("freeu", "FreeU", model=L("lora", "model"))
        model, clip = L("freeu", "model"), L("lora", "clip")
    wf.add("pos", "CLIPEncode", clip=clip, text=prompt)
    wf.add("sched", "LCMScheduler", model=model, steps=2)
    wf.add("latent", "EmptyLatent", width=64, height=64, vae=L("ckpt", "vae"))
    wf.add("sample", "LCMSampler", model=model, positive=L("pos", "conditioning"), latent=L("latent", "latent"),
           schedule=L("sched", "schedule"), seed=seed, guidance=2.0)
    wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample", "latent"))
    wf.outputs = ["decode"]
    return wf


def run(executor, wf) -> ng.RunResult:
    result = executor.run(wf)
    assert result.status == "success", result.errors
    return result


def checkpoint_bytes(result) -> int:
    return estimate_nbytes(tuple(result.output("ckpt", name) for name in ("model", "clip", "vae")))


def test_handles_on_a_checkpoint_count_its_weights_once_and_never_copy_them(settings):
    executor = ng.Executor(ng.build_registry(), settings=settings)
    result = run(executor, graph(lora=True))
    weights = checkpoint_bytes(result)
    base, patched = result.output("ckpt", "model"), result.output("freeu", "model")
    assert patched.unet is base.unet and len(patched.patches) == 2  # the LoRA and FreeU ride on the same UNet
    assert result.output("lora", "clip").text_encoder is result.output("ckpt", "clip").text_encoder
    stats = executor.cache.stats()
    # LoRAStack and FreeU hold the UNet again, the conditioning holds the text encoder: all counted once
    assert stats["shared_bytes"] > 2 * estimate_nbytes(base)
    assert weights < stats["bytes"] < weights + 512 * 1024  # the rest: the LoRA's factors, latents, an image
    assert stats["model_entries"] == 3 and stats["model_bytes"] <= stats["bytes"]

    rerun = run(executor, graph(lora=True, seed=1, prompt="a blue square"))
    assert rerun.nodes["ckpt"].status == "cached" and rerun.output("freeu", "model").unet is base.unet


def test_under_a_budget_for_one_checkpoint_the_least_recently_used_is_unloaded(settings):
    probe = ng.Executor(ng.build_registry(), settings=settings)
    run(probe, graph("a"))
    one = probe.cache.nbytes  # a checkpoint and one run's results
    executor = ng.Executor(ng.build_registry(), cache=ng.ResultCache(max_bytes=int(one * 1.5)), settings=settings)

    first = run(executor, graph("a"))
    unet_a = weakref.ref(first.output("ckpt", "model").unet)
    del first
    assert run(executor, graph("a", seed=1)).nodes["ckpt"].status == "cached"  # a new seed: the model stays
    assert executor.cache.nbytes <= one * 1.5

    second = run(executor, graph("b"))
    assert second.nodes["ckpt"].status == "ran"
    del second
    gc.collect()
    assert unet_a() is None  # loading b unloaded a: nothing holds its weights any more
    assert executor.cache.nbytes <= one * 1.5

    again = run(executor, graph("a", seed=2))
    assert again.nodes["ckpt"].status == "ran"  # loaded again
    assert run(executor, graph("b", seed=3)).nodes["ckpt"].status == "ran"


def _rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


async def test_free_unloads_the_models_and_the_memory_goes_back(aiohttp_client, settings, tmp_path):
    executor = ng.Executor(ng.build_registry(), settings=settings)
    app = create_app(executor, ServerConfig(), History(tmp_path / "history.sqlite3"), load_library())
    client = await aiohttp_client(app)
    result = run(executor, graph("a", lora=True))
    model, clip, vae = (result.output("ckpt", n) for n in ("model", "clip", "vae"))
    refs = [weakref.ref(m) for m in (model.unet, clip.text_encoder, vae.vae)]
    weights = checkpoint_bytes(result)
    del result, model, clip, vae
    gc.collect()
    before = _rss()

    assert (await client.post("/free", json={"unload_models": True, "free_memory": True})).status == 200
    assert len(executor.cache) == 0 and executor.cache.nbytes == 0
    assert all(ref() is None for ref in refs)
    assert before - _rss() > weights // 2  # the process's memory falls back: not kept by the allocator
    stats = await (await client.get("/system_stats")).json()
    assert stats["cache"]["entries"] == 0 and stats["cache"]["model_entries"] == 0
