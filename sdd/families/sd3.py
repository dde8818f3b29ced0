"""The SD3 family (MMDiT): ``SD3Transformer2DModel`` (in the components' ``unet`` slot: the denoiser), three text
encoders (CLIP-L and CLIP-G with projections, T5), flow matching, ``StableDiffusion3Pipeline``.

The conditioning is what ``StableDiffusion3Pipeline.encode_prompt`` computes, as one tensor (B, 77 + L + r, D):
the two CLIPs' penultimate hidden states concatenated on the feature axis and zero-padded to the T5 width D (cut
when narrower, as ``F.pad`` does in the pipeline), then the L = 256 T5 token rows (the pipeline's default
``max_sequence_length``), then r = ceil(P / D) rows that carry the pooled embedding (the two projections
concatenated, P wide) flattened into their first P entries (one row for SD3's P = 2048, D = 4096). The empty
prompt is encoded through all three encoders, as the pipeline's negative prompt "".

Without a T5 encoder (``text_encoder_3`` None, the pipeline's documented T5-less mode; the ShapesWorld SD3 model
has none) the L T5 rows are zeros of the transformer's ``joint_attention_dim``, exactly as
``StableDiffusion3Pipeline._get_t5_prompt_embeds`` makes them.

The denoiser call passes ``timestep`` as the scheduler's timesteps, sigma * 1000, as the pipeline does; its
output is the flow v = eps - x0 on x_s = (1 - s) x0 + s eps (``sdd.families.Prediction`` kind ``flow``).

Parameter sets: :mod:`sdd.families.mmdit` (the last block is ``context_pre_only``: its ``add_q_proj`` is not
trained).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sdd.families import mmdit
from sdd.sampling import plain_timesteps

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length for T5


def conditioning(clip_hidden: Sequence[torch.Tensor], clip_pooled: Sequence[torch.Tensor],
                 t5: torch.Tensor) -> torch.Tensor:
    """The one conditioning tensor of the CLIPs' penultimate hidden states (B, 77, D_i) and projections (B, P_i)
    and the T5 rows (B, L, D), as ``encode_prompt`` assembles them (differentiable: training reuses it)."""
    clip = torch.cat(list(clip_hidden), dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return mmdit.with_pooled(torch.cat([clip, t5.to(clip.dtype)], dim=1), torch.cat(list(clip_pooled), dim=-1))


class StableDiffusion3:
    name = "sd3"
    denoiser_name = "transformer"
    single_file = False
    guidance_distilled = False
    latent_patch = 1
    set_timesteps = staticmethod(plain_timesteps)

    def __init__(self, num_layers: Optional[int] = None, pooled_width: Optional[int] = None,
                 joint_attention_dim: Optional[int] = None):
        # read from the transformer's config once, here: the loop may hand ``denoise`` a DDP wrapper, which has none
        self.num_layers, self.pooled_width = num_layers, pooled_width
        self.joint_attention_dim = joint_attention_dim
        self.parameter_sets = mmdit.parameter_sets(num_layers)

    def lora_targets(self, target_modules: Sequence[str]) -> list[str]:
        return mmdit.lora_targets(target_modules, self.num_layers)

    @torch.no_grad()
    def encode(self, components, prompts: Sequence[str], device=None) -> torch.Tensor:
        c = components
        prompts = list(prompts)
        device = device or next(c.text_encoder.parameters()).device
        hidden, pooled = [], []
        for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])  # CLIPTextModelWithProjection.text_embeds
        if c.text_encoder_3 is None:
            width = self.joint_attention_dim or c.unet.config.joint_attention_dim
            t5 = hidden[0].new_zeros(len(prompts), MAX_SEQUENCE_LENGTH, width)
        else:
            t5 = mmdit.t5_encode(c.tokenizer_3, c.text_encoder_3, prompts, MAX_SEQUENCE_LENGTH, device)
        return conditioning(hidden, pooled, t5)

    def denoise(self, transformer, z: torch.Tensor, t, conditioning: torch.Tensor) -> torch.Tensor:
        tokens, pooled = mmdit.split_pooled(conditioning, self.pooled_width or transformer.config.pooled_projection_dim)
        timestep = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        return transformer(hidden_states=z, timestep=timestep, encoder_hidden_states=tokens,
                           pooled_projections=pooled).sample

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def pipeline(self, components):
        c = components
        return self.pipeline_class()(transformer=c.unet, scheduler=c.scheduler, vae=c.vae,
                                     text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                     text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                                     text_encoder_3=c.text_encoder_3, tokenizer_3=c.tokenizer_3)
