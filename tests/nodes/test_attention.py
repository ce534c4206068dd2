"""Banded bfloat16 attention (nodes/attention.py): the same attention as SDPA, band by band; taken only in bfloat16
on the CPU at 256 queries or more, elsewhere diffusers' processor runs unchanged; what the fast layout's models
run, within rounding of SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import nodegraph as ng

from nodes import attention


def _qkv(batch, heads, queries, keys, channels, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, channels, generator=g)
    k, v = (torch.randn(batch, heads, keys, channels, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _heads_last(out: torch.Tensor) -> torch.Tensor:  # SDPA's [b, h, n, c] as banded_attention's [b, n, h * c]
    return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("batch, heads, queries, keys, channels, band", [
    (1, 2, 300, 300, 8, 7), (2, 3, 257, 77, 16, 64), (1, 1, 64, 500, 24, 1 << 21)])
def test_bands_compute_sdpa_in_float32(monkeypatch, batch, heads, queries, keys, channels, band):
    # bands of 64 rows with a shorter last one, cross-attention (keys != queries), and one band for everything
    monkeypatch.setattr(attention, "BAND_ELEMENTS", band * batch * heads * keys)
    q, k, v = _qkv(batch, heads, queries, keys, channels)
    got = attention.banded_attention(q, k, v)
    torch.testing.assert_close(got, _heads_last(F.scaled_dot_product_attention(q, k, v)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scores_scale", [1.0, 2.0])
def test_in_bfloat16_the_bands_cost_less_than_twice_and_a_half_sdpas_error(scores_scale):
    q, k, v = _qkv(1, 4, 512, 512, 40, seed=1)
    q = q * scores_scale
    exact = _heads_last(F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    inputs_only = _heads_last(F.scaled_dot_product_attention(qb.double(), kb.double(), vb.double())) - exact
    banded = attention.banded_attention(qb, kb, vb).double() - exact
    sdpa = _heads_last(F.scaled_dot_product_attention(qb, kb, vb)).double() - exact

    def rms(t):
        return t.pow(2).mean().sqrt().item()

    # the scores' rounding to bfloat16 costs something (1.5-1.9x SDPA's error here), within a small factor
    assert rms(banded) < 2.5 * rms(sdpa)
    assert rms(banded - inputs_only) < 2.5 * rms(inputs_only)


def _attention_module(kind: str) -> tuple[Attention, dict]:
    torch.manual_seed(0)
    if kind == "self":
        return Attention(32, heads=2, dim_head=16), {}
    if kind == "cross":
        context = {"encoder_hidden_states": torch.randn(2, 77, 24)}
        return Attention(32, cross_attention_dim=24, heads=4, dim_head=8), context
    # the VAE's middle attention: an image in, group norm, one head, residual and a rescale
    return Attention(32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True, bias=True,
                     rescale_output_factor=2.0, upcast_softmax=True, _from_deprecated_attn_block=True), {}


def _inputs(kind: str, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    side = int(tokens ** 0.5)
    return torch.randn(2, 32, side, side, generator=g) if kind == "vae" else torch.randn(2, tokens, 32, generator=g)


@pytest.mark.parametrize("kind", ["self", "cross", "vae"])
def test_the_processor_runs_bands_in_bfloat16_within_rounding_of_sdpa(monkeypatch, kind):
    module, kwargs = _attention_module(kind)
    module = module.eval().to(torch.bfloat16)
    banded = copy.deepcopy(module)
    assert attention.use_banded(banded) == 1 and isinstance(banded.processor, attention.BandedAttnProcessor)
    calls = []
    real = attention.banded_attention
    monkeypatch.setattr(attention, "banded_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    x = _inputs(kind, 256).bfloat16()
    kwargs = {name: t.bfloat16() for name, t in kwargs.items()}
    with torch.inference_mode():
        expected, got = module(x, **kwargs).float(), banded(x, **kwargs).float()
    assert calls and got.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * scale)
    assert (got - expected).abs().mean() < 2e-3 * scale


@pytest.mark.parametrize("kind", ["self", "cross", "vae"])
@pytest.mark.parametrize("dtype, tokens, masked", [(torch.float32, 256, False), (torch.bfloat16, 64, False),
                                                   (torch.bfloat16, 256, True)])
def test_elsewhere_the_processor_is_diffusers_own(monkeypatch, kind, dtype, tokens, masked):
    # float32 (the exact path), the small sequences where bands gain nothing, and masks: AttnProcessor2_0 itself
    module, kwargs = _attention_module(kind)
    module = module.eval().to(dtype)
    banded = copy.deepcopy(module)
    attention.use_banded(banded)
    monkeypatch.setattr(attention, "banded_attention", lambda *a: pytest.fail("the bands ran"))
    x = _inputs(kind, tokens).to(dtype)
    kwargs = {name: t.to(dtype) for name, t in kwargs.items()}
    if masked:
        if kind == "vae":
            pytest.skip("diffusers' VAE attention takes no mask")
        keys = kwargs["encoder_hidden_states"].shape[1] if kwargs else tokens
        kwargs["attention_mask"] = torch.ones(2, keys, dtype=dtype)
    with torch.inference_mode():
        assert torch.equal(banded(x, **kwargs), module(x, **kwargs))


def test_only_default_processors_are_replaced():
    class Custom(AttnProcessor2_0):
        pass

    holder = torch.nn.ModuleList([Attention(16, heads=2, dim_head=8), Attention(16, heads=2, dim_head=8)])
    holder[1].set_processor(Custom())
    assert attention.use_banded(holder) == 1
    assert isinstance(holder[0].processor, attention.BandedAttnProcessor) and type(holder[1].processor) is Custom


@pytest.mark.parametrize("memory_format, banded", [("auto", True), ("contiguous", False)])
def test_checkpoints_take_banded_attention_in_the_fast_layout_only(executor, models_root, tmp_path, memory_format,
                                                                    banded):
    from tests.nodes.test_parity import graph

    executor.settings = ng.Settings(models_dir=models_root, dtype="bfloat16", device="cpu",
                                    memory_format=memory_format, temp_dir=tmp_path / "t", output_dir=tmp_path / "o")
    executor.cache.clear()
    result = executor.run(graph("tiny-lcm", "a red circle"), outputs=["ckpt"])
    for module in (result.output("ckpt", "model").unet, result.output("ckpt", "vae").vae):
        kinds = {type(m.processor) for m in module.modules() if isinstance(m, Attention)}
        assert kinds == ({attention.BandedAttnProcessor} if banded else {AttnProcessor2_0})


@pytest.mark.parametrize("ckpt, size, cells, calls_expected", [
    # 256 cells at the UNet's first level (self and cross in its 3 transformers there, 4 steps) and the VAE's middle
    ("tiny-lcm", 128, {256}, 4 * 6 + 1),
    # SDXL attends from its second level on (2 transformer layers a block): 256 cells at 256 pixels, the VAE 1,024
    ("tiny-sdxl-lcm", 256, {256, 1024}, 4 * 16 + 1),
])
def test_a_bfloat16_image_with_bands_is_the_image_sdpa_draws(models_root, tmp_path, monkeypatch, ckpt, size, cells,
                                                              calls_expected):
    from tests.nodes.test_parity import graph

    images, calls = {}, []
    real = attention.banded_attention
    monkeypatch.setattr(attention, "banded_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    for bands in (True, False):
        if not bands:
            assert {shape[2] for shape in calls} == cells
            monkeypatch.setattr(attention, "MIN_QUERIES", 1 << 30)
        settings = ng.Settings(models_dir=models_root, dtype="bfloat16", device="cpu", temp_dir=tmp_path / "t",
                               output_dir=tmp_path / "o")
        wf = graph(ckpt, "a red circle", width=size, height=size, guidance=1.0)
        images[bands] = torch.as_tensor(ng.Executor(ng.build_registry(), settings=settings).run(wf).output("decode"))
    difference = (images[True].float() - images[False].float()).abs()
    assert len(calls) == calls_expected and difference.max() < 0.04 and difference.mean() < 3e-3
