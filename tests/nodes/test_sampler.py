"""The general Sampler: every sampler and schedule gives the image diffusers' own pipelines give with the matching
scheduler (text-to-image, image-to-image, inpainting, LCM, SDXL; float32, within 1e-5), it shares the patches and
controls LCMSampler honours, and the demo teacher draws what its captions say."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import nodegraph as ng
from nodegraph import Link as L

from .conftest import generator, max_diff
from .test_parity import add_latent, ours

TOLERANCE = 1e-5

#: sampler name -> (diffusers scheduler class, its options), as the node's interface defines them
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SCHEDULES = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "trailing": {"timestep_spacing": "trailing"},
}
#: the samplers whose schedulers offer karras, exponential and beta sigmas
SIGMA_SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "heun", "lms")


def sampler_graph(ckpt: str, prompt: str, *, sampler: str, schedule="default", steps=4, seed=0, guidance=7.5,
                  strength=1.0, eta=0.0, negative=None, image=None, mask=None, batch=1, width=64, height=64,
                  wrap_model=None, wrap_conditioning=None) -> ng.Workflow:
    """LoadCheckpoint -> CLIPEncode -> (EmptyLatent | LoadImage -> VAEEncode | InpaintEncode) -> Sampler ->
    VAEDecode ("decode"). ``wrap_model(wf, link)`` / ``wrap_conditioning(wf, link)`` may add nodes between the
    checkpoint's model / the prompt and the sampler, and return the link the sampler reads."""
    wf = ng.Workflow()
    wf.add("ckpt", "LoadCheckpoint", ckpt=ckpt)
    wf.add("pos", "CLIPEncode", clip=L("ckpt", "clip"), text=prompt)
    add_latent(wf, image=image, mask=mask, width=width, height=height, batch=batch)
    model, positive = L("ckpt", "model"), L("pos", "conditioning")
    if wrap_model is not None:
        model = wrap_model(wf, model)
    if wrap_conditioning is not None:
        positive = wrap_conditioning(wf, positive)
    inputs = dict(model=model, positive=positive, latent=L("latent", "latent"), seed=seed, steps=steps,
                  guidance=guidance, strength=strength, sampler=sampler, schedule=schedule, eta=eta)
    if negative is not None:
        wf.add("neg", "CLIPEncode", clip=L("ckpt", "clip"), text=negative)
        inputs["negative"] = L("neg", "conditioning")
    wf.add("sample", "Sampler", **inputs)
    wf.add("decode", "VAEDecode", vae=L("ckpt", "vae"), latent=L("sample", "latent"))
    wf.outputs = ["decode"]
    return wf


def scheduler(sampler: str, schedule: str, config):
    import diffusers

    cls, options = SAMPLERS[sampler]
    return getattr(diffusers, cls).from_config(config, **options, **SCHEDULES[schedule])


def reference(cls, components: dict, sampler: str, schedule: str = "default", **extra):
    """A new ``cls`` pipeline over ``components`` (shared weights) with the sampler's scheduler in place of theirs."""
    pipe = cls(**{**components, "scheduler": scheduler(sampler, schedule, components["scheduler"].config)}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_components(pipelines, ckpt="tiny-sd") -> dict:
    if ckpt == "tiny-sd":
        return dict(pipelines["sd"].components)
    return {**{k: v for k, v in pipelines["lcm"].components.items() if k != "image_encoder"}, "image_encoder": None}


def text_to_image(pipelines, ckpt, prompt, *, sampler, schedule="default", steps=4, seed=0, guidance=7.5, eta=0.0,
                  negative=None, batch=1) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = reference(StableDiffusionPipeline, sd_components(pipelines, ckpt), sampler, schedule)
    return pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                num_images_per_prompt=batch, generator=generator(seed), height=64, width=64,
                output_type="np").images


def case_id(case):
    return case if isinstance(case, str) else ",".join(f"{k}={v}" for k, v in case.items())


# ---------------------------------------------------------------------------------------------------------------
# The node's declaration
# ---------------------------------------------------------------------------------------------------------------


def test_the_sampler_node_offers_every_sampler_and_schedule_with_the_documented_defaults():
    node = ng.build_registry()["Sampler"]
    assert node.category == "sampling"
    inputs = node.inputs
    assert sorted(inputs["sampler"].options) == sorted(SAMPLERS) and inputs["sampler"].default == "euler"
    assert sorted(inputs["schedule"].options) == sorted(SCHEDULES) and inputs["schedule"].default == "default"
    assert (inputs["steps"].default, inputs["steps"].min, inputs["steps"].max) == (25, 1, 200)
    assert (inputs["seed"].default, inputs["guidance"].default) == (0, 7.5)
    assert (inputs["strength"].default, inputs["eta"].default) == (1.0, 0.0)
    assert inputs["negative"].optional and not inputs["positive"].optional
    assert [o.name for o in node.outputs] == ["latent"]


