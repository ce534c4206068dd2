"""The banded VAE decoder of the fast layout (nodes/lean_decode.py) computes diffusers' decode up to rounding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nodegraph import heap
from nodes import fastpaths, lean_decode


def _map(n, c, h, w, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g) * 2.0 + offset
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _norm_conv(c, out, groups, seed=1):
    torch.manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    conv = torch.nn.Conv2d(c, out, 3, padding=1)
    return norm, conv


@pytest.mark.parametrize("band_bytes", [1, 3 * 4 * 16 * 9, 1 << 30])  # one row, three rows, the whole map
@pytest.mark.parametrize("batch", [1, 2])
def test_bands_compute_group_norm_silu_conv(monkeypatch, band_bytes, batch):
    monkeypatch.setattr(lean_decode, "BAND_BYTES", band_bytes)  # bands of each image in turn
    norm, conv = _norm_conv(16, 8, groups=4)
    x = _map(batch, 16, 11, 9, offset=3.0)  # 11 rows: a short last band of two rows at three per band
    with torch.inference_mode():
        expected = conv(F.silu(norm(x)))
        got = lean_decode.norm_act_conv(x, norm, conv)
        residual = _map(batch, 8, 11, 9, seed=5)
        added = lean_decode.norm_act_conv(x, norm, conv, into=residual.clone())
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(added, expected + residual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("band_bytes", [1, 3 * 4 * 16 * 9, 1 << 30])
def test_the_shortcut_over_the_input_is_the_shortcut(monkeypatch, band_bytes):
    monkeypatch.setattr(lean_decode, "BAND_BYTES", band_bytes)  # one row per band is raised to two
    norm, conv = _norm_conv(16, 8, groups=4)
    shortcut = torch.nn.Conv2d(16, 8, 1)
    x = _map(1, 16, 11, 9)
    with torch.inference_mode():
        expected, expected_short = conv(F.silu(norm(x))), shortcut(x)
        got, short = lean_decode.norm_act_conv(x.clone(memory_format=torch.channels_last), norm, conv,
                                               shortcut=shortcut)
    assert short.untyped_storage().nbytes() == x.untyped_storage().nbytes()  # the input's bytes, overwritten
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short, expected_short, rtol=1e-5, atol=1e-5)


def test_group_statistics_hold_for_large_offsets():
    # a mean 1e5 times the spread: summed squares in float32 lose the variance (torch's own float32 GroupNorm is 43
    # units off here); per-band Welford statistics merged in float64 keep it
    norm, _ = _norm_conv(8, 8, groups=2)
    x = (torch.randn(1, 8, 40, 40, dtype=torch.float64) * 0.01 + 1000.0).float()
    x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = lean_decode.group_scale_shift(x, norm)
    exact = F.group_norm(x.double(), 2, norm.weight.double(), norm.bias.double(), norm.eps)
    got = torch.addcmul(shift, x.permute(0, 2, 3, 1), scale).permute(0, 3, 1, 2)
    # float32 holds x to 6e-5, which the scale (~100) makes 6e-3 of the output's unit spread
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-2)


def _vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=16).eval()


def _fast(vae, dtype):
    theirs = copy.deepcopy(vae).to(dtype).to(memory_format=torch.channels_last)
    return theirs, fastpaths.apply(copy.deepcopy(theirs), upsample=True)


def _decode(model, latent):
    with torch.inference_mode():
        return model.decode(latent.to(model.dtype).to(memory_format=torch.channels_last)).sample


@pytest.mark.parametrize("batch", [1, 2])  # one image writes its last level's shortcut over the input
def test_the_decoder_runs_in_bands_and_equals_diffusers_in_float32(monkeypatch, batch):
    monkeypatch.setattr(lean_decode, "MIN_BYTES", 0)  # every map of this small VAE in bands
    monkeypatch.setattr(lean_decode, "BAND_BYTES", 4 * 64 * 32 * 5)  # five rows of the 32-wide maps
    theirs, ours = _fast(_vae(), torch.float32)
    assert type(ours.decoder) is lean_decode.InferenceDecoder
    calls = []
    real = lean_decode.norm_act_conv
    monkeypatch.setattr(lean_decode, "norm_act_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    latent = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got, expected = _decode(ours, latent), _decode(theirs, latent)
    # both convolutions of six ResNets, and the output's; the first up block's three take the mid block's output,
    # which its attention leaves in the contiguous layout: they run their own forward
    assert len(calls) == 2 * 6 + 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_banded_decoder_in_bfloat16_is_as_close_to_float32_as_diffusers(monkeypatch):
    monkeypatch.setattr(lean_decode, "MIN_BYTES", 0)
    vae = _vae()
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    exact = _decode(vae, latent).double()
    theirs, ours = _fast(vae, torch.bfloat16)

    def error(model) -> float:
        return (_decode(model, latent).double() - exact).abs().mean().item()

    assert error(ours) <= 1.1 * error(theirs)


def test_small_maps_and_hooked_blocks_keep_their_own_forward(monkeypatch):
    from diffusers.models.autoencoders.vae import Decoder

    theirs, ours = _fast(_vae(), torch.float32)
    plain = fastpaths.apply(copy.deepcopy(theirs), upsample=True)
    plain.decoder.__class__ = Decoder  # the phase upsamplers and inference ResNets, diffusers' decoder loop
    latent = torch.randn(1, 4, 8, 8)
    calls = []
    real = lean_decode.norm_act_conv
    monkeypatch.setattr(lean_decode, "norm_act_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    # this VAE's maps are all below MIN_BYTES: no bands, and the very numbers of the blocks run one by one
    assert torch.equal(_decode(ours, latent), _decode(plain, latent))
    assert calls == []

    monkeypatch.setattr(lean_decode, "MIN_BYTES", 0)
    seen = []
    ours.decoder.up_blocks[1].resnets[0].conv1.register_forward_hook(lambda m, a, o: seen.append("conv1"))
    ours.decoder.up_blocks[2].register_forward_hook(lambda m, a, o: seen.append("block"))
    got = _decode(ours, latent)
    assert seen == ["conv1", "block"]  # a hooked ResNet and a hooked block ran as modules
    assert 0 < len(calls) < 2 * 9 + 1
    torch.testing.assert_close(got, _decode(theirs, latent), rtol=1e-5, atol=1e-5)


def test_decoders_in_the_fast_layout_trim_the_heap_between_their_stages(monkeypatch):
    _, ours = _fast(_vae(), torch.float32)
    trims = []
    monkeypatch.setattr(heap, "STAGE_TRIM_S", 0.0)
    monkeypatch.setattr(heap, "trim", lambda: trims.append(1) or True)
    _decode(ours, torch.randn(1, 4, 8, 8))
    # the encoder is not run; the decoder's mid block and up blocks are stages, and within the up blocks each
    # ResNet and upsampler trims first (their bands pile up in the heap otherwise)
    blocks = ours.decoder.up_blocks
    assert len(trims) == 1 + len(blocks) + sum(len(b.resnets) + len(b.upsamplers or ()) for b in blocks)
