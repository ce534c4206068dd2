"""AnimateDiff: a motion module on an SD model, videos through the shared samplers, animated files; the frames match
diffusers' AnimateDiffPipeline (DDIM, Euler, LCM) on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L

from .conftest import generator, in_maps_of, max_diff, spy_reads
from .test_parity import ours

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def motion_models(models_root):
    from nodes.testing.tiny_adapters import build_tiny_motion_adapter

    folder = models_root / "animatediff_models" / "tiny-motion"
    if not folder.exists():
        build_tiny_motion_adapter(models_root / "checkpoints" / "tiny-sd" / "unet", folder, seed=5)
    return models_root


@pytest.fixture(scope="module")
def reference(motion_models, pipelines):
    """make(scheduler) -> AnimateDiffPipeline over the tiny SD model's components and the tiny motion module."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    adapter = MotionAdapter.from_pretrained(motion_models / "animatediff_models" / "tiny-motion",
                                            local_files_only=True)
    sd = pipelines["sd"]

    def make(scheduler):
        pipe = AnimateDiffPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   motion_adapter=adapter, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def video_graph(*, sampler="ddim", steps=3, guidance=7.5, seed=3, frames=8, batch=1, prompt="a red cube",
                negative=None, lcm=False, motion=True) -> ng.Workflow:
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt="tiny-sd")
    model = L("ckpt", "model")
    if motion:
        wf.add("mm", "LoadMotionModule", motion_module="tiny-motion")
        wf.add("anim", "ApplyMotionModule", model=model, motion_module=L("mm", "motion_module"))
        model = L("anim", "model")
    wf.add("pos", "CLIPEncode", clip=L("ckpt", "clip"), text=prompt)
    wf.add("latent", "EmptyLatentVideo", width=64, height=64, frames=frames, batch=batch, vae=L("ckpt", "vae"))
    common = dict(model=model, positive=L("pos", "conditioning"), latent=L("latent", "latent"), seed=seed,
                  guidance=guidance)
    if negative is not None:
        wf.add("neg", "CLIPEncode", clip=L("ckpt", "clip"), text=negative)
        common["negative"] = L("neg", "conditioning")
    if lcm:
        wf.add("sched", "LCMScheduler", model=model, steps=steps)
        wf.add("sample", "LCMSampler", schedule=L("sched", "schedule"), **common)
    else:
        wf.add("sample", "Sampler", steps=steps, sampler=sampler, **common)
    wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample", "latent"))
    wf.outputs = ["decode"]
    return wf


