"""Parity tests: nodes.lcm_math against diffusers' own LCMScheduler and LCM pipeline helpers.

Every comparison is exact (torch.equal / ==), because the sampler nodes must reproduce
diffusers bit for bit in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.lcm_math import (
    LCMSchedulerConfig,
    Timesteps,
    add_noise,
    alphas_cumprod,
    guidance_embedding,
    lcm_step,
    lcm_timesteps,
    randn_like_diffusers,
)

DEFAULT = LCMSchedulerConfig()
# Built once: LCMScheduler construction dominates the cost of a set_timesteps comparison.
DIFFUSERS_DEFAULT = LCMScheduler()

hypothesis_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    """diffusers logs a warning for every off-grid custom timestep; the tests make many on purpose."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


def diffusers_schedule(scheduler: LCMScheduler = DIFFUSERS_DEFAULT, steps=None, **kwargs) -> Timesteps:
    scheduler.set_timesteps(steps, **kwargs)
    return Timesteps(tuple(scheduler.timesteps.tolist()), scheduler.num_inference_steps)


# ---------------------------------------------------------------------------
# alphas_cumprod and the config
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale", [False, True])
def test_alphas_cumprod_is_bit_identical_to_diffusers(beta_schedule, rescale):
    ours = alphas_cumprod(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
    theirs = LCMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale).alphas_cumprod
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_alphas_cumprod_with_other_train_length_and_betas():
    kwargs = dict(num_train_timesteps=500, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    assert torch.equal(alphas_cumprod(**kwargs), LCMScheduler(**kwargs).alphas_cumprod)


def test_trained_betas_replace_the_named_schedule():
    betas = [0.001 * (1 + i % 7) for i in range(1000)]
    config = LCMSchedulerConfig(trained_betas=betas, beta_schedule="not-a-schedule")
    assert torch.equal(config.alphas_cumprod(), LCMScheduler(trained_betas=betas).alphas_cumprod)


def test_config_reads_a_diffusers_scheduler_config_and_ignores_unknown_keys():
    config = LCMSchedulerConfig.from_dict(dict(DIFFUSERS_DEFAULT.config))
    assert config == DEFAULT
    # An SD1.5-style scheduler_config.json of another scheduler class: LCM defaults fill the gaps.
    pndm = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    assert LCMSchedulerConfig.from_dict(pndm) == DEFAULT
    assert LCMSchedulerConfig.from_dict({"timestep_scaling": 10, "original_inference_steps": 25}) == (
        LCMSchedulerConfig(timestep_scaling=10.0, original_inference_steps=25)
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_train_timesteps", 0),
        ("num_train_timesteps", 1000.5),
        ("beta_schedule", "cosine"),
        ("beta_start", -0.1),
        ("beta_end", 1.0),
        ("beta_end", "0.012"),
        ("original_inference_steps", 0),
        ("original_inference_steps", 1001),
        ("prediction_type", "flow"),
        ("timestep_scaling", 0.0),
        ("timestep_scaling", math.inf),
        ("clip_sample_range", -1.0),
        ("dynamic_thresholding_ratio", 1.5),
        ("trained_betas", [0.01] * 10),
    ],
)
def test_invalid_config_values_raise_a_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LCMSchedulerConfig.from_dict({field: value})


# ---------------------------------------------------------------------------
# Primitive B: timesteps
# ---------------------------------------------------------------------------

REFERENCE_TABLE = [  # LCMScheduler.set_timesteps, worked by hand
    (dict(steps=1), [999]),
    (dict(steps=2), [999, 499]),
    (dict(steps=3), [999, 679, 339]),
    (dict(steps=4), [999, 759, 499, 259]),
    (dict(steps=5), [999, 799, 599, 399, 199]),
    (dict(steps=6), [999, 839, 679, 499, 339, 179]),
    (dict(steps=8), [999, 879, 759, 639, 499, 379, 259, 139]),
    (dict(steps=4, strength=0.3), [299, 239, 159, 79]),
    (dict(steps=4, strength=0.5), [499, 379, 259, 139]),
    (dict(steps=4, strength=0.6), [599, 459, 299, 159]),
    (dict(steps=4, strength=0.8), [799, 599, 399, 199]),
    (dict(steps=4, original_inference_steps=100), [999, 749, 499, 249]),
]


@pytest.mark.parametrize(("kwargs", "expected"), REFERENCE_TABLE)
def test_reference_timestep_table(kwargs, expected):
    schedule = lcm_timesteps(DEFAULT, **kwargs)
    assert list(schedule.timesteps) == expected
    assert schedule.num_inference_steps == len(expected)
    assert schedule == diffusers_schedule(**kwargs)


