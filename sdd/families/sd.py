"""The Stable Diffusion 1.x / 2.x family: one CLIP text encoder, ``UNet2DConditionModel`` called with
``encoder_hidden_states``, ``StableDiffusionPipeline``.

SD-2.x differs only in data: its text encoder is OpenCLIP-H converted to ``CLIPTextModel`` with the last layer
dropped (the "penultimate layer" of the original code), GELU and ``"!"`` as the padding token, its UNet uses
linear projections, and the 768 px models predict v (``scheduler.config.prediction_type``). The pipeline's text
encoding, ``text_encoder(ids)[0]`` (after the final layer norm), is the same code for both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdd.params import SELECTORS
from sdd.sampling import encode_prompts, plain_timesteps, unet_denoise


class StableDiffusion:
    name = "sd"
    parameter_sets = SELECTORS
    denoiser_name = "unet"
    single_file = True
    guidance_distilled = False
    latent_patch = 1
    set_timesteps = staticmethod(plain_timesteps)

    def lora_targets(self, target_modules: Sequence[str]) -> list[str]:
        return list(target_modules)

    def encode(self, components, prompts: Sequence[str], device=None) -> torch.Tensor:
        return encode_prompts(components.tokenizer, components.text_encoder, prompts, device)

    def denoise(self, unet, z: torch.Tensor, t, conditioning: torch.Tensor) -> torch.Tensor:
        return unet_denoise(unet, z, t, conditioning)

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline(self, components):
        c = components
        return self.pipeline_class()(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                     scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)


FAMILY = StableDiffusion()