@pytest.mark.parametrize("case", [
    dict(sampler="ddim", guidance=7.5),
    dict(sampler="ddim", guidance=6.0, negative="blurry"),
    dict(sampler="euler", guidance=1.0),
    dict(sampler="dpmpp_2m", guidance=4.0, batch=2),
    dict(sampler="lcm", guidance=1.5, steps=4),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_videos_match_the_animatediff_pipeline(executor, reference, pipelines, case):
    from nodes.schedulers import make_scheduler

    case = {"steps": 3, "batch": 1, "negative": None, **case}
    pipe = reference(make_scheduler(pipelines["sd"].scheduler.config, case["sampler"]))
    # a list of prompts makes a batch of videos (this pipeline does not honour num_videos_per_prompt)
    expected = pipe(["a red cube"] * case["batch"],
                    negative_prompt=None if case["negative"] is None else [case["negative"]] * case["batch"],
                    num_frames=8, num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                    generator=generator(3), height=64, width=64, output_type="np").frames
    got = ours(executor, video_graph(**case))
    assert got.shape == (case["batch"] * 8, 64, 64, 3)
    assert max_diff(got, expected.reshape(got.shape)) <= TOLERANCE


def test_lcm_sampler_animates_as_the_pipeline_with_lcm_scheduler(executor, reference, pipelines):
    """The LCM-LoRA recipe's sampler: LCMSampler over a video, against AnimateDiffPipeline + LCMScheduler."""
    from diffusers import LCMScheduler

    pipe = reference(LCMScheduler.from_config(pipelines["sd"].scheduler.config))
    expected = pipe("a red cube", num_frames=8, num_inference_steps=4, guidance_scale=1.5, generator=generator(3),
                    height=64, width=64, output_type="np").frames
    got = ours(executor, video_graph(lcm=True, steps=4, guidance=1.5))
    assert max_diff(got, expected.reshape(got.shape)) <= TOLERANCE


def test_the_frames_move_and_a_video_needs_a_motion_module(executor, motion_models):
    frames = ours(executor, video_graph())
    assert max_diff(frames[0], frames[-1]) > 1e-4
    result = executor.run(video_graph(motion=False))
    assert "needs a model with a motion module" in result.nodes["sample"].error["message"]
    wf = video_graph()
    wf.add("still", "EmptyLatent", width=64, height=64, vae=L("ckpt", "vae"))
    wf.set("sample", "latent", L("still", "latent"))
    result = executor.run(wf)
    assert "start from EmptyLatentVideo" in result.nodes["sample"].error["message"]


def test_the_checkpoint_model_is_left_as_it_was(executor, motion_models):
    wf = video_graph()
    wf.outputs = ["decode", "ckpt", "anim"]
    result = executor.run(wf)
    assert type(result.output("ckpt", "model").unet).__name__ == "UNet2DConditionModel"
    assert type(result.output("anim", "model").unet).__name__ == "UNetMotionModel"


@pytest.mark.parametrize("built", ["from the same tensors", "copied, then shared"])
def test_the_animated_model_shares_the_checkpoints_weights(executor, motion_models, monkeypatch, built):
    """Built on the meta device and given the checkpoint's and the adapter's very parameters (no copy is ever made),
    or, where they do not map one to one, by diffusers' from_unet2d (a copy) then pointed back at them."""
    from nodes import animatediff

    if built != "from the same tensors":
        monkeypatch.setattr(animatediff, "_animated_unet", lambda *args: None)
    wf = video_graph()
    wf.outputs = ["ckpt", "anim", "mm"]
    result = executor.run(wf)
    base, animated = result.output("ckpt", "model").unet, result.output("anim", "model").unet
    if built == "from the same tensors":
        same = {id(p) for p in animated.parameters()}
        assert all(id(p) in same for p in base.parameters())
        assert all(id(p) in same for p in result.output("mm", "motion_module").adapter.parameters())
    theirs = {p.data_ptr() for p in animated.parameters()}
    assert all(p.data_ptr() in theirs for p in base.parameters())  # no second copy of the checkpoint's UNet
    own = sum(p.numel() for p in animated.parameters() if p.data_ptr() not in {q.data_ptr() for q in base.parameters()})
    motion = sum(p.numel() for n, p in animated.named_parameters() if "motion_modules" in n)
    assert own == motion  # what the animated model adds is its motion module
    adapter = {p.data_ptr() for p in result.output("mm", "motion_module").adapter.parameters()}
    assert all(p.data_ptr() in adapter for n, p in animated.named_parameters() if "motion_modules" in n)  # its own


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_single_file_motion_module_is_read_once_into_the_runs_dtype(motion_models, tmp_path, monkeypatch, dtype):
    from nodes.testing.tiny_adapters import motion_adapter_to_original

    folder = motion_models / "animatediff_models"
    motion_adapter_to_original(folder / "tiny-motion", folder / "mm_tiny_v2.safetensors")
    read = spy_reads(monkeypatch)
    settings = ng.Settings(models_dir=motion_models, dtype=dtype, device="cpu", output_dir=tmp_path)
    wf = ng.Workflow()
    wf.add("mm", "LoadMotionModule", motion_module="mm_tiny_v2.safetensors")
    result = ng.Executor(ng.build_registry(), settings=settings).run(wf, outputs=["mm"])
    assert result.status == "success", result.errors
    adapter = result.output("mm", "motion_module").adapter
    assert read and len(read) == len(set(read))
    assert {p.dtype for p in adapter.parameters()} == {getattr(torch, dtype)}
    assert not any(p.is_meta for p in (*adapter.parameters(), *adapter.buffers()))


@pytest.mark.parametrize("dtype, map_weights", [("float32", None), ("float32", False), ("bfloat16", None)])
def test_a_motion_module_folder_loads_as_checkpoints_do(motion_models, tmp_path, monkeypatch, dtype, map_weights):
    """Streamed tensor by tensor into the run's dtype (each read once), or, used as stored with a guard, kept in
    maps of its file: the weights diffusers' MotionAdapter.from_pretrained gives either way."""
    from diffusers import MotionAdapter

    from nodegraph import filemaps

    folder = motion_models / "animatediff_models" / "tiny-motion"
    read = spy_reads(monkeypatch)
    settings = ng.Settings(models_dir=motion_models, dtype=dtype, device="cpu", output_dir=tmp_path,
                           map_weights=map_weights)
    wf = ng.Workflow()
    wf.add("mm", "LoadMotionModule", motion_module="tiny-motion")
    result = ng.Executor(ng.build_registry(), settings=settings).run(wf, outputs=["mm"])
    monkeypatch.undo()
    assert result.status == "success", result.errors
    adapter = result.output("mm", "motion_module").adapter
    assert read and len(read) == len(set(read))
    reference = MotionAdapter.from_pretrained(folder).to(getattr(torch, dtype))
    ours, theirs = adapter.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    weights = folder / "diffusion_pytorch_model.safetensors"
    mapped = dtype == "float32" and map_weights is None and filemaps.guard(weights) is not None
    inside = in_maps_of(weights, list(adapter.parameters()))
    assert all(inside) if mapped else not any(inside)


def test_save_animation_writes_an_mp4(executor, motion_models):
    av = pytest.importorskip("av")
    wf = video_graph(frames=6)
    wf.add("save", "SaveAnimation", images=L("decode", "image"), filename_prefix="clip", fps=12, format="mp4")
    wf.outputs = ["save"]
    result = executor.run(wf)
    assert result.status == "success", result.errors
    [entry] = result.ui["save"]["images"]
    with av.open(str(executor.output_dir / entry["filename"])) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 64, 64)
        assert sum(1 for _ in container.decode(stream)) == 6 and stream.average_rate == 12


@pytest.mark.parametrize("fmt", ["webp", "gif"])
def test_save_animation_writes_every_frame(executor, motion_models, fmt):
    wf = video_graph(frames=6)
    wf.add("save", "SaveAnimation", images=L("decode", "image"), filename_prefix="clips/anim", fps=12, format=fmt)
    wf.outputs = ["save"]
    result = executor.run(wf)
    assert result.status == "success", result.errors
    [entry] = result.ui["save"]["images"]
    assert entry["animated"] and entry["frames"] == 6 and entry["subfolder"] == "clips"
    path = executor.output_dir / "clips" / entry["filename"]
    assert entry["filename"].endswith(f".{fmt}")
    with Image.open(path) as image:
        assert image.n_frames == 6 and image.size == (64, 64)
        assert image.info["loop"] == 0  # plays for ever
        if fmt == "gif":  # GIF keeps frame times in hundredths of a second
            assert abs(image.info["duration"] - 1000 / 12) <= 10
    assert not list(path.parent.glob(".*.partial"))


def test_a_motion_module_refuses_a_model_of_another_family(executor, motion_models):
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt="tiny-sdxl")
    wf.add("mm", "LoadMotionModule", motion_module="tiny-motion")
    wf.add("anim", "ApplyMotionModule", model=L("ckpt", "model"), motion_module=L("mm", "motion_module"))
    result = executor.run(wf, outputs=["anim"])
    message = result.nodes["anim"].error["message"]
    assert "SD 1.5" in message and "sdxl" in message


