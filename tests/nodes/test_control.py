"""ControlNet and T2I-Adapter: our graphs give the images diffusers' ControlNet / adapter pipelines give (tiny
models, float32), chained controls match MultiControlNetModel, and bad inputs fail clearly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L
from nodes.testing.tiny_adapters import build_tiny_controlnet, build_tiny_t2i_adapter, write_controlnet_single_file

from .conftest import generator, in_maps_of, max_diff, spy_reads
from .test_parity import graph as parity_graph
from .test_parity import ours

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def control_models(models_root):
    folder = models_root / "controlnet"
    sd = models_root / "checkpoints" / "tiny-sd"
    if not (folder / "tiny-cn").is_dir():
        build_tiny_controlnet(sd, folder / "tiny-cn", seed=2)
        build_tiny_controlnet(sd, folder / "tiny-cn-b", seed=3)
        build_tiny_controlnet(sd, folder / "tiny-cn-xl", seed=4, cross_attention_dim=64)
        write_controlnet_single_file(folder / "tiny-cn", folder / "tiny-cn.safetensors", prefix="control_model.")
        write_controlnet_single_file(folder / "tiny-cn", folder / "bare" / "tiny-cn.safetensors")
        pooled = build_tiny_controlnet(sd, folder / "tiny-cn-pool", seed=7)  # like shuffle: guess mode
        config = json.loads((pooled / "config.json").read_text())
        (pooled / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
        build_tiny_t2i_adapter(folder / "tiny-t2i", seed=5)
        build_tiny_t2i_adapter(folder / "tiny-t2i-b", seed=6)
    if not (folder / "tiny-cn-sdxl").is_dir():
        build_tiny_controlnet(models_root / "checkpoints" / "tiny-sdxl", folder / "tiny-cn-sdxl", seed=8)
    return folder


@pytest.fixture(scope="module")
def control_inputs(input_dir, tmp_path_factory):
    """The shared input pictures plus control images of our own (in a folder of their own)."""
    folder = tmp_path_factory.mktemp("control-input")
    for name in ("picture.png", "mask.png"):
        shutil.copyfile(input_dir / name, folder / name)
    y, x = np.mgrid[0:64, 0:64]
    rings = ((np.hypot(x - 30, y - 34) // 6) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([rings, 255 - rings, rings // 2], -1)).save(folder / "rings.png")
    y, x = np.mgrid[0:80, 0:96]
    stripes = ((x // 12 + y // 10) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([stripes, stripes // 3, 255 - stripes], -1)).save(folder / "stripes-96x80.png")
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    Image.fromarray(square).save(folder / "square.png")
    return folder


@pytest.fixture
def settings(settings, control_models, control_inputs):
    return settings.replace(input_dir=control_inputs)


def graph(ckpt, prompt, *, controls=(), adapters=(), size=64, guidance=2.0, **kwargs) -> ng.Workflow:
    """The parity graph of test_parity, with ControlNetApply / T2IAdapterApply nodes between CLIPEncode and the
    sampler. ``controls``: (controlnet, image, strength, start, end); ``adapters``: (adapter, image, strength)."""

    def wrap(wf, cond):
        for i, (net, picture, scale, start, end) in enumerate(controls):
            wf.add(f"cn{i}", "LoadControlNet", control_net=net)
            wf.add(f"cimg{i}", "LoadImage", image=picture)
            wf.add(f"apply{i}", "ControlNetApply", conditioning=cond, control_net=L(f"cn{i}", "control_net"),
                   image=L(f"cimg{i}", "image"), strength=scale, start_percent=start, end_percent=end)
            cond = L(f"apply{i}", "conditioning")
        for i, (name, picture, scale) in enumerate(adapters):
            wf.add(f"ad{i}", "LoadT2IAdapter", adapter=name)
            wf.add(f"aimg{i}", "LoadImage", image=picture)
            wf.add(f"adapt{i}", "T2IAdapterApply", conditioning=cond, adapter=L(f"ad{i}", "adapter"),
                   image=L(f"aimg{i}", "image"), strength=scale)
            cond = L(f"adapt{i}", "conditioning")
        return cond

    return parity_graph(ckpt, prompt, width=size, height=size, guidance=guidance, wrap_conditioning=wrap, **kwargs)


@pytest.fixture(scope="module")
def diffusers_models(models_root, control_models):
    from diffusers import ControlNetModel, LatentConsistencyModelPipeline, StableDiffusionPipeline, T2IAdapter

    ckpts = models_root / "checkpoints"
    lcm = LatentConsistencyModelPipeline.from_pretrained(ckpts / "tiny-lcm", local_files_only=True)
    sd = StableDiffusionPipeline.from_pretrained(ckpts / "tiny-sd", local_files_only=True)
    return {
        "tiny-lcm": {k: v for k, v in lcm.components.items() if k != "image_encoder"},
        "tiny-sd": dict(sd.components),
        "tiny-cn": ControlNetModel.from_pretrained(control_models / "tiny-cn", local_files_only=True),
        "tiny-cn-b": ControlNetModel.from_pretrained(control_models / "tiny-cn-b", local_files_only=True),
        "tiny-cn-pool": ControlNetModel.from_pretrained(control_models / "tiny-cn-pool", local_files_only=True),
        "tiny-t2i": T2IAdapter.from_pretrained(control_models / "tiny-t2i", local_files_only=True),
        "tiny-t2i-b": T2IAdapter.from_pretrained(control_models / "tiny-t2i-b", local_files_only=True),
    }


def _pipeline(cls, components, **extra):
    pipe = cls(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_pipeline(models, ckpt, nets):
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline

    net = models[nets[0]] if len(nets) == 1 else MultiControlNetModel([models[n] for n in nets])
    return _pipeline(StableDiffusionControlNetPipeline, models[ckpt], controlnet=net)


def picture(folder, name):
    return Image.open(folder / name).convert("RGB")


@pytest.mark.parametrize("ckpt, guidance, negative, scale, window, batch", [
    ("tiny-sd", 2.0, "blurry", 0.8, (0.0, 1.0), 1),  # plain UNet (LCM-LoRA style): CFG with a negative prompt
    ("tiny-sd", 1.0, None, 1.0, (0.0, 1.0), 1),  # no CFG
    ("tiny-lcm", 8.5, None, 1.3, (0.0, 1.0), 1),  # LCM-distilled UNet: guidance through the w-embedding
    ("tiny-sd", 1.5, None, 1.0, (0.25, 0.75), 1),  # a control window: only the middle steps
    ("tiny-sd", 1.5, "dark", 1.0, (0.0, 1.0), 2),  # one control image for a batch of two, with CFG
])
def test_controlnet_matches_the_diffusers_controlnet_pipeline(executor, diffusers_models, control_inputs, ckpt,
                                                              guidance, negative, scale, window, batch):
    pipe = controlnet_pipeline(diffusers_models, ckpt, ["tiny-cn"])
    expected = pipe("a red circle", image=picture(control_inputs, "rings.png"), negative_prompt=negative,
                    num_inference_steps=4, guidance_scale=guidance, controlnet_conditioning_scale=scale,
                    control_guidance_start=window[0], control_guidance_end=window[1], height=64, width=64,
                    num_images_per_prompt=batch, generator=generator(7), output_type="np").images
    got = ours(executor, graph(ckpt, "a red circle", seed=7, guidance=guidance, negative=negative, batch=batch,
                               controls=[("tiny-cn", "rings.png", scale, *window)]))
    plain = ours(executor, graph(ckpt, "a red circle", seed=7, guidance=guidance, negative=negative, batch=batch))
    assert got.shape == expected.shape == (batch, 64, 64, 3)
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(got, plain) > 0.01  # the control has a visible effect


def test_chained_controlnets_match_multicontrolnet(executor, diffusers_models, control_inputs):
    pipe = controlnet_pipeline(diffusers_models, "tiny-sd", ["tiny-cn", "tiny-cn-b"])
    expected = pipe("a blue square", image=[picture(control_inputs, "rings.png"),
                                            picture(control_inputs, "picture.png")],
                    negative_prompt="ugly", num_inference_steps=4, guidance_scale=1.8,
                    controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.5],
                    control_guidance_end=[1.0, 1.0], height=64, width=64, generator=generator(3),
                    output_type="np").images
    got = ours(executor, graph("tiny-sd", "a blue square", seed=3, guidance=1.8, negative="ugly", controls=[
        ("tiny-cn", "rings.png", 0.7, 0.0, 1.0), ("tiny-cn-b", "picture.png", 1.2, 0.5, 1.0)]))
    assert max_diff(got, expected) <= TOLERANCE


def test_a_pooled_controlnet_runs_in_guess_mode_as_in_diffusers(executor, diffusers_models, control_inputs):
    pipe = controlnet_pipeline(diffusers_models, "tiny-sd", ["tiny-cn-pool"])
    expected = pipe("a cat", image=picture(control_inputs, "rings.png"), negative_prompt="ugly", num_inference_steps=3,
                    guidance_scale=2.0, height=64, width=64, generator=generator(2), output_type="np").images
    got = ours(executor, graph("tiny-sd", "a cat", seed=2, steps=3, guidance=2.0, negative="ugly",
                               controls=[("tiny-cn-pool", "rings.png", 1.0, 0.0, 1.0)]))
    assert max_diff(got, expected) <= TOLERANCE


def test_a_control_image_of_another_size_is_resized_as_diffusers_resizes_it(executor, diffusers_models,
                                                                           control_inputs):
    # diffusers resizes a PIL control image to the requested width x height with a Lanczos filter
    pipe = controlnet_pipeline(diffusers_models, "tiny-sd", ["tiny-cn"])
    expected = pipe("stripes", image=picture(control_inputs, "stripes-96x80.png"), num_inference_steps=2,
                    guidance_scale=1.0, height=64, width=64, generator=generator(1), output_type="np").images
    got = ours(executor, graph("tiny-sd", "stripes", seed=1, steps=2, guidance=1.0,
                               controls=[("tiny-cn", "stripes-96x80.png", 1.0, 0.0, 1.0)]))
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("ckpt, guidance, negative, batch", [
    ("tiny-sd", 2.0, "blurry", 1), ("tiny-lcm", 6.0, None, 1), ("tiny-sd", 1.5, None, 2)])
def test_t2i_adapter_matches_the_diffusers_adapter_pipeline(executor, diffusers_models, control_inputs, ckpt,
                                                            guidance, negative, batch):
    from diffusers import StableDiffusionAdapterPipeline

    pipe = _pipeline(StableDiffusionAdapterPipeline, {k: v for k, v in diffusers_models[ckpt].items()
                                                      if k != "image_encoder"}, adapter=diffusers_models["tiny-t2i"])
    expected = pipe("a green triangle", image=picture(control_inputs, "rings.png"), negative_prompt=negative,
                    num_inference_steps=4, guidance_scale=guidance, adapter_conditioning_scale=0.9, height=64,
                    width=64, num_images_per_prompt=batch, generator=generator(11), output_type="np").images
    got = ours(executor, graph(ckpt, "a green triangle", seed=11, guidance=guidance, negative=negative, batch=batch,
                               adapters=[("tiny-t2i", "rings.png", 0.9)]))
    plain = ours(executor, graph(ckpt, "a green triangle", seed=11, guidance=guidance, negative=negative,
                                 batch=batch))
    assert got.shape == expected.shape == (batch, 64, 64, 3)
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(got, plain) > 0.01


def test_chained_t2i_adapters_match_multiadapter(executor, diffusers_models, control_inputs):
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline

    adapter = MultiAdapter([diffusers_models["tiny-t2i"], diffusers_models["tiny-t2i-b"]])
    components = {k: v for k, v in diffusers_models["tiny-sd"].items() if k != "image_encoder"}
    pipe = _pipeline(StableDiffusionAdapterPipeline, components, adapter=adapter)
    expected = pipe("a cat", image=[picture(control_inputs, "rings.png"), picture(control_inputs, "picture.png")],
                    num_inference_steps=3, guidance_scale=1.5, adapter_conditioning_scale=[0.6, 1.4], height=64,
                    width=64, generator=generator(4), output_type="np").images
    got = ours(executor, graph("tiny-sd", "a cat", seed=4, steps=3, guidance=1.5,
                               adapters=[("tiny-t2i", "rings.png", 0.6), ("tiny-t2i-b", "picture.png", 1.4)]))
    assert max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("guidance, strength, negative", [(1.0, 1.0, None), (1.5, 0.75, "ugly")])
def test_controlnet_inpainting_matches_the_diffusers_controlnet_inpaint_pipeline(executor, diffusers_models,
                                                                                 control_inputs, guidance, strength,
                                                                                 negative):
    from diffusers import StableDiffusionControlNetInpaintPipeline

    pipe = _pipeline(StableDiffusionControlNetInpaintPipeline, diffusers_models["tiny-sd"],
                     controlnet=diffusers_models["tiny-cn"])
    expected = pipe("a yellow star", image=picture(control_inputs, "picture.png"),
                    mask_image=Image.open(control_inputs / "mask.png"),
                    control_image=picture(control_inputs, "rings.png"), controlnet_conditioning_scale=1.0,
                    negative_prompt=negative, height=64, width=64, num_inference_steps=4, guidance_scale=guidance,
                    strength=strength, generator=generator(5), output_type="np").images
    got = ours(executor, graph("tiny-sd", "a yellow star", seed=5, guidance=guidance, strength=strength,
                               negative=negative, image="picture.png", mask="mask.png",
                               controls=[("tiny-cn", "rings.png", 1.0, 0.0, 1.0)]))
    assert max_diff(got, expected) <= TOLERANCE


def test_controlnet_steers_image_to_image(executor):
    with_control = ours(executor, graph("tiny-lcm", "a cat", seed=2, guidance=4.0, strength=0.6,
                                        image="picture.png", controls=[("tiny-cn", "rings.png", 1.0, 0.0, 1.0)]))
    without = ours(executor, graph("tiny-lcm", "a cat", seed=2, guidance=4.0, strength=0.6, image="picture.png"))
    assert with_control.shape == without.shape and max_diff(with_control, without) > 0.01


def test_a_single_file_controlnet_loads_the_weights_of_its_folder(executor):
    wf = ng.Workflow()
    wf.add("folder", "LoadControlNet", control_net="tiny-cn")
    wf.add("prefixed", "LoadControlNet", control_net="tiny-cn.safetensors")
    wf.add("bare", "LoadControlNet", control_net="bare/tiny-cn.safetensors")
    result = executor.run(wf, outputs=["folder", "prefixed", "bare"])
    assert result.status == "success", result.errors
    folder = result.output("folder", "control_net").net
    reference = folder.state_dict()
    for node in ("prefixed", "bare"):
        net = result.output(node, "control_net").net
        for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                    "conditioning_embedding_out_channels", "in_channels"):
            assert list(np.atleast_1d(net.config[key])) == list(np.atleast_1d(folder.config[key])), key
        state = net.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_standard_sd15_controlnet_file_gets_the_shipped_configuration():
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    from nodes.control import CONFIG_DIR, derive_controlnet_config
    from nodes.testing.tiny_adapters import controlnet_to_ldm

    shipped = json.loads((CONFIG_DIR / "config.json").read_text())
    with init_empty_weights():  # shapes only: no weights are allocated
        model = ControlNetModel.from_config(shipped)
    shapes = {k: tuple(v.shape) for k, v in controlnet_to_ldm(model.state_dict(), shipped).items()}
    derived = derive_controlnet_config(shapes)
    assert json.loads(json.dumps(derived)) == shipped


def test_a_pickled_controlnet_is_refused_unless_pickles_are_allowed(executor, control_models, models_root,
                                                                   control_inputs, tmp_path):
    from safetensors.torch import load_file

    torch.save(load_file(control_models / "tiny-cn.safetensors"), control_models / "tiny-cn.pth")
    wf = ng.Workflow()
    wf.add("cn", "LoadControlNet", control_net="tiny-cn.pth")
    result = executor.run(wf, outputs=["cn"])
    assert result.status != "success" and "pickle" in str(result.nodes["cn"].error)
    executor.settings = executor.settings.replace(allow_pickle=True)
    result = executor.run(wf, outputs=["cn"])
    assert result.status == "success", result.errors
    net = result.output("cn", "control_net").net
    assert list(net.config.conditioning_embedding_out_channels) == [8, 8, 16, 16]


def test_canny_finds_the_edges_of_a_square(executor):
    wf = ng.Workflow()
    wf.add("img", "LoadImage", image="square.png")
    wf.add("edges", "Canny", image=L("img", "image"), low_threshold=100, high_threshold=200)
    result = executor.run(wf, outputs=["edges"])
    assert result.status == "success", result.errors
    edges = result.output("edges", "image")
    assert edges.shape == (1, 64, 64, 3) and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[..., 0], edges[..., 2])
    on = edges[0, ..., 0] > 0
    rows, cols = torch.nonzero(on, as_tuple=True)
    assert rows.min() >= 14 and rows.max() <= 49 and cols.min() >= 14 and cols.max() <= 49  # only around the square
    assert on[16:48, 15:17].any(dim=1).all() and on[16:48, 47:49].any(dim=1).all()  # left and right sides, fully
    assert not on[20:44, 20:44].any() and not on[:10].any()  # nothing inside, nothing in the background


def _error_of(executor, wf, node):
    result = executor.run(wf)
    assert result.status != "success"
    return str(result.nodes[node].error)


def test_strength_out_of_range_is_a_validation_error(executor):
    wf = graph("tiny-sd", "x", controls=[("tiny-cn", "rings.png", 2.5, 0.0, 1.0)])
    with pytest.raises(ng.ValidationFailed) as info:
        executor.run(wf)
    assert "strength" in str(info.value)


def test_start_after_end_is_refused(executor):
    error = _error_of(executor, graph("tiny-sd", "x", controls=[("tiny-cn", "rings.png", 1.0, 0.8, 0.2)]), "apply0")
    assert "start_percent" in error


def test_a_controlnet_of_another_family_is_refused_clearly(executor):
    error = _error_of(executor, graph("tiny-sd", "x", controls=[("tiny-cn-xl", "rings.png", 1.0, 0.0, 1.0)]),
                      "apply0")
    assert "64" in error and "32" in error and "family" in error


def test_a_t2i_adapter_that_does_not_fit_the_unet_is_refused_at_the_sampler(executor, control_models):
    build_tiny_t2i_adapter(control_models / "tiny-t2i-wide", seed=1, channels=(48, 96))
    error = _error_of(executor, graph("tiny-sd", "x", adapters=[("tiny-t2i-wide", "rings.png", 1.0)]), "sample")
    assert "[48, 96]" in error and "family" in error


def test_a_missing_controlnet_file_is_reported(executor):
    wf = ng.Workflow()
    wf.add("cn", "LoadControlNet", control_net="nowhere.safetensors")
    with pytest.raises(ng.ValidationFailed) as info:
        executor.run(wf, outputs=["cn"])
    assert "nowhere.safetensors" in str(info.value)


@pytest.mark.parametrize("guidance, pooled", [(1.0, False), (2.0, False), (2.0, True)], ids=["no-cfg", "cfg", "guess"])
def test_an_sdxl_controlnet_matches_the_sdxl_controlnet_pipeline(executor, models_root, control_models,
                                                                 control_inputs, guidance, pooled):
    """SDXL ControlNets get the pooled prompt and size conditioning too (in guess mode the conditional half only)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    net = ControlNetModel.from_pretrained(control_models / "tiny-cn-sdxl", local_files_only=True)
    name = "tiny-cn-sdxl"
    if pooled:
        name = "tiny-cn-sdxl-pool"
        if not (control_models / name).is_dir():
            net.register_to_config(global_pool_conditions=True)
            net.save_pretrained(control_models / name)
        net = ControlNetModel.from_pretrained(control_models / name, local_files_only=True)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(models_root / "checkpoints" / "tiny-sdxl",
                                                               controlnet=net, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", image=picture(control_inputs, "rings.png"), num_inference_steps=4,
                    guidance_scale=guidance, controlnet_conditioning_scale=0.9, height=64, width=64,
                    generator=generator(7), output_type="np").images
    got = ours(executor, graph("tiny-sdxl", "a red circle", seed=7, guidance=guidance,
                               controls=[(name, "rings.png", 0.9, 0.0, 1.0)]))
    plain = ours(executor, graph("tiny-sdxl", "a red circle", seed=7, guidance=guidance))
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(got, plain) > 0.01  # the control has a visible effect


