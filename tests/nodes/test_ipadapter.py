"""IP-Adapter: our graphs give the images diffusers' pipelines give with ``ip_adapter_image`` (tiny models,
float32), the cached model is never changed, and bad inputs fail clearly on the node."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L
from nodes.testing.tiny_adapters import build_tiny_image_encoder, write_image_encoder_single_file, write_tiny_ip_adapter

from .conftest import generator, in_maps_of, max_diff, spy_reads
from .test_parity import graph as parity_graph
from .test_parity import ours

TOLERANCE = 1e-5
PROMPT = "a red cube on a table"


@pytest.fixture(scope="module")
def ip_models(models_root):
    """models/ipadapter/tiny-ip.safetensors (fits both tiny UNets), models/clip_vision/tiny-vision (folder) and
    tiny-vision.safetensors (single file), and a second adapter, and one for a 64-wide (other family) UNet."""
    ckpts = models_root / "checkpoints"
    ip_dir, vision_dir = models_root / "ipadapter", models_root / "clip_vision"
    if not (ip_dir / "tiny-ip.safetensors").exists():
        build_tiny_image_encoder(vision_dir / "tiny-vision", seed=3)
        write_image_encoder_single_file(vision_dir / "tiny-vision", vision_dir / "tiny-vision.safetensors")
        write_tiny_ip_adapter(ckpts / "tiny-sd" / "unet", ip_dir / "tiny-ip.safetensors", seed=4)
        write_tiny_ip_adapter(ckpts / "tiny-sd" / "unet", ip_dir / "tiny-ip-b.safetensors", seed=5)
    return models_root


@pytest.fixture(scope="module")
def reference(input_dir) -> Image.Image:
    return Image.open(input_dir / "picture.png").convert("RGB")


@pytest.fixture(scope="module")
def lcm_with_ip(ip_models, pipelines):
    """diffusers' LatentConsistencyModelPipeline with the tiny adapter loaded (its own copy of the UNet)."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(ip_models / "checkpoints" / "tiny-lcm",
                                                          local_files_only=True)
    pipe.load_ip_adapter(str(ip_models), subfolder="ipadapter", weight_name="tiny-ip.safetensors",
                         image_encoder_folder="clip_vision/tiny-vision")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_with_ip(ip_models):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ip_models / "checkpoints" / "tiny-sd", local_files_only=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(ip_models), subfolder="ipadapter", weight_name="tiny-ip.safetensors",
                         image_encoder_folder="clip_vision/tiny-vision")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_ip(wf: ng.Workflow, adapters=(("tiny-ip.safetensors", "tiny-vision", 0.7),), image="picture.png"):
    """Insert LoadIPAdapter -> IPAdapterApply between the checkpoint's model and its users."""
    model = L("ckpt", "model")
    wf.add("ref", "LoadImage", image=image)
    for i, (adapter, encoder, scale) in enumerate(adapters):
        wf.add(f"ipload{i}", "LoadIPAdapter", ip_adapter=adapter, image_encoder=encoder)
        wf.add(f"ip{i}", "IPAdapterApply", model=model, ip_adapter=L(f"ipload{i}", "ip_adapter"),
               image=L("ref", "image"), scale=scale)
        model = L(f"ip{i}", "model")
    wf.set("sched", "model", model)
    wf.set("sample", "model", model)
    return wf


@pytest.mark.parametrize("steps,scale", [(1, 0.7), (4, 0.7), (4, 1.0)])
def test_lcm_with_ip_adapter_matches_diffusers(executor, lcm_with_ip, reference, steps, scale):
    lcm_with_ip.set_ip_adapter_scale(scale)
    expected = lcm_with_ip(PROMPT, ip_adapter_image=reference, num_inference_steps=steps, guidance_scale=8.5,
                           height=64, width=64, generator=generator(0), output_type="np").images
    wf = with_ip(parity_graph("tiny-lcm", PROMPT, steps=steps, guidance=8.5),
                 adapters=(("tiny-ip.safetensors", "tiny-vision", scale),))
    assert max_diff(ours(executor, wf), expected) <= TOLERANCE
    # and the adapter does something: the same graph without it differs
    plain = ours(executor, parity_graph("tiny-lcm", PROMPT, steps=steps, guidance=8.5))
    assert max_diff(plain, expected) > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_plain_unet_with_ip_adapter_and_cfg_matches_diffusers(executor, sd_with_ip, reference, guidance):
    """With CFG the unconditional half attends to the tokens of a zero image embedding, as in diffusers."""
    sd_with_ip.set_ip_adapter_scale(0.7)
    expected = sd_with_ip(PROMPT, ip_adapter_image=reference, num_inference_steps=4, guidance_scale=guidance,
                          height=64, width=64, generator=generator(3), output_type="np").images
    wf = with_ip(parity_graph("tiny-sd", PROMPT, steps=4, guidance=guidance, seed=3))
    assert max_diff(ours(executor, wf), expected) <= TOLERANCE


