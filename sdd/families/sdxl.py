"""The SDXL family: two text encoders (CLIP-L and OpenCLIP-bigG, penultimate hidden states concatenated), the
second's pooled projection and the size/crop ``add_time_ids`` as added conditioning, ``StableDiffusionXLPipeline``.

The conditioning is one tensor, (B, L + 1, D): the L token rows (D = the UNet's ``cross_attention_dim``) and one
more row that carries the pooled embedding in its first P entries, so every tensor operation the sampler and
generation apply to a conditioning (cache, stack, cat, expand, index, split) works unchanged. ``add_time_ids`` are
what the pipeline uses by default, (H, W, 0, 0, H, W) with H x W the image size of the latents. With
``force_zeros_for_empty_prompt`` (SDXL base) the empty prompt's conditioning is zeros, as the pipeline's
unconditional branch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdd.errors import UserError
from sdd.params import SELECTORS
from sdd.sampling import plain_timesteps

# SD's sets, but ESD-u's "everything except the text and the time conditioning" also leaves out add_embedding: it
# embeds the pooled text and the size/crop time ids and is added to the time embedding (xattn stays attn2 only)
PARAMETER_SETS = {**SELECTORS, "noxattn": lambda name: SELECTORS["noxattn"](name) and "add_embedding" not in name}


class StableDiffusionXL:
    name = "sdxl"
    parameter_sets = PARAMETER_SETS
    denoiser_name = "unet"
    single_file = True
    guidance_distilled = False
    latent_patch = 1
    set_timesteps = staticmethod(plain_timesteps)

    def __init__(self, vae_scale_factor: int = 8, force_zeros_for_empty_prompt: bool = True):
        self.vae_scale_factor = vae_scale_factor
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @torch.no_grad()
    def encode(self, components, prompts: Sequence[str], device=None) -> torch.Tensor:
        prompts = list(prompts)
        device = device or next(components.text_encoder.parameters()).device
        hidden, pooled = [], None
        for tokenizer, encoder in ((components.tokenizer, components.text_encoder),
                                   (components.tokenizer_2, components.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projection (CLIPTextModelWithProjection.text_embeds)
        hidden = torch.cat(hidden, dim=-1)
        if pooled.shape[-1] > hidden.shape[-1]:
            raise UserError(f"model: pooled width {pooled.shape[-1]} exceeds the token width {hidden.shape[-1]}")
        extra = torch.zeros_like(hidden[:, :1])
        extra[:, 0, : pooled.shape[-1]] = pooled
        conditioning = torch.cat([hidden, extra], dim=1)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=conditioning.device)
            conditioning[empty] = 0
        return conditioning

    def lora_targets(self, target_modules: Sequence[str]) -> list[str]:
        return list(target_modules)

    def denoise(self, unet, z: torch.Tensor, t, conditioning: torch.Tensor) -> torch.Tensor:
        time_dim = unet.config.addition_time_embed_dim
        width = unet.config.projection_class_embeddings_input_dim - 6 * time_dim
        h, w = z.shape[-2] * self.vae_scale_factor, z.shape[-1] * self.vae_scale_factor
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=z.device, dtype=conditioning.dtype)
        added = {"text_embeds": conditioning[:, -1, :width], "time_ids": time_ids.expand(z.shape[0], 6)}
        return unet(z, t, encoder_hidden_states=conditioning[:, :-1], added_cond_kwargs=added).sample

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def pipeline(self, components):
        c = components
        return self.pipeline_class()(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                     tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                     scheduler=c.scheduler, add_watermarker=False,
                                     force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
