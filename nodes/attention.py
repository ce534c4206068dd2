"""Attention on the CPU in bfloat16 as two matrix products per band of queries.

torch's ``scaled_dot_product_attention`` runs its fused CPU kernel in float32 whatever the inputs, about 140 GFLOP/s
on the 2-core development machine in bfloat16 and float32 alike, while bfloat16 matrix products run three times
faster there. The textbook form -- scores = q k^T, softmax, times v -- in bfloat16, a band of queries at a time so
that a band's scores (``BAND_ELEMENTS``) stay in cache, beat it at every Stable Diffusion shape of 256 cells or more
(``benchmarks/attention.py``): the UNet's first-level self-attention at 512 (4,096 cells, 8 heads of 40 channels)
161 -> 134 ms, its second level 17 -> 12 ms, the VAE's middle attention (one head of 512 channels) 182 -> 92 ms. The
price is rounding: the scores are rounded to bfloat16 before the softmax, so against the attention of the float32
inputs the bands are 5.8e-3 off (relative rms) where SDPA is 3.9e-3 (the inputs' own rounding to bfloat16 is most of
SDPA's error and about half of the bands'). In float32 SDPA is the fastest form, so only bfloat16 on the CPU takes
the bands: float32 (the exact path), CUDA and every other case run diffusers' ``AttnProcessor2_0`` unchanged.

Used in the fast layout (where the UNet and VAE run channels_last): :func:`use_banded` gives every attention that
runs diffusers' default processor this one; other processors (IP-Adapter's) are left alone.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

#: Scores computed at once: batch x heads x band of queries x keys (4 MB in bfloat16), within the bounds on rows below.
BAND_ELEMENTS = 1 << 21
#: Fewer queries than this run SDPA: at 64 cells (the UNet's middle at 512) the bands gain nothing.
MIN_QUERIES = 256


def banded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(channels)) v for ``[batch, heads, tokens, channels]`` tensors, computed a band of
    queries at a time; returns ``[batch, tokens, heads * channels]`` (what the output projection takes)."""
    batch, heads, queries, channels = query.shape
    keys = key.shape[2]
    keys_t = key.transpose(-1, -2).contiguous()  # [batch, heads, channels, keys]: one pass, then reused by every band
    value = value.contiguous()
    scale = channels ** -0.5
    out = torch.empty(batch, queries, heads, channels, dtype=query.dtype, device=query.device)
    # 64 rows at least (fewer ran a 1024 px SD1.5 UNet's 16,384-cell attention 25% slower than SDPA; 64 even with
    # it), at most 1,024 (cross-attention's best)
    rows = max(64, min(1024, BAND_ELEMENTS // (batch * heads * keys)))
    for start in range(0, queries, rows):
        weights = torch.matmul(query[:, :, start:start + rows] * scale, keys_t).softmax(-1)
        out[:, start:start + rows] = torch.matmul(weights, value).transpose(1, 2)
    return out.flatten(2)


class BandedAttnProcessor:
    """AttnProcessor2_0's computation with :func:`banded_attention` in place of SDPA where it pays (bfloat16 on the
    CPU, no mask, 256 queries or more); anything else goes to AttnProcessor2_0 itself."""

    def __init__(self):
        self.fallback = AttnProcessor2_0()

    def fits(self, attn: Attention, hidden_states: torch.Tensor, attention_mask, temb, args, kwargs) -> bool:
        shape = hidden_states.shape
        tokens = shape[-2] * shape[-1] if hidden_states.ndim == 4 else shape[1]
        return (hidden_states.device.type == "cpu" and hidden_states.dtype == torch.bfloat16 and tokens >= MIN_QUERIES
                and attention_mask is None and temb is None and not args and not kwargs and attn.spatial_norm is None
                and attn.norm_q is None and attn.norm_k is None and not torch.compiler.is_compiling())

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        if not self.fits(attn, hidden_states, attention_mask, temb, args, kwargs):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # [batch, channels, height, width] -> [batch, cells, channels]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = (attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross
                       else encoder_hidden_states)

        def split(t: torch.Tensor) -> torch.Tensor:  # [batch, tokens, heads * channels] -> [batch, heads, tokens, ...]
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        out = banded_attention(split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context)))
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor if attn.rescale_output_factor != 1 else out


def use_banded(module: torch.nn.Module) -> int:
    """Give ``module``'s attentions that run diffusers' default processor a :class:`BandedAttnProcessor` (one,
    shared); returns how many."""
    processor, count = BandedAttnProcessor(), 0
    for attn in module.modules():
        if isinstance(attn, Attention) and type(attn.processor) is AttnProcessor2_0:
            attn.set_processor(processor)
            count += 1
    return count

