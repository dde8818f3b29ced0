"""The FLUX.1 family: ``FluxTransformer2DModel`` (in the components' ``unet`` slot: the denoiser), CLIP-L (its
pooled output only) and T5, flow matching with a shift that depends on the image size, ``FluxPipeline``.

The conditioning is what ``FluxPipeline.encode_prompt`` computes, as one tensor (B, L + r, D): the L = 512 T5
token rows (the pipeline's default ``max_sequence_length``, D = T5's width = ``joint_attention_dim``), then
r = ceil(P / D) rows carrying CLIP's ``pooler_output`` (P = ``pooled_projection_dim``) in their first P entries
(``sdd.families.mmdit``; one row for FLUX.1's P = 768, D = 4096). ``text_ids`` are zeros, as the pipeline's.

The denoiser call does what ``FluxPipeline.__call__`` does around its transformer, on latents kept in the VAE's
(B, C, H, W) layout everywhere else (the Euler step is elementwise, so it commutes with packing): it packs 2 x 2
latent patches into (B, H/2 * W/2, 4C) tokens with their positional ``img_ids`` (0, row, column), passes
``timestep`` = t / 1000 = sigma (the transformer multiplies by 1000 itself; SD3 is passed sigma * 1000), the
guidance value as ``guidance`` when the transformer embeds one (FLUX.1-dev, ``guidance_embeds``; schnell has
none), and unpacks the output, the flow v = eps - x0 (``sdd.families.Prediction`` kind ``flow``).

Guidance is distilled: FLUX.1-dev is sampled with one forward per step on the prompt, the guidance value (3.5 by
default, as the pipeline's) an input of the network; there is no unconditional branch and no CFG
(``guidance_distilled``). A prediction the methods take without naming a value (SDD's and ESD's targets) is at
``guidance``, the pipeline's default, the value the model is used at. The sampling grid is the pipeline's:
sigmas linspace(1, 1/N, N) shifted by mu, which grows linearly with the image token count
(:func:`dynamic_shift`).

Parameter sets: :mod:`sdd.families.mmdit` (no block is ``context_pre_only``: every double-stream block's text
feeds the next block; the single-stream blocks have no text projections, so ``xattn`` is the double-stream
blocks' ``add_q_proj``, ``add_k_proj`` and ``add_v_proj``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from sdd.families import mmdit

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default max_sequence_length for T5 (FLUX.1-dev; schnell takes <= 256)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: the embedded guidance of FLUX.1-dev


def dynamic_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """FLUX's time shift mu for ``image_seq_len`` image tokens: linear from ``base_shift`` at ``base_seq_len`` to
    ``max_shift`` at ``max_seq_len`` (defaults: the scheduler config's keys when it has none). The scheduler maps
    sigma to e^mu / (e^mu + 1 / sigma - 1)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2 x 2 patches (``FluxPipeline._pack_latents``)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for (H, W) latents."""
    b, _, channels = tokens.shape
    z = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(H/2 * W/2, 3) positions of the packed tokens of (H, W) latents: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class Flux:
    name = "flux"
    denoiser_name = "transformer"
    single_file = False
    guidance_distilled = True  # one forward per step on the prompt; the guidance value is an input, not CFG
    latent_patch = 2  # the transformer reads 2 x 2 latent patches packed into its channels
    parameter_sets = mmdit.parameter_sets(None)

    def __init__(self, guidance_embeds: bool = True, pooled_width: Optional[int] = None,
                 guidance: float = DEFAULT_GUIDANCE):
        # read from the transformer's config once, here: the loop may hand ``denoise`` a DDP wrapper, which has none
        self.guidance_embeds, self.pooled_width, self.guidance = guidance_embeds, pooled_width, guidance

    def lora_targets(self, target_modules: Sequence[str]) -> list[str]:
        return mmdit.lora_targets(target_modules, None)

    @torch.no_grad()
    def encode(self, components, prompts: Sequence[str], device=None) -> torch.Tensor:
        c = components
        prompts = list(prompts)
        device = device or next(c.text_encoder.parameters()).device
        ids = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)
        pooled = c.text_encoder(ids).pooler_output
        t5 = mmdit.t5_encode(c.tokenizer_2, c.text_encoder_2, prompts, MAX_SEQUENCE_LENGTH, device)
        return mmdit.with_pooled(t5, pooled.to(t5.dtype))

    def denoise(self, transformer, z: torch.Tensor, t, conditioning: torch.Tensor, guidance=None) -> torch.Tensor:
        """One transformer call on (B, C, H, W) latents; ``guidance``: the embedded guidance value, a number or
        (B,) (default: ``self.guidance``; ignored by a transformer without a guidance embedding)."""
        b, _, h, w = z.shape
        tokens, pooled = mmdit.split_pooled(conditioning,
                                            self.pooled_width or transformer.config.pooled_projection_dim)
        timestep = torch.as_tensor(t, device=z.device).reshape(-1).expand(b).to(z.dtype) / 1000
        if self.guidance_embeds:
            value = self.guidance if guidance is None else guidance
            guidance = torch.as_tensor(value, device=z.device, dtype=torch.float32).reshape(-1).expand(b)
        else:
            guidance = None
        out = transformer(hidden_states=pack(z), timestep=timestep, guidance=guidance, pooled_projections=pooled,
                          encoder_hidden_states=tokens,
                          txt_ids=torch.zeros(tokens.shape[1], 3, device=z.device, dtype=tokens.dtype),
                          img_ids=image_ids(h, w, z.device, tokens.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def set_timesteps(self, scheduler, steps: int, latent_shape: Sequence[int], device=None) -> None:
        """``FluxPipeline``'s grid: sigmas linspace(1, 1/N, N) (none with ``use_flow_sigmas``), shifted by mu for
        the image token count of ``latent_shape`` (C, H, W)."""
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = dynamic_shift((latent_shape[-2] // 2) * (latent_shape[-1] // 2), config.get("base_image_seq_len", 256),
                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                           config.get("max_shift", 1.15))
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)

    def pipeline_class(self) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    def pipeline(self, components):
        c = components
        return self.pipeline_class()(transformer=c.unet, scheduler=c.scheduler, vae=c.vae,
                                     text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                     text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2)
