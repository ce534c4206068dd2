"""Tiny random-weight models of the pipeline families beyond Stable Diffusion, written as diffusers folders.

Each builder takes the tiny configuration diffusers' own tests use for that pipeline, seeds its weights (the global
torch RNG is forked, so the caller's stream is untouched) and saves a folder with a ``model_index.json`` that the
pipeline's ``from_pretrained(folder, local_files_only=True)`` loads. diffusers is imported inside the builders.
"""

from __future__ import annotations

from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------
# Consistency Models (ConsistencyModelPipeline)
# --------------------------------------------------------------------------------------------

#: diffusers' ``TEST_UNET_CONFIG`` (scripts/convert_consistency_to_diffusers.py, the config of the hub's
#: diffusers/consistency-models-test): openai's CM UNet at 32 pixels and two levels.
TINY_CM_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [32, 64],
    "attention_head_dim": 8,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 32,
    "upsample_type": "resnet",
    "downsample_type": "resnet",
}
#: The scheduler of diffusers' ConsistencyModelPipeline tests (openai's CD models use the same numbers).
TINY_CM_SCHEDULER = {"num_train_timesteps": 40, "sigma_min": 0.002, "sigma_max": 80.0}


def build_tiny_consistency(out_dir: Path | str, *, num_classes: int | None = 1000, seed: int = 0) -> Path:
    """Write a tiny ConsistencyModelPipeline folder (``unet/``: a UNet2DModel, ``scheduler/``: a
    CMStochasticIterativeScheduler, ``model_index.json``) and return its path.

    ``num_classes`` is the UNet's ``num_class_embeds``: 1000 (ImageNet's, as diffusers' class-conditional test
    UNet) or None for an unconditional model (as openai's LSUN bedroom and cat models). Images are 32x32.
    Deterministic: the same arguments give the same weights."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**TINY_CM_UNET, num_class_embeds=num_classes)
    scheduler = CMStochasticIterativeScheduler(**TINY_CM_SCHEDULER)
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------
# Latent Diffusion (LDMSuperResolutionPipeline, LDMTextToImagePipeline)
# --------------------------------------------------------------------------------------------

#: The UNet of diffusers' LDMSuperResolutionPipeline test: 6 input channels (3 of latents, 3 of the low-resolution
#: image it is conditioned on), 3 out.
TINY_LDM_SR_UNET = {
    "sample_size": 32,
    "in_channels": 6,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
#: The VQ autoencoder of that test: 3 latent channels, two levels (so it upscales 2x where CompVis's, with three
#: levels, upscales 4x).
TINY_LDM_VQ = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 3,
}
#: The text-to-image test's UNet, with cross-attention over the 32-wide text encoder.
TINY_LDM_T2I_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
}
#: Its KL autoencoder (CompVis's ldm-text2im-large-256 keeps an AutoencoderKL in the folder named vqvae/).
TINY_LDM_KL = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
}
#: The text-to-image test's scheduler.
TINY_LDM_T2I_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                          "clip_sample": False, "set_alpha_to_one": False}
#: A real LDMBert (diffusers' test swaps in a CLIPTextModel) at the test's text width: 32 wide, 2 layers.
TINY_LDM_BERT = {"d_model": 32, "encoder_layers": 2, "encoder_ffn_dim": 37, "encoder_attention_heads": 4,
                 "head_dim": 8, "max_position_embeddings": 77}
#: The BertTokenizer's vocabulary: BERT's special tokens, then a few words (anything else is [UNK]).
TINY_BERT_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "on", "in", "and", "with",
                   "cat", "dog", "house", "tree", "hill", "sky", "sea", "red", "green", "blue", "painting", "photo",
                   ",", ".")


def build_tiny_ldm_super_resolution(out_dir: Path | str, *, seed: int = 0) -> Path:
    """Write a tiny LDMSuperResolutionPipeline folder (``unet/``: a 6-channel UNet2DModel, ``vqvae/``: a VQModel,
    ``scheduler/``: a default DDIMScheduler, ``model_index.json``), the layout of CompVis's
    ldm-super-resolution-4x-openimages, and return its path. It upscales 2x (32 -> 64 pixels). Deterministic."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**TINY_LDM_SR_UNET)
        vqvae = VQModel(**TINY_LDM_VQ)
    LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler()).save_pretrained(out)
    return out


def build_tiny_ldm_text2im(out_dir: Path | str, *, seed: int = 0) -> Path:
    """Write a tiny LDMTextToImagePipeline folder, the layout of CompVis's ldm-text2im-large-256 (``bert/``: an
    LDMBertModel, ``tokenizer/``: a BertTokenizer's vocab.txt, ``unet/``: a UNet2DConditionModel, ``vqvae/``: an
    AutoencoderKL, ``scheduler/``: a DDIMScheduler, ``model_index.json``), and return its path. The autoencoder
    downscales 2x. Deterministic."""
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(TINY_BERT_VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), model_max_length=77)
    vocab.unlink()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_LDM_T2I_UNET)
        vqvae = AutoencoderKL(**TINY_LDM_KL)
        bert = LDMBertModel(LDMBertConfig(vocab_size=len(TINY_BERT_VOCAB), **TINY_LDM_BERT)).eval()
    pipe = LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet,
                                  scheduler=DDIMScheduler(**TINY_LDM_T2I_SCHEDULER))
    pipe.save_pretrained(out)
    # the hub's folder holds the vocabulary as vocab.txt (transformers 5 writes only tokenizer.json)
    (out / "tokenizer" / "tokenizer.json").unlink()
    (out / "tokenizer" / "vocab.txt").write_text("\n".join(TINY_BERT_VOCAB) + "\n", encoding="utf-8")
    return out
