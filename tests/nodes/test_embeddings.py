"""Textual inversion in CLIPEncode against diffusers' load_textual_inversion."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from nodegraph import Link as L

from .conftest import generator, max_diff
from .test_parity import graph, ours


@pytest.fixture(scope="module")
def embeddings(models_root):
    folder = models_root / "embeddings"
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(3)
    files = {
        "cat-toy": {"<cat-toy>": torch.randn(32, generator=g)},  # diffusers layout, one vector
        "my-style": {"emb_params": torch.randn(3, 32, generator=g)},  # A1111 layout, three vectors
        "xl-style": {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 64, generator=g)},
        "wide": {"emb_params": torch.randn(1, 768, generator=g)},
    }
    for name, tensors in files.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
    return folder


@pytest.mark.parametrize("prompt, tokens", [
    ("a photo of <cat-toy> on a table", {"cat-toy": "<cat-toy>"}),
    ("<my-style>, a red circle", {"my-style": "<my-style>"}),
    ("<cat-toy> in <my-style>", {"cat-toy": "<cat-toy>", "my-style": "<my-style>"}),
])
def test_embeddings_match_diffusers_textual_inversion(executor, models_root, embeddings, prompt, tokens):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models_root / "checkpoints" / "tiny-sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name, token in tokens.items():
        pipe.load_textual_inversion(str(embeddings / f"{name}.safetensors"), token=token)
    expected = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, generator=generator(2), height=64, width=64,
                    output_type="np").images
    got = ours(executor, graph("tiny-sd", prompt, steps=2, seed=2, guidance=1.0))
    assert max_diff(got, expected) <= 1e-5
    plain = ours(executor, graph("tiny-sd", prompt.replace("<", "").replace(">", ""), steps=2, seed=2,
                                 guidance=1.0))
    assert max_diff(plain, got) > 1e-4  # the embedding really changed the image


def test_the_embedding_syntax_and_the_shared_encoder(executor, embeddings):
    wf = graph("tiny-sd", "embedding:cat-toy", guidance=1.0)
    wf.add("pos2", "CLIPEncode", clip=L("ckpt", "clip"), text="<cat-toy>")
    result = executor.run(wf, outputs=["pos", "pos2", "ckpt"])
    assert torch.equal(result.output("pos").embeds, result.output("pos2").embeds)
    encoder = result.output("ckpt", "clip").text_encoder
    assert type(encoder.embeddings.token_embedding) is torch.nn.Embedding  # restored after the encoding


def test_replacing_an_embedding_file_reruns_the_encoder(executor, embeddings):
    wf = graph("tiny-sd", "<cat-toy>", guidance=1.0)
    first = executor.run(wf, outputs=["pos"]).output("pos").embeds
    save_file({"<cat-toy>": torch.ones(32)}, str(embeddings / "cat-toy.safetensors"))
    result = executor.run(wf, outputs=["pos"])
    assert result.nodes["pos"].status == "ran" and not torch.equal(result.output("pos").embeds, first)


@pytest.mark.parametrize("name, fragment", [("xl-style", "one per text encoder"), ("wide", "another model family")])
def test_an_embedding_for_another_model_is_a_clear_error(executor, embeddings, name, fragment):
    result = executor.run(graph("tiny-sd", f"<{name}> a cat", guidance=1.0), outputs=["pos"])
    assert result.nodes["pos"].status == "failed" and fragment in result.nodes["pos"].error["message"]