# ---------------------------------------------------------------------------------------------------------------
# Text-to-image: every sampler against StableDiffusionPipeline with the matching scheduler
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, case", [
    ("ddim", dict(steps=4, guidance=1.0)),
    ("ddim", dict(steps=3, guidance=2.0, eta=0.5)),  # DDIM's eta draws variance noise from the generator
    ("euler", dict(steps=4, guidance=7.5)),
    ("euler", dict(steps=3, guidance=4.0, negative="blurry")),
    ("euler_ancestral", dict(steps=4, guidance=3.0)),
    ("euler_ancestral", dict(steps=3, guidance=2.0, batch=2)),  # per-step draws for a batch, with CFG
    ("dpmpp_2m", dict(steps=5, guidance=1.0)),
    ("dpmpp_2m_sde", dict(steps=4, guidance=2.5)),
    ("unipc", dict(steps=5, guidance=5.0)),
    ("heun", dict(steps=3, guidance=2.0)),  # two UNet calls per step
    ("lms", dict(steps=5, guidance=1.0)),
    ("pndm", dict(steps=4, guidance=3.0)),  # Runge-Kutta warm-up steps
    ("ddpm", dict(steps=4, guidance=2.0)),
    ("tcd", dict(steps=4, guidance=1.0, eta=0.3)),  # TCD's gamma, with the generator's draws
    ("tcd", dict(steps=3, guidance=2.0, eta=0.7)),  # 0.3 is TCD's default: this needs eta passed
    ("lcm", dict(steps=4, guidance=1.0)),
], ids=case_id)
def test_text_to_image_matches_stable_diffusion_with_the_matching_scheduler(executor, pipelines, sampler, case):
    expected = text_to_image(pipelines, "tiny-sd", "a red circle", sampler=sampler, seed=7, **case)
    got = ours(executor, sampler_graph("tiny-sd", "a red circle", sampler=sampler, seed=7, **case))
    assert got.shape == expected.shape == (case.get("batch", 1), 64, 64, 3)
    assert max_diff(got, expected) <= TOLERANCE


def test_the_seed_and_the_sampler_change_the_image(executor):
    base = ours(executor, sampler_graph("tiny-sd", "a red circle", sampler="euler", steps=3, guidance=2.0))
    reseeded = ours(executor, sampler_graph("tiny-sd", "a red circle", sampler="euler", steps=3, guidance=2.0,
                                            seed=1))
    # (not ddim: at eta 0 it is Euler's method in other coordinates, the same image to 1e-6)
    other = ours(executor, sampler_graph("tiny-sd", "a red circle", sampler="dpmpp_2m", steps=3, guidance=2.0))
    assert max_diff(base, reseeded) > 1e-3 and max_diff(base, other) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, schedule", [
    ("euler", "karras"), ("dpmpp_2m", "karras"), ("heun", "karras"), ("dpmpp_2m_sde", "karras"),
    ("euler", "exponential"), ("dpmpp_2m", "exponential"), ("lms", "exponential"),
    ("euler", "beta"), ("dpmpp_2m", "beta"), ("unipc", "beta"),
    ("ddim", "trailing"), ("euler", "trailing"), ("dpmpp_2m", "trailing"), ("pndm", "trailing"),
])
def test_each_schedule_matches_diffusers_with_the_matching_scheduler_option(executor, pipelines, sampler, schedule):
    case = dict(sampler=sampler, steps=4, seed=3, guidance=2.0)
    expected = text_to_image(pipelines, "tiny-sd", "a blue square", schedule=schedule, **case)
    default = text_to_image(pipelines, "tiny-sd", "a blue square", **case)
    assert max_diff(expected, default) > 1e-5  # the schedule does change the image, so ignoring it would fail
    got = ours(executor, sampler_graph("tiny-sd", "a blue square", schedule=schedule, **case))
    assert max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("sampler, schedule", [(sampler, schedule) for sampler in SAMPLERS
                                               if sampler not in SIGMA_SAMPLERS
                                               for schedule in ("karras", "exponential", "beta")])
def test_a_schedule_the_sampler_does_not_offer_is_a_clear_error_on_the_sampler(executor, sampler, schedule):
    result = executor.run(sampler_graph("tiny-sd", "a cat", sampler=sampler, schedule=schedule, steps=2))
    assert result.status == "failed"
    assert result.nodes["sample"].status == "failed"
    message = result.nodes["sample"].error["message"]
    assert sampler in message and schedule in message, message