def test_a_missing_motion_module_says_where_they_are_read_from(executor):
    wf = video_graph()
    wf.set("mm", "motion_module", "nowhere")
    with pytest.raises(ng.ValidationFailed) as info:
        executor.run(wf)
    [error] = info.value.errors
    assert error.node_id == "mm" and "animatediff_models" in error.message


def test_controlnets_on_a_video_are_a_clear_error(executor, motion_models):
    from nodes.sampling import _attach_controls, _Guidance

    g = _Guidance(torch.zeros(1, 77, 32), False, 1.0, None)

    class Positive:
        extras = ("a control",)

    with pytest.raises(ValueError, match="do not work on animations"):
        _attach_controls(g, None, Positive(), (1, 4, 8, 8, 8), 2, torch.device("cpu"))


def test_an_original_single_file_motion_module_loads_as_its_folder(executor, motion_models):
    """mm_sd_v15_v2-style files (temporal_transformer, attention_blocks, norms, pos_encoder) give the same video as
    the diffusers folder they were written from."""
    from nodes.testing.tiny_adapters import motion_adapter_to_original

    folder = motion_models / "animatediff_models"
    single = motion_adapter_to_original(folder / "tiny-motion", folder / "mm_tiny_v2.safetensors")
    from safetensors.torch import load_file

    assert any(".temporal_transformer." in k and "pos_encoder.pe" in k for k in load_file(single))
    from_folder = ours(executor, video_graph())
    wf = video_graph()
    wf.set("mm", "motion_module", "mm_tiny_v2.safetensors")
    assert max_diff(ours(executor, wf), from_folder) == 0


def test_a_file_that_is_no_motion_module_is_a_clear_error(executor, motion_models):
    import shutil

    folder = motion_models / "animatediff_models"
    shutil.copyfile(motion_models / "checkpoints" / "tiny-sd.safetensors", folder / "not-motion.safetensors")
    wf = video_graph()
    wf.set("mm", "motion_module", "not-motion.safetensors")
    result = executor.run(wf)
    assert "not an AnimateDiff motion module" in result.nodes["mm"].error["message"]