@pytest.mark.parametrize(
    ("original", "steps", "strength"),
    [
        (30, 22, 1.0),
        (30, 26, 1.0),
        (45, 33, 1.0),
        (50, 50, 1.0),
        (50, 7, 0.75),
        (50, 13, 0.9),
        (100, 17, 0.37),
        (1000, 999, 1.0),
        (1000, 3, 0.01),
        (7, 7, 1.0),
        (1, 1, 1.0),
        (60, 22, 0.5),  # L = 30
    ],
)
def test_steps_match_diffusers(original, steps, strength):
    kwargs = dict(steps=steps, original_inference_steps=original, strength=strength)
    assert lcm_timesteps(DEFAULT, **kwargs) == diffusers_schedule(**kwargs)


def test_index_spacing_is_float_floor_not_integer_division():
    # L = 30, n = 22: floor(i * (30 / 22)) and i * 30 // 22 disagree (e.g. at i = 11).
    schedule = lcm_timesteps(DEFAULT, 22, original_inference_steps=30)
    origin = [(i + 1) * 33 - 1 for i in range(30)][::-1]
    integer_division = tuple(origin[i * 30 // 22] for i in range(22))
    assert schedule.timesteps != integer_division
    assert schedule == diffusers_schedule(steps=22, original_inference_steps=30)


_diffusers_by_train_length = {1000: DIFFUSERS_DEFAULT}


@st.composite
def step_requests(draw):
    """A train length, an original schedule length, a step count (mostly valid, sometimes too many) and a strength."""
    n_train = draw(st.sampled_from([1000, 999, 500, 1024]))
    original = draw(st.integers(1, n_train))
    steps = draw(st.integers(1, original) | st.integers(original + 1, original + 5))
    return n_train, dict(steps=steps, original_inference_steps=original, strength=draw(st.floats(0.001, 1.0)))


@hypothesis_settings
@given(step_requests())
def test_any_steps_original_strength_combination_matches_diffusers(request):
    n_train, kwargs = request
    scheduler = _diffusers_by_train_length.setdefault(n_train, LCMScheduler(num_train_timesteps=n_train))
    config = LCMSchedulerConfig(num_train_timesteps=n_train)
    try:
        expected = diffusers_schedule(scheduler, **kwargs)
    except ValueError:
        with pytest.raises(ValueError):
            lcm_timesteps(config, **kwargs)
        return
    assert lcm_timesteps(config, **kwargs) == expected


descending_timesteps = st.lists(st.integers(0, 999), min_size=1, max_size=60, unique=True).map(
    lambda ts: sorted(ts, reverse=True)
)


@hypothesis_settings
@given(timesteps=descending_timesteps, strength=st.floats(0.01, 1.0))
def test_custom_timesteps_with_strength_match_diffusers(timesteps, strength):
    expected = diffusers_schedule(timesteps=timesteps, strength=strength)
    if not expected.timesteps:  # diffusers silently returns an empty schedule
        with pytest.raises(ValueError, match="strength"):
            lcm_timesteps(DEFAULT, timesteps=timesteps, strength=strength)
        return
    schedule = lcm_timesteps(DEFAULT, timesteps=timesteps, strength=strength)
    assert schedule == expected


def test_sliced_custom_schedule_keeps_the_full_length_so_no_step_is_final():
    schedule = lcm_timesteps(DEFAULT, timesteps=[999, 759, 499, 259], strength=0.5)
    assert schedule.timesteps == (499, 259)
    assert schedule.num_inference_steps == 4
    assert not any(schedule.is_final(i) for i in range(len(schedule)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(steps=51), "steps=51"),
        (dict(steps=8, original_inference_steps=4), "steps=8"),
        (dict(steps=4, strength=0.05), "strength=0.05"),
        (dict(steps=4, original_inference_steps=1001), "1001"),
        (dict(timesteps=[999, 499, 499]), r"timesteps\[2\]=499"),
        (dict(timesteps=[499, 999]), r"timesteps\[1\]=999"),
        (dict(timesteps=[1000, 500]), "1000"),
    ],
)
def test_invalid_schedules_raise_value_errors_like_diffusers(kwargs, message):
    with pytest.raises(ValueError):
        diffusers_schedule(**kwargs)
    with pytest.raises(ValueError, match=message):
        lcm_timesteps(DEFAULT, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "exactly one"),
        (dict(steps=4, timesteps=[999]), "exactly one"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=4, strength=0.0), "strength"),
        (dict(steps=4, strength=1.5), "strength"),
        (dict(steps=4, original_inference_steps=0), "original_inference_steps"),
        (dict(timesteps=[]), "empty"),
        (dict(timesteps=[999, -1]), "-1"),
        (dict(timesteps=[999, 499.5]), "499.5"),
    ],
)
def test_other_bad_schedule_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lcm_timesteps(DEFAULT, **kwargs)


