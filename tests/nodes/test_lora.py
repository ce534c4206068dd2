"""LoRAStack: LoRA files as patches on the model handles, matching diffusers' load_lora_weights + set_adapters."""

from __future__ import annotations

import copy

import pytest
import torch

import nodegraph as ng
from nodegraph import Link as L
from nodes import lora as lora_module
from nodes.testing.tiny_adapters import write_sdxl_shaped_lora, write_tiny_lora

from .conftest import max_diff

TOLERANCE = 1e-5
PROMPT = "a green triangle"


@pytest.fixture(scope="module")
def base_pipeline(models_root):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models_root / "checkpoints" / "tiny-sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_files(models_root, base_pipeline):
    """LoRA files in the models folder's loras/: name -> path."""
    folder = models_root / "loras"
    unet, te = base_pipeline.unet, base_pipeline.text_encoder
    files = {
        "kohya.safetensors": dict(fmt="kohya", rank=4, alpha=8.0, seed=1),
        "kohya-ldm.safetensors": dict(fmt="kohya_ldm", rank=4, alpha=2.0, seed=2),
        "peft.safetensors": dict(fmt="peft", rank=4, seed=3),
        "peft-meta.safetensors": dict(fmt="peft_meta", rank=2, alpha=4.0, seed=4),
        "style/unet-only.safetensors": dict(fmt="kohya", rank=8, alpha=4.0, seed=5, text=False),
        "lcm-lora.safetensors": dict(fmt="kohya", rank=8, alpha=8.0, seed=6, text=False, everywhere=True, std=0.1),
        "lcm-lora-peft.safetensors": dict(fmt="peft", rank=8, seed=6, text=False, everywhere=True, std=0.1),
    }
    out = {name: write_tiny_lora(unet, te, folder / name, **kwargs) for name, kwargs in files.items()}
    out["sdxl.safetensors"] = write_sdxl_shaped_lora(folder / "sdxl.safetensors")
    out["lcm-lora-diffusers.safetensors"] = _as_saved_by_diffusers_training(out["lcm-lora-peft.safetensors"],
                                                                            folder / "lcm-lora-diffusers.safetensors")
    return out


def _as_saved_by_diffusers_training(peft_file, out):
    """The layout diffusers' LoRA training scripts write: convert_state_dict_to_diffusers of the peft state, which
    renames attention layers to "to_q.lora.down" but keeps "lora_A" elsewhere (one file, two spellings)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file, save_file

    state = {k[len("unet."):]: v for k, v in load_file(peft_file).items() if k.startswith("unet.")}
    converted = convert_state_dict_to_diffusers(state)
    assert any(".lora.down." in k for k in converted) and any(".lora_A." in k for k in converted)
    save_file({f"unet.{k}": v for k, v in converted.items()}, out)
    return out


def diffusers_with(base, loras: list[tuple[str, float, float]], lora_files, *, aligned=False):
    """A fresh StableDiffusionPipeline (weights deep-copied from ``base``) with the LoRAs loaded as adapters and
    mixed with set_adapters at (unet, text encoder) weights.

    diffusers keeps the LoRA factors where safetensors put them (at the file's offsets, not 64-byte aligned) and CPU
    kernels round differently on such memory (1e-7 per layer). ``aligned`` copies them to fresh memory, as
    LoRAStack does."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v
                                      for k, v in base.components.items()})
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (name, _, _) in enumerate(loras):
        pipe.load_lora_weights(str(lora_files[name]), adapter_name=f"a{i}", unet_config=pipe.unet.config)
        names.append(f"a{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[{"unet": wu, "text_encoder": wt} for _, wu, wt in loras])
    if aligned:
        for component in (pipe.unet, pipe.text_encoder):
            for name, param in component.named_parameters():
                if ".lora_" in name:
                    param.data = param.data.clone()
    return pipe


def run_diffusers(pipe, *, guidance=1.0, seed=11, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=4, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                height=64, width=64, output_type="np").images


_PLAIN: dict[float, object] = {}


def plain_image(base, guidance):
    """diffusers' image without LoRA (computed once per guidance)."""
    if guidance not in _PLAIN:
        _PLAIN[guidance] = run_diffusers(base, guidance=guidance)
    return _PLAIN[guidance]


def graph(loras, *, guidance=1.0, seed=11, prompt=PROMPT, ckpt="tiny-sd") -> ng.Workflow:
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt=ckpt)
    wf.add("lora", "LoRAStack", model=L("ckpt", "model"), clip=L("ckpt", "clip"),
           loras=[{"lora": n, "strength_model": sm, "strength_clip": sc} for n, sm, sc in loras])
    wf.add("pos", "CLIPEncode", clip=L("lora", "clip"), text=prompt)
    wf.add("sched", "LCMScheduler", model=L("lora", "model"), steps=4)
    wf.add("latent", "EmptyLatent", width=64, height=64, vae=L("ckpt", "vae"))
    wf.add("sample", "LCMSampler", model=L("lora", "model"), positive=L("pos", "conditioning"),
           latent=L("latent", "latent"), schedule=L("sched", "schedule"), seed=seed, guidance=guidance)
    wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample", "latent"))
    wf.outputs = ["decode"]
    return wf