def test_single_file_image_encoder_gives_the_same_image(executor):
    a = ours(executor, with_ip(parity_graph("tiny-lcm", PROMPT)))
    b = ours(executor, with_ip(parity_graph("tiny-lcm", PROMPT),
                               adapters=(("tiny-ip.safetensors", "tiny-vision.safetensors", 0.7),)))
    assert max_diff(a, b) == 0


def test_two_chained_adapters_match_diffusers_multi_adapter(executor, ip_models, reference):
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(ip_models / "checkpoints" / "tiny-lcm",
                                                          local_files_only=True)
    pipe.load_ip_adapter([str(ip_models)] * 2, subfolder=["ipadapter"] * 2,
                         weight_name=["tiny-ip.safetensors", "tiny-ip-b.safetensors"],
                         image_encoder_folder="clip_vision/tiny-vision")
    pipe.set_ip_adapter_scale([0.6, 0.9])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, ip_adapter_image=[reference, reference], num_inference_steps=2, guidance_scale=8.5,
                    height=64, width=64, generator=generator(0), output_type="np").images
    wf = with_ip(parity_graph("tiny-lcm", PROMPT, steps=2),
                 adapters=(("tiny-ip.safetensors", "tiny-vision", 0.6), ("tiny-ip-b.safetensors", "tiny-vision", 0.9)))
    assert max_diff(ours(executor, wf), expected) <= TOLERANCE


def test_scale_zero_is_exactly_no_adapter_and_the_cached_unet_is_untouched(executor):
    wf = with_ip(parity_graph("tiny-lcm", PROMPT), adapters=(("tiny-ip.safetensors", "tiny-vision", 0.0),))
    wf.outputs = ["decode", "ckpt"]
    result = executor.run(wf)
    assert result.status == "success", result.errors
    unet = result.output("ckpt", "model").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    zero = result.output("decode", "image").numpy()
    plain = ours(executor, parity_graph("tiny-lcm", PROMPT))
    assert max_diff(zero, plain) == 0
    ours(executor, with_ip(parity_graph("tiny-lcm", PROMPT, seed=5)))  # a run with the adapter active
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_changing_the_scale_does_not_reencode_the_image(executor):
    wf = with_ip(parity_graph("tiny-lcm", PROMPT))
    assert executor.run(wf).status == "success"
    wf.set("ip0", "scale", 0.3)
    result = executor.run(wf)
    assert result.status == "success"
    status = {node: record.status for node, record in result.nodes.items()}
    assert status["ip0"] == "ran" and status["sample"] == "ran"
    assert all(status[node] == "cached" for node in ("ipload0", "ref", "ckpt", "pos")), status


def _error(executor, wf) -> str:
    result = executor.run(wf)
    assert result.status == "failed"
    return " ".join(f"{e['node_id']} {e['message']}" for e in result.errors)


def test_adapter_of_another_family_is_a_clear_error(executor, ip_models, tmp_path):
    """An adapter whose image tokens are 64 wide on a 32-wide (tiny SD1) UNet: the node says so."""
    from safetensors.torch import load_file, save_file

    state = load_file(ip_models / "ipadapter" / "tiny-ip.safetensors")
    wide = {k: torch.zeros(v.shape[0], 64) if k.endswith("_ip.weight") else v for k, v in state.items()}
    wide["image_proj.proj.weight"] = torch.zeros(4 * 64, 24)
    wide["image_proj.proj.bias"] = torch.zeros(4 * 64)
    wide["image_proj.norm.weight"], wide["image_proj.norm.bias"] = torch.ones(64), torch.zeros(64)
    save_file(wide, ip_models / "ipadapter" / "wide-ip.safetensors")
    message = _error(executor, with_ip(parity_graph("tiny-lcm", PROMPT),
                                       adapters=(("wide-ip.safetensors", "tiny-vision", 1.0),)))
    assert "ip0" in message and "64-wide text features" in message and "32 wide" in message