# ---------------------------------------------------------------------------
# Primitive C: the step, over whole sampling loops
# ---------------------------------------------------------------------------


def fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for the UNet: depends on the sample and the timestep."""
    return torch.tanh(x) * 0.7 + math.cos(t / 100.0) * 0.3


def run_diffusers(scheduler, x, seed, n_generators, **schedule_kwargs):
    generator = make_generators(seed, n_generators)
    scheduler.set_timesteps(**schedule_kwargs)
    outputs = []
    for t in scheduler.timesteps:
        x, denoised = scheduler.step(fake_model(x, int(t)), t, x, generator=generator, return_dict=False)
        outputs.append((x, denoised))
    return outputs, generator


def run_ours(config, x, seed, n_generators, **schedule_kwargs):
    generator = make_generators(seed, n_generators)
    schedule = lcm_timesteps(config, **schedule_kwargs)
    table = config.alphas_cumprod()
    outputs = []
    for i, t in enumerate(schedule.timesteps):
        x, denoised = lcm_step(
            fake_model(x, t), x, step_index=i, schedule=schedule, alphas_cumprod=table, config=config,
            generator=generator,
        )  # fmt: skip
        outputs.append((x, denoised))
    return outputs, generator


def make_generators(seed, n):
    if n == 0:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + b) for b in range(n)]


def generator_states(generator):
    gens = generator if isinstance(generator, list) else [generator]
    return [g.get_state() for g in gens]


LOOP_CASES = [
    pytest.param({}, dict(num_inference_steps=4), 0, torch.float32, id="eps-4-steps"),
    pytest.param({}, dict(num_inference_steps=1), 0, torch.float32, id="eps-1-step"),
    pytest.param({}, dict(num_inference_steps=8, original_inference_steps=100), 0, torch.float32, id="eps-8-of-100"),
    pytest.param({}, dict(num_inference_steps=4, strength=0.5), 0, torch.float32, id="eps-img2img"),
    pytest.param({}, dict(timesteps=[999, 759, 499, 259], strength=0.5), 0, torch.float32, id="eps-custom-sliced"),
    pytest.param({}, dict(timesteps=[999, 499, 19]), 3, torch.float32, id="eps-custom-generator-list"),
    pytest.param({}, dict(num_inference_steps=3), 3, torch.bfloat16, id="eps-bf16-generator-list"),
    pytest.param({"prediction_type": "v_prediction"}, dict(num_inference_steps=6), 0, torch.float32, id="v"),
    pytest.param({"prediction_type": "sample"}, dict(num_inference_steps=4), 0, torch.float32, id="sample"),
    pytest.param({"clip_sample": True, "clip_sample_range": 1.5}, dict(num_inference_steps=4), 0, torch.float32,
                 id="clip"),
    pytest.param({"thresholding": True, "sample_max_value": 1.2}, dict(num_inference_steps=4), 0, torch.float32,
                 id="threshold"),
    pytest.param({"thresholding": True}, dict(num_inference_steps=2), 0, torch.bfloat16, id="threshold-bf16"),
    pytest.param({"beta_schedule": "squaredcos_cap_v2", "timestep_scaling": 7.3}, dict(num_inference_steps=5), 0,
                 torch.float32, id="cosine-scaling"),
]  # fmt: skip


@pytest.mark.parametrize(("config_kwargs", "schedule_kwargs", "n_generators", "dtype"), LOOP_CASES)
def test_sampling_loop_is_bit_identical_to_diffusers(config_kwargs, schedule_kwargs, n_generators, dtype):
    batch = max(n_generators, 2)
    x = torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(123)).to(dtype)
    theirs, their_gen = run_diffusers(LCMScheduler(**config_kwargs), x, 7, n_generators, **schedule_kwargs)

    ours_kwargs = dict(schedule_kwargs)
    ours_kwargs["steps"] = ours_kwargs.pop("num_inference_steps", None)
    ours, our_gen = run_ours(LCMSchedulerConfig(**config_kwargs), x, 7, n_generators, **ours_kwargs)

    assert len(ours) == len(theirs)
    for (x_ours, d_ours), (x_theirs, d_theirs) in zip(ours, theirs, strict=True):
        assert x_ours.dtype == x_theirs.dtype == dtype
        assert torch.equal(d_ours, d_theirs)
        assert torch.equal(x_ours, x_theirs)
    # Same number of random draws, so a following draw from the same generator would agree too.
    for ours_state, their_state in zip(generator_states(our_gen), generator_states(their_gen), strict=True):
        assert torch.equal(ours_state, their_state)


def test_final_step_returns_denoised_and_draws_nothing():
    schedule = lcm_timesteps(DEFAULT, 2)
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    x = torch.randn(1, 4, 8, 8)
    prev, denoised = lcm_step(
        fake_model(x, 499), x, step_index=1, schedule=schedule, alphas_cumprod=DEFAULT.alphas_cumprod(),
        config=DEFAULT, generator=generator,
    )  # fmt: skip
    assert prev is denoised
    assert torch.equal(generator.get_state(), before)


def test_explicit_noise_is_used_instead_of_a_draw():
    schedule = lcm_timesteps(DEFAULT, 4)
    table = DEFAULT.alphas_cumprod()
    x = torch.randn(1, 4, 8, 8)
    noise = randn_like_diffusers(x.shape, torch.Generator().manual_seed(5), dtype=x.dtype, device=x.device)
    step = dict(step_index=0, schedule=schedule, alphas_cumprod=table, config=DEFAULT)
    with_noise = lcm_step(fake_model(x, 999), x, noise=noise, **step)
    with_generator = lcm_step(fake_model(x, 999), x, generator=torch.Generator().manual_seed(5), **step)
    assert torch.equal(with_noise[0], with_generator[0])


# ---------------------------------------------------------------------------
# Primitive A: guidance embedding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [8.5, 1.0, 2, 0.0, 15.3, 1.1])
@pytest.mark.parametrize(("dim", "batch"), [(256, 1), (256, 3), (5, 2), (4, 1), (512, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guidance_embedding_matches_the_pipeline(guidance, dim, batch, dtype):
    w = torch.tensor(guidance - 1).repeat(batch)  # what the pipeline passes in
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    theirs = theirs.to(device="cpu", dtype=dtype)
    ours = guidance_embedding(guidance, dim, batch, dtype, "cpu")
    assert ours.shape == (batch, dim) and ours.dtype == dtype
    assert torch.equal(ours, theirs)


def test_guidance_embedding_puts_sine_first():
    emb = guidance_embedding(2.0, 8, 1, torch.float32, "cpu")
    assert emb[0, 0] == torch.sin(torch.tensor(1000.0))
    assert emb[0, 4] == torch.cos(torch.tensor(1000.0))


@pytest.mark.parametrize(("dim", "batch"), [(3, 1), (256, 0)])
def test_guidance_embedding_rejects_degenerate_sizes(dim, batch):
    with pytest.raises(ValueError):
        guidance_embedding(8.0, dim, batch, torch.float32, "cpu")


# ---------------------------------------------------------------------------
# Primitive D: add_noise
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", [999, 799, 259, 19, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_matches_diffusers(t, dtype):
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn((2, 4, 8, 8), generator=g).to(dtype)
    noise = torch.randn((2, 4, 8, 8), generator=g).to(dtype)
    theirs = LCMScheduler().add_noise(x0, noise, torch.tensor([t]))
    ours = add_noise(x0, noise, t, DEFAULT.alphas_cumprod())
    assert ours.dtype == dtype
    assert torch.equal(ours, theirs)


def test_add_noise_with_a_timestep_per_sample():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((2, 2, 4, 4, 4), generator=g)  # two samples each
    ts = torch.tensor([999, 259])
    assert torch.equal(add_noise(x0, noise, ts, DEFAULT.alphas_cumprod()), LCMScheduler().add_noise(x0, noise, ts))


# ---------------------------------------------------------------------------
# RANDN
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_generators", [0, 1, 3])
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 2, 1, 1)])  # the second uses torch's <16-element path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_randn_matches_diffusers_randn_tensor(n_generators, shape, dtype):
    # n_generators == 1 is a list of one generator, which acts as a single generator.
    theirs = randn_tensor(shape, generator=make_generators(11, n_generators), device=torch.device("cpu"), dtype=dtype)
    ours = randn_like_diffusers(shape, make_generators(11, n_generators), dtype=dtype, device="cpu")
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, theirs)


def test_randn_needs_one_generator_per_sample():
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_like_diffusers((3, 4), make_generators(0, 2), dtype=torch.float32, device="cpu")