def test_a_lora_under_the_motion_module_matches_the_pipeline_with_that_lora(executor, reference, pipelines,
                                                                            motion_models):
    """LoRAStack before ApplyMotionModule: the LoRA acts on the animated UNet's image layers, as
    AnimateDiffPipeline.load_lora_weights makes it act (the LCM docs' recipe mixes LCM-LoRA in this way)."""
    from diffusers import DDIMScheduler

    from nodes.testing.tiny_adapters import write_tiny_lora

    sd = pipelines["sd"]
    path = write_tiny_lora(sd.unet, sd.text_encoder, motion_models / "loras" / "video-style.safetensors",
                           fmt="kohya", rank=4, alpha=4.0, seed=31, text=False, std=0.2)
    expected = _with_lora(reference(DDIMScheduler.from_config(sd.scheduler.config)), path)
    _assert_lora_video(executor, "video-style.safetensors", expected, model_from="ckpt", model_into="anim")


def _with_lora(pipe, path):
    """The reference pipeline's frames with the LoRA file loaded into it."""
    pipe.load_lora_weights(str(path), adapter_name="lora")
    try:
        return pipe("a red cube", num_frames=8, num_inference_steps=3, guidance_scale=7.5, generator=generator(3),
                    height=64, width=64, output_type="np").frames
    finally:
        pipe.unload_lora_weights()


def _assert_lora_video(executor, lora: str, expected, *, model_from: str, model_into: str) -> None:
    """A LoRAStack reading node ``model_from``'s model feeds node ``model_into``: the video changes, and it is the
    reference's."""
    wf = video_graph()
    wf.add("lora", "LoRAStack", model=L(model_from, "model"), clip=L("ckpt", "clip"),
           loras=[{"lora": lora, "strength_model": 1.0, "strength_clip": 1.0}])
    wf.set(model_into, "model", L("lora", "model"))
    got = ours(executor, wf)
    assert max_diff(got, ours(executor, video_graph())) > 1e-3  # the LoRA acts
    assert max_diff(got, expected.reshape(got.shape)) <= TOLERANCE


def test_a_motion_lora_after_the_motion_module_matches_the_pipeline(executor, reference, pipelines, motion_models):
    """A motion LoRA (LoRA layers on the motion modules' attention, diffusers' format) in a LoRAStack after
    ApplyMotionModule, against AnimateDiffPipeline.load_lora_weights."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    pipe = reference(DDIMScheduler.from_config(pipelines["sd"].scheduler.config))
    draw = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if "motion_modules" in name and name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn1.to_out.0")):
            tensors[f"unet.{name}.lora.down.weight"] = torch.randn(4, module.in_features, generator=draw) * 0.3
            tensors[f"unet.{name}.lora.up.weight"] = torch.randn(module.out_features, 4, generator=draw) * 0.3
    path = motion_models / "loras" / "motion-zoom.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file(tensors, path)
    _assert_lora_video(executor, "motion-zoom.safetensors", _with_lora(pipe, path), model_from="anim",
                       model_into="sample")


def test_video_previews_show_the_first_frame_in_the_vae_colours(executor, motion_models):
    frames = []
    unsubscribe = executor.events.subscribe(
        lambda e: frames.append(e.data["preview"]) if e.type == "node_progress" and "preview" in e.data else None)
    executor.settings = executor.settings.replace(previews=True)
    try:
        result = executor.run(video_graph())
    finally:
        unsubscribe()
    assert result.status == "success", result.errors
    assert len(frames) == 3 and all(f.size == frames[0].size for f in frames)
    from nodes import previews

    model = result.output("anim", "model")
    assert previews._VAE_OF.get(model.unet) is not None  # the animated model previews through its VAE


def test_an_animated_model_shares_the_checkpoints_blocked_weights(motion_models, tmp_path):
    from nodes import fastpaths
    from nodes.values import storages

    if not fastpaths.packing_works(torch.bfloat16):
        pytest.skip("this build or CPU has no blocked bfloat16 convolutions")
    settings = ng.Settings(models_dir=motion_models, dtype="bfloat16", device="cpu", output_dir=tmp_path)
    wf = video_graph(lcm=True, steps=2, frames=4)
    wf.outputs = ["decode", "ckpt", "anim"]
    result = ng.Executor(ng.build_registry(), settings=settings).run(wf)
    assert torch.isfinite(torch.as_tensor(np.asarray(result.output("decode")[0]))).all()
    base, animated = result.output("ckpt", "model").unet, result.output("anim", "model").unet
    blocked = [m.weight for m in animated.modules() if type(m) is fastpaths.PackedConv2d]
    assert blocked and all(w.layout != torch.strided for w in blocked)  # the video ran them blocked
    theirs, ours = dict(storages(base)), dict(storages(animated))
    assert theirs.keys() <= ours.keys()  # every weight of the checkpoint's UNet, blocked ones included, shared
    motion = sum(t.nbytes for n, t in (*animated.named_parameters(), *animated.named_buffers())
                 if "motion_modules" in n)
    assert sum(n for k, n in ours.items() if k not in theirs) == motion  # all it adds is its motion module
