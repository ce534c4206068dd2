"""Prompt encoding: CLIPEncode turns text into the embeddings the UNet attends to, exactly as diffusers'
``encode_prompt`` does (tokenise to 77 tokens with padding and truncation, run the text encoder, optionally take
an earlier layer through the final layer norm for clip_skip). SDXL and SSD-1B encode with both text encoders, as
their pipeline does: the penultimate layers side by side, and the second encoder's projected pooled output."""

from __future__ import annotations

from dataclasses import replace

import torch

from nodegraph import Int, Node, Output, Socket, String

from . import embeddings
from .embeddings import Vocabulary
from .values import CLIP, CONDITIONING, Clip, Conditioning


def _token_ids(tokenizer, encoder, text: str, vocabulary: Vocabulary, log=None, encoder_key: str | None = None):
    """(ids [1, 77] on the encoder's device, vectors of the embeddings the text names or None), as diffusers
    tokenises: padded and truncated to the tokenizer's length, with a warning when the end is cut off."""
    # the width through transformers' generic accessor: CLIP's text models and LDMBert (nodes.latent_diffusion) alike
    ids, extra = embeddings.token_ids(tokenizer, text, encoder.get_input_embeddings().embedding_dim, vocabulary,
                                      encoder_key)
    if ids is None:
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    if log is not None:
        full = tokenizer(text, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            log.warning("the prompt is longer than %d tokens; the end was cut off", tokenizer.model_max_length)
    return ids.to(next(encoder.parameters()).device), extra


def encode_text(clip: Clip, text: str, clip_skip: int | None = None, log=None,
                vocabulary: Vocabulary = Vocabulary()) -> torch.Tensor:
    """Embeddings [1, 77, dim] of ``text``; ``clip_skip`` = k takes the output of the k-th layer from the end;
    ``vocabulary``: the textual-inversion embeddings the text may name."""
    with clip.applied() as encoder:
        device = next(encoder.parameters()).device
        core = getattr(encoder, "text_model", encoder)
        if clip_skip and not hasattr(core, "final_layer_norm"):
            raise ValueError(f"clip_skip works with CLIP text encoders; this model's is a {type(encoder).__name__}: "
                             f"set clip_skip to 0")
        ids, extra = _token_ids(clip.tokenizer, encoder, text, vocabulary, log)
        with torch.inference_mode(), embeddings.extended_vocabulary(encoder, extra):
            if not clip_skip:
                embeds = encoder(ids)[0]
            else:
                hidden = encoder(ids, output_hidden_states=True).hidden_states
                embeds = core.final_layer_norm(hidden[-(clip_skip + 1)])
        return embeds.to(dtype=encoder.dtype, device=device)


def encode_text_xl(clip: Clip, text: str, clip_skip: int | None = None, log=None,
                   vocabulary: Vocabulary = Vocabulary()) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's embeddings [1, 77, dim1 + dim2] and pooled embedding [1, dim] of ``text`` (clip_skip = k: k layers
    before the penultimate, as diffusers counts for SDXL)."""
    parts, pooled = [], None
    with clip.applied() as first, clip.applied_2() as second:
        # an SDXL textual-inversion file holds one set of vectors per encoder: clip_l (first), clip_g (second)
        for tokenizer, encoder, key in ((clip.tokenizer, first, "clip_l"), (clip.tokenizer_2, second, "clip_g")):
            ids, extra = _token_ids(tokenizer, encoder, text, vocabulary, log if encoder is first else None, key)
            with torch.inference_mode(), embeddings.extended_vocabulary(encoder, extra):
                out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled output comes first
                pooled = out[0]
            parts.append(out.hidden_states[-((clip_skip or 0) + 2)])
    dtype, device = clip.text_encoder_2.dtype, parts[-1].device
    return torch.cat([p.to(device) for p in parts], dim=-1).to(dtype), pooled.to(dtype)


class CLIPEncode(Node):
    """Encode a prompt with the checkpoint's text encoder (SDXL and SSD-1B: with both, plus the pooled embedding
    their UNet also takes).

    clip_skip takes the output of an earlier encoder layer (0 = the last layer, as most SD1.5 models expect;
    1 or 2 for models trained that way; SDXL counts from its penultimate layer, as diffusers does). Prompts longer
    than 77 tokens are cut off, with a warning.
    Textual-inversion embeddings from the models folder's embeddings/ are used by name: "<name>" or
    "embedding:name" (the file name without its extension); SDXL ones hold clip_l and clip_g vectors."""

    category = "conditioning"
    clip = Socket(CLIP)
    text = String(default="", multiline=True, identity_of=embeddings.prompt_identity)
    clip_skip = Int(default=0, min=0, max=12)
    outputs = (Output("conditioning", CONDITIONING),)

    def run(self, ctx, clip, text, clip_skip):
        vocabulary = Vocabulary.for_prompt(ctx.settings, text)
        if clip.text_encoder_2 is not None:
            embeds, pooled = encode_text_xl(clip, text, clip_skip or None, ctx.log, vocabulary)
            return Conditioning(embeds, (text,), clip, pooled=pooled)
        return Conditioning(encode_text(clip, text, clip_skip or None, ctx.log, vocabulary), (text,), clip)


class ConditioningCombine(Node):
    """Sample two prompts together: at every step the UNet predicts the noise for each and the sampler averages
    the predictions (then applies guidance against the negative), as ComfyUI's ConditioningCombine does for prompts
    over the whole image. Use it to blend subjects or styles ("a cat" + "an oil painting"). SD 1.x/2.x models;
    ControlNets and T2I-Adapters do not work on combined prompts yet."""

    category = "conditioning"
    conditioning_1 = Socket(CONDITIONING)
    conditioning_2 = Socket(CONDITIONING)
    outputs = (Output("conditioning", CONDITIONING),)

    def run(self, ctx, conditioning_1: Conditioning, conditioning_2: Conditioning):
        return replace(conditioning_1, also=(*conditioning_1.also, replace(conditioning_2, also=()),
                                             *conditioning_2.also))


NODES = [CLIPEncode, ConditioningCombine]