# ---------------------------------------------------------------------------------------------------------------
# Image-to-image and inpainting
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "heun"])
def test_image_to_image_matches_the_img2img_pipeline(executor, pipelines, input_dir, sampler, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = reference(StableDiffusionImg2ImgPipeline, sd_components(pipelines), sampler)
    image = Image.open(input_dir / "picture.png").convert("RGB")
    expected = pipe("a blue square", image=image, strength=strength, num_inference_steps=5, guidance_scale=3.0,
                    generator=generator(3), output_type="np").images
    got = ours(executor, sampler_graph("tiny-sd", "a blue square", sampler=sampler, steps=5, seed=3, guidance=3.0,
                                       strength=strength, image="picture.png"))
    assert max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_inpainting_matches_the_inpaint_pipeline(executor, pipelines, input_dir, sampler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = reference(StableDiffusionInpaintPipeline, sd_components(pipelines), sampler)
    image = Image.open(input_dir / "picture.png").convert("RGB")
    mask = Image.open(input_dir / "mask.png")
    expected = pipe("a yellow star", image=image, mask_image=mask, height=64, width=64, strength=strength,
                    num_inference_steps=4, guidance_scale=2.0, generator=generator(5), output_type="np").images
    got = ours(executor, sampler_graph("tiny-sd", "a yellow star", sampler=sampler, steps=4, seed=5, guidance=2.0,
                                       strength=strength, image="picture.png", mask="mask.png"))
    assert max_diff(got, expected) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# LCM and SDXL
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt, sampler, guidance", [
    ("tiny-lcm", "lcm", 8.5),  # an LCM-distilled UNet: guidance through timestep_cond, no CFG
    ("tiny-lcm", "lcm", 3.0),
    ("tiny-lcm", "euler", 6.0),  # any sampler on a distilled UNet still feeds its guidance embedding
    ("tiny-sd", "lcm", 1.0),  # LCM-LoRA style: a plain UNet, no CFG at 1.0
])
def test_lcm_sampling_matches_stable_diffusion_with_an_lcm_scheduler(executor, pipelines, ckpt, sampler, guidance):
    expected = text_to_image(pipelines, ckpt, "a green triangle", sampler=sampler, steps=4, seed=11,
                             guidance=guidance)
    got = ours(executor, sampler_graph(ckpt, "a green triangle", sampler=sampler, steps=4, seed=11,
                                       guidance=guidance))
    assert max_diff(got, expected) <= TOLERANCE


@pytest.fixture(scope="module")
def sdxl_components(models_root):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(models_root / "checkpoints" / "tiny-sdxl", local_files_only=True)
    return dict(pipe.components)


@pytest.mark.parametrize("sampler, case", [
    ("euler", dict(guidance=1.0)),
    ("euler", dict(guidance=2.0, width=48)),  # size conditioning of a non-square image
    ("dpmpp_2m", dict(guidance=2.0, negative="blurry")),
    ("dpmpp_2m", dict(guidance=3.0)),  # SDXL's zero negative embedding
], ids=case_id)
def test_sdxl_matches_the_sdxl_pipeline_with_the_matching_scheduler(executor, sdxl_components, sampler, case):
    from diffusers import StableDiffusionXLPipeline

    pipe = reference(StableDiffusionXLPipeline, sdxl_components, sampler)
    expected = pipe("a red circle", negative_prompt=case.get("negative"), num_inference_steps=4,
                    guidance_scale=case["guidance"], height=64, width=case.get("width", 64), generator=generator(5),
                    output_type="np").images
    got = ours(executor, sampler_graph("tiny-sdxl", "a red circle", sampler=sampler, steps=4, seed=5, **case))
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# What the Sampler shares with LCMSampler: patches on the model, controls on the conditioning
# ---------------------------------------------------------------------------------------------------------------