def ours(executor, wf, output="decode"):
    result = executor.run(wf)
    assert result.status == "success", result.errors
    return result.output(output, "image").numpy()


@pytest.mark.parametrize("loras, guidance", [
    ([("kohya.safetensors", 1.0, 1.0)], 1.0),
    ([("kohya-ldm.safetensors", 1.0, 1.0)], 1.5),
    ([("peft.safetensors", 1.0, 1.0)], 1.0),
    ([("peft-meta.safetensors", 0.7, 0.7)], 2.0),
    ([("kohya.safetensors", 1.0, 1.0), ("style/unet-only.safetensors", 0.5, 0.5)], 1.5),
    ([("peft-meta.safetensors", 1.0, 0.25), ("kohya-ldm.safetensors", -0.5, 1.5)], 1.0),
    ([("lcm-lora.safetensors", 1.0, 1.0), ("kohya.safetensors", 0.8, 0.8)], 1.5),
    ([("lcm-lora-peft.safetensors", 1.0, 0.0)], 1.0),
], ids=["kohya", "kohya-ldm", "peft", "peft-metadata", "two-adapters", "separate-clip-strengths", "lcm-lora+style",
        "lcm-lora-peft"])
def test_lora_stack_matches_diffusers_adapters(executor, base_pipeline, lora_files, loras, guidance):
    expected = run_diffusers(diffusers_with(base_pipeline, loras, lora_files), guidance=guidance)
    got = ours(executor, graph(loras, guidance=guidance))
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(expected, plain_image(base_pipeline, guidance)) > 1e-2  # the LoRA does change the image


def test_a_file_saved_by_diffusers_training_scripts_applies_every_layer(executor, lora_files):
    """Attention layers spelt "to_q.lora.down" next to "conv1.lora_A" in one file: the same weights as the peft file,
    so exactly the same image. (diffusers' own load_lora_weights gives a different image for this file than for the
    peft one, max difference 0.047 on the tiny model, so it is no reference here.)"""
    same_weights = ours(executor, graph([("lcm-lora-peft.safetensors", 1.0, 0.0)]))
    assert max_diff(ours(executor, graph([("lcm-lora-diffusers.safetensors", 1.0, 0.0)])), same_weights) == 0.0


def test_lora_stack_is_bit_identical_to_diffusers_with_the_same_memory_layout(executor, base_pipeline, lora_files):
    loras = [("peft-meta.safetensors", 1.0, 0.25), ("kohya-ldm.safetensors", -0.5, 1.5),
             ("kohya.safetensors", 0.5, 0.0), ("peft.safetensors", 0.0, 1.0)]
    expected = run_diffusers(diffusers_with(base_pipeline, loras, lora_files, aligned=True), guidance=1.5)
    assert max_diff(ours(executor, graph(loras, guidance=1.5)), expected) == 0.0


def test_text_encoder_lora_alone_changes_only_the_prompt_embedding(executor, base_pipeline, lora_files):
    loras = [("kohya.safetensors", 0.0, 1.0)]
    expected = run_diffusers(diffusers_with(base_pipeline, loras, lora_files))
    assert max_diff(ours(executor, graph(loras)), expected) <= TOLERANCE
    result = executor.run(graph(loras))
    assert result.output("lora", "model") is result.output("ckpt", "model")  # nothing to patch on the UNet


def test_strength_zero_is_exactly_no_lora(executor, lora_files):
    plain = ours(executor, graph([]))
    zero = ours(executor, graph([("kohya.safetensors", 0.0, 0.0), ("peft.safetensors", 0.0, 0.0)]))
    assert (plain == zero).all()
    one = ours(executor, graph([("kohya.safetensors", 1.0, 1.0)]))
    assert max_diff(plain, one) > 1e-2


def test_the_checkpoint_weights_are_never_changed(executor, lora_files):
    result = executor.run(graph([("kohya.safetensors", 1.0, 1.0), ("peft-meta.safetensors", 0.5, 2.0)]))
    assert result.status == "success", result.errors
    model, clip = result.output("ckpt", "model"), result.output("ckpt", "clip")
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in clip.text_encoder.state_dict().items()}
    for _ in range(2):  # a second run with another strength uses the same (cached) checkpoint
        executor.run(graph([("kohya.safetensors", 0.5, 1.0)], seed=3))
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert all(torch.equal(before_te[k], v) for k, v in clip.text_encoder.state_dict().items())
    assert before.keys() == model.unet.state_dict().keys()  # no LoRA layers were injected
    assert not any(m._forward_hooks for m in model.unet.modules())  # and no hook was left behind
    assert not any(m._forward_hooks for m in clip.text_encoder.modules())


