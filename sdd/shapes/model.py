"""The ShapesWorld text-to-image model: Stable Diffusion's architecture, scaled down to 32x32 images.

- AutoencoderKL, 32x32x3 <-> 16x16x4 (one downsampling), trained on ShapesWorld images;
- UNet2DConditionModel on 16x16x4 latents, channels 32/64/64, cross-attention at 8x8, 4x4 and the middle;
- CLIPTextModel (3 layers, width 32) over the real CLIP vocabulary, trained jointly with the UNet;
- the SD-1.x noise schedule (scaled_linear, 0.00085 to 0.012, 1000 steps), sampled with DDIM.

Weights in `StableDiffusionPipeline` format: everything in the framework runs on it unchanged.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdd.models import SDComponents, load_tokenizer, sd_ddim_scheduler, tiny_vae

TEXT_WIDTH = 32


def build_vae() -> AutoencoderKL:
    return tiny_vae(32)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers reads this as the number of heads for this UNet class
        norm_num_groups=32,
    )


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=TEXT_WIDTH,
        )
    )


def build_scheduler() -> DDIMScheduler:
    return sd_ddim_scheduler(num_train_timesteps=1000)


def build_untrained(seed: int = 0, vae: AutoencoderKL | None = None) -> SDComponents:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, text_encoder = build_unet(), build_text_encoder()
        vae = vae if vae is not None else build_vae()
    return SDComponents(unet, text_encoder, load_tokenizer(), build_scheduler(), vae, source="shapes-untrained")