def test_an_sdxl_controlnet_on_an_sd1_model_is_refused(executor):
    result = executor.run(graph("tiny-sd", "a red circle", guidance=1.0, controls=[("tiny-cn-sdxl", "rings.png", 1.0,
                                                                                     0.0, 1.0)]))
    assert result.nodes["apply0"].status == "failed"
    assert "use a ControlNet of the checkpoint's family" in result.nodes["apply0"].error["message"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_controlnets_take_the_unets_fast_layout_on_the_cpu(settings, monkeypatch, dtype):
    from nodes import fastpaths

    if not fastpaths.packing_works(getattr(torch, dtype)):
        pytest.skip(f"this build or CPU has no blocked {dtype} convolutions")
    wf = graph("tiny-lcm", "a cat", seed=2, controls=[("tiny-cn", "rings.png", 1.0, 0.0, 1.0)])
    wf.outputs = ["decode", "cn0"]
    runs = {}
    for packing in (True, False):
        if not packing:
            monkeypatch.setattr(fastpaths, "pack", lambda module, now=False: 0)
        fast = settings.replace(dtype=dtype, memory_format="auto")
        result = ng.Executor(ng.build_registry(), settings=fast).run(wf)
        net = result.output("cn0", "control_net").net
        blocked = {m.kernel_size for m in net.modules() if isinstance(m, torch.nn.Conv2d)
                   and m.weight.layout != torch.strided}
        assert blocked == ({(3, 3), (1, 1)} if packing else set())  # every 3x3 and 1x1 convolution ran blocked
        runs[packing] = torch.as_tensor(np.asarray(result.output("decode")))
    if dtype == "bfloat16":
        assert torch.equal(runs[True], runs[False])
    else:
        assert max_diff(runs[True], runs[False]) < 1e-5


@pytest.mark.parametrize("name", ["tiny-cn", "tiny-cn.safetensors", "bare/tiny-cn.safetensors"])
@pytest.mark.parametrize("dtype, map_weights", [("float32", None), ("float32", False), ("bfloat16", None)])
def test_controlnets_load_as_checkpoints_do(control_models, models_root, monkeypatch, name, dtype, map_weights):
    """Streamed tensor by tensor (each read once, in the run's dtype), or, used as stored with a guard, kept in
    maps of the file; the same weights as diffusers' ControlNetModel either way, in the UNet's fast layout."""
    from diffusers import ControlNetModel

    from nodegraph import filemaps
    from nodes import fastpaths
    from nodes.control import load_controlnet

    path = control_models / name
    weights = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    read = spy_reads(monkeypatch)
    settings = ng.Settings(models_dir=models_root, device="cpu", dtype=dtype, map_weights=map_weights)
    model = load_controlnet(path, settings)
    monkeypatch.undo()
    assert read and len(read) == len(set(read))  # each tensor once
    reference = ControlNetModel.from_pretrained(control_models / "tiny-cn").to(getattr(torch, dtype))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    kernels = [m for m in model.modules() if isinstance(m, fastpaths.PackedConv2d)]
    assert kernels  # the UNet's fast layout
    expect_mapped = dtype == "float32" and map_weights is None and filemaps.guard(weights) is not None
    plain = [p for p in model.parameters() if p.layout == torch.strided]
    inside = in_maps_of(weights, plain)
    assert (sum(inside) > len(inside) // 2) if expect_mapped else not any(inside)
