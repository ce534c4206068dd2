"""The inference form of ResnetBlock2D is bit-identical to diffusers' and is what loaded checkpoints run (so every
parity test of the suite runs through it). The phase form of Upsample2D equals diffusers' up to rounding, is what
VAEs run in the fast layout, and steps aside wherever it could not be the same computation."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

import nodegraph as ng

from nodes import fastpaths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_channels, temb_channels, norm, temb_size", [
    (8, 16, "default", 16), (16, 16, "default", 16), (8, None, "default", None), (8, None, "default", 8),
    (8, None, "group", None), (16, None, "group", 16),  # VAE decoders' blocks: "group" ignores any temb
])
def test_the_inference_block_is_bit_identical(dtype, out_channels, temb_channels, norm, temb_size):
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=out_channels, temb_channels=temb_channels, groups=4,
                          time_embedding_norm=norm).eval()
    block = block.to(dtype)
    fast = fastpaths.apply(copy.deepcopy(block))
    assert type(fast) is fastpaths.InferenceResnetBlock2D
    x = torch.randn(2, 8, 12, 12, dtype=dtype)
    temb = torch.randn(2, temb_size, *(() if temb_channels else (1, 1)), dtype=dtype) if temb_size else None
    with torch.inference_mode():
        assert torch.equal(fast(x, temb), block(x, temb))
    fast.train()  # training keeps diffusers' forward (dropout)
    assert torch.equal(fast(x, temb), block.train()(x, temb))


def test_resampling_blocks_keep_their_forward():
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4, up=True)
    assert type(fastpaths.apply(block)) is ResnetBlock2D


def test_loaded_checkpoints_run_the_inference_blocks(executor):
    from tests.nodes.test_parity import graph

    result = executor.run(graph("tiny-lcm", "a red circle"), outputs=["ckpt"])
    for module in (result.output("ckpt", "model").unet, result.output("ckpt", "vae").vae):
        kinds = {type(m) for m in module.modules() if isinstance(m, ResnetBlock2D)}
        assert kinds == {fastpaths.InferenceResnetBlock2D}  # the VAE decoder's "group" blocks too


def test_unet_and_vae_stages_trim_the_heap_on_the_cpu_only(executor, monkeypatch):
    from nodegraph import heap
    from tests.nodes.test_parity import graph

    result = executor.run(graph("tiny-lcm", "a red circle"), outputs=["ckpt"])
    unet = result.output("ckpt", "model").unet
    stages = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    assert fastpaths.trim_stages(unet) == 0  # hooked once, at load
    trims = []
    monkeypatch.setattr(heap, "trim_if_due", lambda: trims.append(1))
    sample = torch.randn(1, 4, 8, 8, dtype=unet.dtype)
    with torch.inference_mode():
        plain = copy.deepcopy(unet)
        for stage in [*plain.down_blocks, plain.mid_block, *plain.up_blocks]:
            stage._forward_pre_hooks.clear()
        cond = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=unet.dtype)
        out = unet(sample, 10, cond).sample
        assert len(trims) == len(stages)
        assert torch.equal(out, plain(sample, 10, cond).sample)  # numbers untouched
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        unet(sample, 10, cond)
    assert len(trims) == len(stages)  # not inside a compiled graph
    monkeypatch.undo()
    monkeypatch.setattr(heap, "trim_if_due", lambda: trims.append(1))
    fastpaths._trim_before_stage(stages[0], (), {"hidden_states": torch.empty(1, device="meta")})
    assert len(trims) == len(stages)  # nor for a model on another device (the CPU heap is not its memory)
    fastpaths._trim_before_stage(stages[0], (), {"hidden_states": torch.empty(1)})
    assert len(trims) == len(stages) + 1


def _upsampler(dtype, channels=8, out_channels=6, bias=True, name="conv"):
    torch.manual_seed(0)
    block = Upsample2D(channels, use_conv=True, out_channels=out_channels, bias=bias, name=name).eval().to(dtype)
    return block, fastpaths.apply(copy.deepcopy(block), upsample=True)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias, name", [(True, "conv"), (False, "Conv2d_0")])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_phase_upsampling_equals_diffusers_up_to_rounding(dtype, tolerance, bias, name, channels_last):
    block, fast = _upsampler(dtype, bias=bias, name=name)
    assert type(fast) is fastpaths.InferenceUpsample2D
    x = torch.randn(2, 8, 5, 7, dtype=dtype)  # odd sizes: the borders of every phase
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        ours, theirs = fast(x), block(x)
    assert ours.shape == theirs.shape == (2, 6, 10, 14)
    assert (ours - theirs).abs().max().item() <= tolerance * theirs.abs().max().item()
    assert not torch.equal(ours, block(x)) or dtype == torch.float64  # the phase form ran (float32 rounds apart)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("band_rows", [1, 2, 3, 5, 100])
def test_phase_upsampling_in_bands_of_rows_computes_the_whole_map(monkeypatch, dtype, band_rows):
    block, fast = _upsampler(dtype)
    x = torch.randn(2, 8, 5, 7, dtype=dtype).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        whole = fast(x)  # one band: the map is far below the band size
        row_bytes = 2 * 8 * (4 * 6) * x.element_size()  # batch * (width + 1) * four phases of 6 channels
        monkeypatch.setattr(fastpaths, "UPSAMPLE_BAND_BYTES", band_rows * row_bytes)
        banded = fast(x)
    assert banded.shape == whole.shape == (2, 6, 10, 14)
    torch.testing.assert_close(banded, whole, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_phase_upsampling_in_bfloat16_decodes_as_close_to_float32_as_diffusers():
    # One layer alone rounds its summed kernels once more (measured 1.7x diffusers' mean error against float64);
    # through a whole decoder the other bfloat16 roundings dominate (SD-size random VAE at 256: 46.9 against
    # 47.1 dB PSNR to float32).
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=16).eval()
    latent = torch.randn(1, 4, 16, 16)
    with torch.inference_mode():
        exact = vae.decode(latent).sample.double()
    theirs = copy.deepcopy(vae).to(torch.bfloat16).to(memory_format=torch.channels_last)
    ours = fastpaths.apply(copy.deepcopy(theirs), upsample=True)
    assert sum(isinstance(m, fastpaths.InferenceUpsample2D) for m in ours.modules()) == 2

    def error(model) -> float:
        with torch.inference_mode():
            out = model.decode(latent.to(torch.bfloat16).to(memory_format=torch.channels_last)).sample
        return (out.double() - exact).abs().mean().item()

    assert error(ours) <= 1.1 * error(theirs)


def test_phase_upsampling_steps_aside_where_it_would_differ():
    block, fast = _upsampler(torch.float32)
    x = torch.randn(1, 8, 5, 7)
    with torch.inference_mode():
        # an output size that is not twice the input (the UNet asks for one when sizes are odd multiples)
        assert torch.equal(fast(x, output_size=(11, 14)), block(x, output_size=(11, 14)))
        # a LoRA's forward hook on the convolution must see it run
        hook = lambda module, args, output: output + 1  # noqa: E731
        handles = [m.conv.register_forward_hook(hook) for m in (block, fast)]
        assert torch.equal(fast(x), block(x))
        for h in handles:
            h.remove()
    assert torch.equal(fast.train()(x), block.train()(x))


def test_phase_kernels_follow_weights_changed_in_place():
    block, fast = _upsampler(torch.float32)
    x = torch.randn(1, 8, 4, 4)
    with torch.inference_mode():
        before = fast(x)
        for m in (block, fast):
            m.conv.weight.mul_(-2.0)
            m.conv.bias.add_(1.0)
        after, expected = fast(x), block(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=1e-5)


@pytest.mark.parametrize("memory_format, phases", [("auto", True), ("contiguous", False)])
def test_vaes_upsample_in_phases_only_in_the_fast_layout(executor, models_root, tmp_path, memory_format, phases):
    from tests.nodes.test_parity import graph

    executor.settings = ng.Settings(models_dir=models_root, dtype="float32", device="cpu",
                                    memory_format=memory_format, temp_dir=tmp_path / "t", output_dir=tmp_path / "o")
    executor.cache.clear()
    result = executor.run(graph("tiny-lcm", "a red circle"), outputs=["ckpt"])
    vae_kinds = {type(m) for m in result.output("ckpt", "vae").vae.modules() if isinstance(m, Upsample2D)}
    unet_kinds = {type(m) for m in result.output("ckpt", "model").unet.modules() if isinstance(m, Upsample2D)}
    assert vae_kinds == ({fastpaths.InferenceUpsample2D} if phases else {Upsample2D})
    assert unet_kinds == {Upsample2D}


# --- blocked convolution weights (fastpaths.pack) -----------------------------------------------------------------

def _assert_same(got, expected, dtype):
    if dtype == torch.bfloat16:  # the same kernel, bit for bit
        assert torch.equal(got, expected)
    else:  # float32 convolutions of some shapes run another kernel with the plain weight (1e-6 apart)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _packed_pair(dtype, in_channels=16, out_channels=24, bias=True, kernel=3):
    if not fastpaths.packing_works(dtype):
        pytest.skip(f"this build or CPU has no blocked {dtype} convolutions")
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=bias)
    plain = plain.to(dtype).eval().requires_grad_(False)
    plain = plain.to(memory_format=torch.channels_last)
    packed = copy.deepcopy(plain)
    holder = torch.nn.Sequential(packed)
    assert fastpaths.pack(holder) == 1 and type(packed) is fastpaths.PackedConv2d
    return plain, packed


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_convolutions_compute_what_plain_ones_do(dtype, bias, kernel):
    plain, packed = _packed_pair(dtype, bias=bias, kernel=kernel)
    assert packed.weight.layout == torch.strided  # nothing is reordered before the first call
    with torch.inference_mode():
        for shape in [(1, 16, 8, 8), (2, 16, 13, 6), (1, 16, 32, 32)]:
            for layout in (torch.channels_last, torch.contiguous_format):
                x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
                _assert_same(packed(x), plain(x), dtype)
                assert packed.weight.layout != torch.strided  # the blocked weight is all it holds
    assert torch.equal(packed.weight.to_dense(), plain.weight)


def _assert_no_reorder(capfd, conv, x, expected):
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        got = conv(x)
    log = capfd.readouterr().out
    assert ",convolution," in log and ",reorder," not in log, log
    _assert_same(got, expected, torch.float32)


@pytest.mark.parametrize("now", [False, True], ids=["packed at the first call", "packed at load"])
def test_packed_weights_take_the_blocked_layout_each_input_size_wants(capfd, now):
    """oneDNN's kernel picks its weights' blocked layout by the input's size too (float32 1280-channel kernels on
    the 2-core machine: blocks of 16 output channels for 4x4 maps, of 32 from 8x8 on): a weight packed for one size
    and run at another would be reordered again at every call. Each size change repacks once; after that no call
    reorders anything (oneDNN's verbose log lists every primitive run), and the results stay the plain ones."""
    plain = torch.nn.Conv2d(1280, 1280, 3, padding=1).eval().requires_grad_(False)
    packed = copy.deepcopy(plain)
    holder = torch.nn.Sequential(packed)
    fastpaths.pack(holder, now=now)
    twin = torch.nn.Sequential(copy.deepcopy(plain))
    fastpaths.share_packed(twin, holder)  # AnimateDiff's UNet shares its base's blocked weights
    assert twin[0].weight is packed.weight
    with torch.inference_mode():
        for size in (4, 8, 4):
            x = torch.randn(1, 1280, size, size).contiguous(memory_format=torch.channels_last)
            _assert_same(packed(x), plain(x), torch.float32)
            assert packed.weight.packed_for == (size, size)
            _assert_no_reorder(capfd, packed, x, plain(x))
            assert twin[0].weight is packed.weight  # still one blocked weight for both
            _assert_same(twin(x), plain(x), torch.float32)


def _spy_packs(monkeypatch) -> list:
    packed = []
    pack = fastpaths.PackedConv2d._pack

    def spy(self, input_shape=None):
        packed.append(self)
        return pack(self, input_shape)

    monkeypatch.setattr(fastpaths.PackedConv2d, "_pack", spy)
    monkeypatch.setattr(fastpaths, "_SAME_LAYOUT", {})  # nothing learnt by earlier tests
    return packed


def test_a_size_change_reorders_one_kernel_of_a_shape_where_the_layout_stays(monkeypatch, capfd):
    """Switching sizes used to repack every kernel (1.3-1.6 s for the SD1.5 UNet's 98 here), though most 3x3
    kernels keep one blocked layout at every size: the first kernel of a shape repacked between two sizes shows
    whether its layout changed, and the others of that shape follow, with no reorder at any later call."""
    packed = _spy_packs(monkeypatch)
    torch.manual_seed(0)
    plains = [torch.nn.Conv2d(320, 320, 3, padding=1).eval().requires_grad_(False) for _ in range(3)]
    convs = torch.nn.Sequential(*copy.deepcopy(plains))
    fastpaths.pack(convs, now=True)  # as a copied load packs: for 16x16
    kept = 0
    with torch.inference_mode():
        for size in (8, 12, 8, 12, 32):
            x = torch.randn(1, 320, size, size).contiguous(memory_format=torch.channels_last)
            packed.clear()
            for conv, plain in zip(convs, plains):
                _assert_same(conv(x), plain(x), torch.float32)
                assert conv.weight.packed_for == (size, size)
            # the first kernel may be repacked to find out; the others are exactly when the layout changed
            assert (convs[1] in packed) == (convs[2] in packed)
            kept += convs[1] not in packed
            for conv, plain in zip(convs, plains):
                _assert_no_reorder(capfd, conv, x, plain(x))
    assert kept >= 4  # oneDNN's 320-channel 3x3 kernels keep one layout from 8x8 to 32x32 on x86 CPUs


def test_what_is_learnt_about_layouts_stays_bounded(monkeypatch):
    """A server asked for ever new sizes keeps only the latest answers; a forgotten one is learnt again."""
    packed = _spy_packs(monkeypatch)
    monkeypatch.setattr(fastpaths, "_LAYOUT_MEMORY", 2)
    plain, conv = _packed_pair(torch.float32, 32, 32)
    with torch.inference_mode():
        for size in (8, 10, 12, 14, 16, 8, 10):
            x = torch.randn(1, 32, size, size).contiguous(memory_format=torch.channels_last)
            _assert_same(conv(x), plain(x), torch.float32)
            assert len(fastpaths._SAME_LAYOUT) <= 2
    assert len(packed) == 7  # one kernel of its shape: each change repacks it to learn (or learn again)


def test_a_constant_kernel_teaches_nothing_about_layouts(monkeypatch, capfd):
    """A kernel of equal values reads alike in every layout: it must not make another kernel of its shape skip a
    repack that the size change needs (float32 1280-channel kernels here change layout between 4x4 and 8x8)."""
    packed = _spy_packs(monkeypatch)
    zero = torch.nn.Conv2d(1280, 1280, 3, padding=1).eval().requires_grad_(False)
    torch.nn.init.zeros_(zero.weight)
    plain = torch.nn.Conv2d(1280, 1280, 3, padding=1).eval().requires_grad_(False)
    convs = torch.nn.Sequential(copy.deepcopy(zero), copy.deepcopy(plain))
    fastpaths.pack(convs)
    with torch.inference_mode():
        for size in (4, 8, 4):
            x = torch.randn(1, 1280, size, size).contiguous(memory_format=torch.channels_last)
            packed.clear()
            _assert_same(convs[0](x), zero(x), torch.float32)
            assert packed == [convs[0]]  # packed at its first call, then at every change: nothing learnt from it
            _assert_same(convs[1](x), plain(x), torch.float32)
            _assert_no_reorder(capfd, convs[1], x, plain(x))


def test_packed_convolutions_run_autograd_and_hooks_on_the_plain_weight():
    plain, packed = _packed_pair(torch.float32)
    x = torch.randn(1, 16, 6, 6)
    with torch.inference_mode():
        packed(x)
    # a LoRA's forward hook sees the packed convolution's output
    handles = [m.register_forward_hook(lambda module, args, output: output * 2 + 1) for m in (plain, packed)]
    with torch.inference_mode():
        _assert_same(packed(x), plain(x), torch.float32)
    for h in handles:
        h.remove()
    leaf = x.clone().requires_grad_(True)
    out = packed(leaf)  # the blocked op has no autograd: the plain weight runs instead
    out.sum().backward()
    expected = x.clone().requires_grad_(True)
    plain(expected).sum().backward()
    _assert_same(out, plain(x), torch.float32)
    _assert_same(leaf.grad, expected.grad, torch.float32)


def test_packed_convolutions_give_plain_weights_to_whatever_reads_or_moves_them():
    plain, packed = _packed_pair(torch.bfloat16)
    x = torch.randn(1, 16, 8, 8).to(torch.bfloat16)
    with torch.inference_mode():
        packed(x)
    state = packed.state_dict()
    assert state["weight"].layout == torch.strided and torch.equal(state["weight"], plain.weight)
    assert torch.equal(state["bias"], plain.bias)
    copy_ = torch.nn.Conv2d(16, 24, 3, padding=1).to(torch.bfloat16)
    copy_.load_state_dict(state)  # another model takes them as any Conv2d's
    assert torch.equal(copy_.weight, plain.weight)
    packed.to(torch.float32)  # a cast unpacks first: an ordinary Conv2d with the cast weight
    assert type(packed) is torch.nn.Conv2d and torch.equal(packed.weight, plain.weight.float())
    _, packed = _packed_pair(torch.bfloat16)
    with torch.inference_mode():
        packed(x)
    replacement = {k: v * 2 for k, v in plain.state_dict().items()}
    packed.load_state_dict(replacement)  # loading into it unpacks, then loads
    assert type(packed) is torch.nn.Conv2d and torch.equal(packed.weight, replacement["weight"])


def test_the_cache_counts_blocked_weights_as_the_plain_ones():
    from nodes.values import storages

    plain, packed = _packed_pair(torch.bfloat16)
    with torch.inference_mode():
        packed(torch.randn(1, 16, 8, 8).to(torch.bfloat16))
    assert sum(n for _, n in storages(packed)) == sum(n for _, n in storages(plain)) > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_checkpoints_in_the_fast_layout_pack_their_unet_and_draw_the_same(models_root, tmp_path, monkeypatch, dtype):
    from tests.nodes.test_parity import graph

    if not fastpaths.packing_works(getattr(torch, dtype)):
        pytest.skip(f"this build or CPU has no blocked {dtype} convolutions")
    images = {}
    for packing in (True, False):
        if not packing:
            monkeypatch.setattr(fastpaths, "pack", lambda module, now=False: 0)
        settings = ng.Settings(models_dir=models_root, dtype=dtype, device="cpu", temp_dir=tmp_path / "t",
                               output_dir=tmp_path / "o")  # memory format "auto": channels_last on this CPU
        result = ng.Executor(ng.build_registry(), settings=settings).run(
            graph("tiny-lcm", "a red circle"), outputs=["decode", "ckpt"])
        unet = result.output("ckpt", "model").unet
        convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
        packed = [m for m in convs if m.weight.layout != torch.strided]
        if packing:  # every 3x3 and 1x1 convolution, after the run
            assert packed and {m.kernel_size for m in packed} == {(3, 3), (1, 1)}
            assert all(m.kernel_size not in ((3, 3), (1, 1)) for m in convs if m.weight.layout == torch.strided)
        else:
            assert not packed
        images[packing] = torch.as_tensor(result.output("decode"))
    _assert_same(images[True], images[False], getattr(torch, dtype))


@pytest.mark.parametrize("overrides, expected", [({}, True), ({"compile": True}, False),
                                                 ({"map_weights": True}, True),  # packed from the map
                                                 ({"memory_format": "contiguous"}, False)])
def test_float32_unets_take_the_blocked_layout_where_it_computes(overrides, expected):
    from nodes import devices

    if not fastpaths.packing_works(torch.float32):
        pytest.skip("this build or CPU has no blocked float32 convolutions")
    settings = ng.Settings(dtype="float32", device="cpu", **overrides)
    assert devices.channels_last(settings, torch.device("cpu"), "unet") is expected
    assert devices.channels_last(settings, torch.device("cpu"), "vae") is (overrides.get("memory_format") != "contiguous")