def test_two_branches_with_different_stacks_from_one_loader(executor, base_pipeline, lora_files):
    a, b = [("kohya.safetensors", 1.0, 1.0)], [("peft.safetensors", 0.5, 0.5)]
    wf = graph(a)
    wf.add("lora_b", "LoRAStack", model=L("ckpt", "model"), clip=L("ckpt", "clip"),
           loras=[{"lora": n, "strength_model": sm, "strength_clip": sc} for n, sm, sc in b])
    wf.add("pos_b", "CLIPEncode", clip=L("lora_b", "clip"), text=PROMPT)
    wf.add("sample_b", "LCMSampler", model=L("lora_b", "model"), positive=L("pos_b", "conditioning"),
           latent=L("latent", "latent"), schedule=L("sched", "schedule"), seed=11, guidance=1.0)
    wf.add("decode_b", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample_b", "latent"))
    wf.add("plain", "LCMSampler", model=L("ckpt", "model"), positive=L("pos_plain", "conditioning"),
           latent=L("latent", "latent"), schedule=L("sched", "schedule"), seed=11, guidance=1.0)
    wf.add("pos_plain", "CLIPEncode", clip=L("ckpt", "clip"), text=PROMPT)
    wf.add("decode_plain", "VAEDecode", vae=L("ckpt", "vae"), latent=L("plain", "latent"))
    wf.outputs = ["decode", "decode_b", "decode_plain"]
    result = executor.run(wf)
    assert result.status == "success", result.errors
    assert max_diff(result.output("decode", "image"), run_diffusers(diffusers_with(base_pipeline, a, lora_files))) \
        <= TOLERANCE
    assert max_diff(result.output("decode_b", "image"), run_diffusers(diffusers_with(base_pipeline, b, lora_files))) \
        <= TOLERANCE
    assert max_diff(result.output("decode_plain", "image"), plain_image(base_pipeline, 1.0)) <= TOLERANCE


def test_chained_stacks_equal_one_stack_with_both_rows(executor, lora_files):
    rows = [("kohya.safetensors", 1.0, 0.5), ("peft-meta.safetensors", 0.5, 1.0)]
    one = ours(executor, graph(rows))
    wf = graph(rows[:1])
    wf.add("lora2", "LoRAStack", model=L("lora", "model"), clip=L("lora", "clip"),
           loras=[{"lora": "peft-meta.safetensors", "strength_model": 0.5, "strength_clip": 1.0}])
    for node, name in (("pos", "clip"), ("sched", "model"), ("sample", "model")):
        wf.nodes[node].inputs[name] = L("lora2", name)
    assert (ours(executor, wf) == one).all()  # the same additions in the same order


def test_a_new_prompt_does_not_repatch_and_a_new_strength_repatches_once(executor, lora_files):
    loras = [("kohya.safetensors", 1.0, 1.0), ("peft.safetensors", 0.5, 0.5)]
    executor.run(graph(loras))
    builds, reads = lora_module.PATCH_BUILDS, lora_module.FILE_READS
    result = executor.run(graph(loras, prompt="a red circle"))
    assert result.status == "success"
    assert result.nodes["lora"].status == "cached"
    assert lora_module.PATCH_BUILDS == builds
    result = executor.run(graph([loras[0], ("peft.safetensors", 0.75, 0.5)], prompt="a red circle"))
    assert result.status == "success"
    assert lora_module.PATCH_BUILDS == builds + 1
    assert lora_module.FILE_READS == reads  # the files were converted once; a new strength reuses them


def test_a_lora_for_another_family_is_a_clear_error(executor, lora_files):
    result = executor.run(graph([("sdxl.safetensors", 1.0, 1.0)]))
    assert result.status != "success"
    message = str(result.nodes["lora"].error)
    assert "sdxl.safetensors" in message
    assert "7 of its 7 LoRA layers match no layer" in message
    assert "SDXL" in message


def test_a_missing_file_and_an_out_of_range_strength_are_validation_errors(executor, lora_files):
    with pytest.raises(ng.ValidationFailed) as missing:
        executor.run(graph([("missing.safetensors", 1.0, 1.0)]))
    assert any(e.code == "not_an_option" and e.node_id == "lora" for e in missing.value.errors)
    with pytest.raises(ng.ValidationFailed) as too_strong:
        executor.run(graph([("kohya.safetensors", 5.0, 1.0)]))
    assert any(e.code == "out_of_range" and e.node_id == "lora" for e in too_strong.value.errors)


def test_pickled_loras_need_allow_pickle(executor, lora_files, models_root):
    from safetensors.torch import load_file

    torch.save(load_file(lora_files["kohya.safetensors"]), models_root / "loras" / "kohya.pt")
    refused = executor.run(graph([("kohya.pt", 1.0, 1.0)]))
    assert "--allow-pickle" in str(refused.nodes["lora"].error)
    executor.settings = executor.settings.replace(allow_pickle=True)
    from_pickle = ours(executor, graph([("kohya.pt", 1.0, 1.0)]))
    assert (from_pickle == ours(executor, graph([("kohya.safetensors", 1.0, 1.0)]))).all()
