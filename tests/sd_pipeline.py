"""A Stable Diffusion pipeline small enough to build in a second, from configs only (no
hub): diffusers as a test oracle for the kohya and diffusers files lora-tools writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

UNET_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)


def tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG)


def tiny_pipeline(tmp: Path) -> Any:
    """A Stable Diffusion pipeline small enough to build in a second, from configs only."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab, merges = tmp / "vocab.json", tmp / "merges.txt"
    vocab.write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}))
    merges.write_text("#version: 0.2\n")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, projection_dim=32, max_position_embeddings=77))
    unet = tiny_unet()
    vae = AutoencoderKL(block_out_channels=[32], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer(str(vocab), str(merges)),
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