def test_layer_count_mismatch_and_plus_adapters_are_clear_errors(executor, ip_models):
    from safetensors.torch import load_file, save_file

    state = load_file(ip_models / "ipadapter" / "tiny-ip.safetensors")
    fewer = {k: v for k, v in state.items() if not k.startswith("ip_adapter.1.")}
    save_file(fewer, ip_models / "ipadapter" / "fewer-ip.safetensors")
    message = _error(executor, with_ip(parity_graph("tiny-lcm", PROMPT),
                                       adapters=(("fewer-ip.safetensors", "tiny-vision", 1.0),)))
    assert "attention layers" in message and "another model family" in message

    plus = {**state, "image_proj.latents": torch.zeros(1, 16, 32)}
    save_file(plus, ip_models / "ipadapter" / "plus-ip.safetensors")
    message = _error(executor, with_ip(parity_graph("tiny-lcm", PROMPT),
                                       adapters=(("plus-ip.safetensors", "tiny-vision", 1.0),)))
    assert "ipload0" in message and "Plus" in message and "not supported" in message, message


def test_a_pickled_adapter_needs_the_flag(executor, ip_models, input_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(ip_models / "ipadapter" / "tiny-ip.safetensors")
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, ip_models / "ipadapter" / "tiny-ip.bin")  # h94's .bin layout
    wf = with_ip(parity_graph("tiny-lcm", PROMPT), adapters=(("tiny-ip.bin", "tiny-vision", 0.7),))
    assert "pickle" in _error(executor, wf)
    executor.settings = executor.settings.replace(allow_pickle=True)
    from_pickle = ours(executor, wf)
    from_safetensors = ours(executor, with_ip(parity_graph("tiny-lcm", PROMPT)))
    assert max_diff(from_pickle, from_safetensors) == 0


def test_wrong_image_encoder_is_a_clear_error(executor, ip_models):
    build_tiny_image_encoder(ip_models / "clip_vision" / "other-vision", seed=1, projection_dim=16)
    message = _error(executor, with_ip(parity_graph("tiny-lcm", PROMPT),
                                       adapters=(("tiny-ip.safetensors", "other-vision", 1.0),)))
    assert "ipload0" in message and "24-wide image embeddings" in message and "gives 16" in message


def test_reference_batch_uses_all_images(executor, lcm_with_ip, reference, input_dir):
    """Two reference images in one IMAGE batch (ImageBatch) are used together, as diffusers uses a list of images
    for one adapter."""
    other = Image.fromarray(255 - np.asarray(reference))
    other.save(input_dir / "inverted.png")
    lcm_with_ip.set_ip_adapter_scale(0.7)
    expected = lcm_with_ip(PROMPT, ip_adapter_image=[[reference, other]], num_inference_steps=2, guidance_scale=8.5,
                           height=64, width=64, generator=generator(0), output_type="np").images
    wf = with_ip(parity_graph("tiny-lcm", PROMPT, steps=2))
    wf.add("ref2", "LoadImage", image="inverted.png")
    wf.add("refs", "ImageBatch", image1=L("ref", "image"), image2=L("ref2", "image"))
    wf.set("ip0", "image", L("refs", "image"))
    assert max_diff(ours(executor, wf), expected) <= TOLERANCE


@pytest.mark.parametrize("name", ["tiny-vision", "tiny-vision.safetensors"])
@pytest.mark.parametrize("dtype, map_weights", [("float32", None), ("float32", False), ("bfloat16", None)])
def test_image_encoders_load_as_checkpoints_do(ip_models, monkeypatch, name, dtype, map_weights):
    """Streamed tensor by tensor into the run's dtype (each read once, no random initialisation), or, used as
    stored with a guard, kept in maps of the file: the weights transformers' from_pretrained gives either way."""
    from transformers import CLIPVisionModelWithProjection

    from nodegraph import filemaps
    from nodes.ipadapter import load_image_encoder

    path = ip_models / "clip_vision" / name
    weights = path / "model.safetensors" if path.is_dir() else path
    read = spy_reads(monkeypatch)
    monkeypatch.setattr(torch.nn.init, "normal_", lambda *a, **k: pytest.fail("random initialisation"))
    settings = ng.Settings(models_dir=ip_models, device="cpu", dtype=dtype, map_weights=map_weights)
    encoder, _ = load_image_encoder(path, settings)
    monkeypatch.undo()
    assert read and len(read) == len(set(read))
    reference = CLIPVisionModelWithProjection.from_pretrained(ip_models / "clip_vision" / "tiny-vision")
    ours, theirs = encoder.state_dict(), reference.to(getattr(torch, dtype)).state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    inside = in_maps_of(weights, encoder.parameters())
    mapped = dtype == "float32" and map_weights is None and filemaps.guard(weights) is not None
    assert all(inside) if mapped else not any(inside)