def test_freeu_before_the_sampler_matches_diffusers(executor, pipelines):
    from diffusers import StableDiffusionPipeline

    def freeu(wf, model):
        wf.add("freeu", "FreeU", model=model, s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        return L("freeu", "model")

    case = dict(sampler="dpmpp_2m", steps=4, seed=4, guidance=2.0)
    got = ours(executor, sampler_graph("tiny-sd", "a red circle", wrap_model=freeu, **case))
    pipe = reference(StableDiffusionPipeline, sd_components(pipelines), "dpmpp_2m")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # on the shared UNet: switched off again below
    try:
        expected = pipe("a red circle", num_inference_steps=4, guidance_scale=2.0, generator=generator(4),
                        height=64, width=64, output_type="np").images
    finally:
        pipe.disable_freeu()
    assert max_diff(got, expected) <= TOLERANCE
    plain = ours(executor, sampler_graph("tiny-sd", "a red circle", **case))
    assert max_diff(plain, got) > 1e-3  # FreeU changed the image


@pytest.fixture(scope="module")
def tiny_controlnet(models_root):
    """A tiny ControlNet for tiny-sd in the models folder's controlnet/ (a name of its own: test_control builds
    its set when its "tiny-cn" is missing)."""
    from nodes.testing.tiny_adapters import build_tiny_controlnet

    path = models_root / "controlnet" / "tiny-cn-sampler"
    if not path.is_dir():
        build_tiny_controlnet(models_root / "checkpoints" / "tiny-sd", path, seed=2)
    return path


@pytest.mark.parametrize("sampler", ["euler", "heun"])  # heun: a control window over its doubled timesteps
def test_a_controlnet_window_before_the_sampler_matches_the_controlnet_pipeline(executor, pipelines, input_dir,
                                                                               tiny_controlnet, sampler):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    def control(wf, cond):
        wf.add("cn", "LoadControlNet", control_net=tiny_controlnet.name)
        wf.add("cimg", "LoadImage", image="picture.png")
        wf.add("apply", "ControlNetApply", conditioning=cond, control_net=L("cn", "control_net"),
               image=L("cimg", "image"), strength=1.2, start_percent=0.25, end_percent=0.75)
        return L("apply", "conditioning")

    case = dict(sampler=sampler, steps=4, seed=7, guidance=2.0, negative="blurry")
    got = ours(executor, sampler_graph("tiny-sd", "a red circle", wrap_conditioning=control, **case))
    net = ControlNetModel.from_pretrained(tiny_controlnet, local_files_only=True)
    pipe = reference(StableDiffusionControlNetPipeline, sd_components(pipelines), sampler, controlnet=net)
    expected = pipe("a red circle", image=Image.open(input_dir / "picture.png").convert("RGB"),
                    negative_prompt="blurry", num_inference_steps=4, guidance_scale=2.0,
                    controlnet_conditioning_scale=1.2, control_guidance_start=0.25, control_guidance_end=0.75,
                    height=64, width=64, generator=generator(7), output_type="np").images
    assert max_diff(got, expected) <= TOLERANCE
    plain = ours(executor, sampler_graph("tiny-sd", "a red circle", **case))
    assert max_diff(plain, got) > 1e-3  # the control had an effect


# ---------------------------------------------------------------------------------------------------------------
# The demo teacher
# ---------------------------------------------------------------------------------------------------------------

#: (caption, seed): four shapes and colour pairs the teacher draws at 25 DDIM steps, guidance 3
DEMO_CAPTIONS = [("a red circle on a blue background", 0), ("a purple circle on a white background", 2),
                 ("a white square on a green background", 3), ("a green triangle on an orange background", 4)]


def test_the_demo_teacher_draws_its_captions_with_ddim(executor):
    from nodes.demo import shapes

    verdicts = []
    for caption, seed in DEMO_CAPTIONS:
        image = ours(executor, sampler_graph("demo-teacher", caption, sampler="ddim", steps=25, seed=seed,
                                             guidance=3.0))
        assert image.shape == (1, 64, 64, 3)  # the demo VAE's 4x downscale: a 16x16 latent
        verdicts.append(shapes.judge((image[0] * 255).round().astype(np.uint8), caption))
    correct = [caption for (caption, _), verdict in zip(DEMO_CAPTIONS, verdicts) if verdict["correct"]]
    assert len(correct) >= 3, verdicts


def test_the_demo_teacher_matches_stable_diffusion_with_ddim(executor):
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, UNet2DConditionModel

    from nodes.checkpoint import DEMO_DIR

    lcm = LatentConsistencyModelPipeline.from_pretrained(DEMO_DIR, local_files_only=True)
    teacher = UNet2DConditionModel.from_pretrained(DEMO_DIR, subfolder="teacher_unet", local_files_only=True)
    components = {**{k: v for k, v in lcm.components.items() if k != "image_encoder"}, "unet": teacher,
                  "image_encoder": None}
    pipe = reference(StableDiffusionPipeline, components, "ddim")
    caption, seed = DEMO_CAPTIONS[0]
    expected = pipe(caption, num_inference_steps=25, guidance_scale=3.0, generator=generator(seed), height=64,
                    width=64, output_type="np").images
    got = ours(executor, sampler_graph("demo-teacher", caption, sampler="ddim", steps=25, seed=seed, guidance=3.0))
    assert max_diff(got, expected) <= TOLERANCE
