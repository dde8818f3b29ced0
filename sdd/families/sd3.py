"""The SD3 family (MMDiT): ``SD3Transformer2DModel`` (in the components' ``unet`` slot: the denoiser), three text
encoders (CLIP-L and CLIP-G with projections, T5), flow matching, ``StableDiffusion3Pipeline``.

The conditioning is what ``StableDiffusion3Pipeline.encode_prompt`` computes, as one tensor (B, 77 + L + r, D):
the two CLIPs' penultimate hidden states concatenated on the feature axis and zero-padded to the T5 width D (cut
when narrower, as ``F.pad`` does in the pipeline), then the L = 256 T5 token rows (the pipeline's default
``max_sequence_length``), then r = ceil(P / D) rows that carry the pooled embedding (the two projections
concatenated, P wide) flattened into their first P entries (one row for SD3's P = 2048, D = 4096). The empty
prompt is encoded through all three encoders, as the pipeline's negative prompt "".

The denoiser call passes ``timestep`` as the scheduler's timesteps, sigma * 1000, as the pipeline does; its
output is the flow v = eps - x0 on x_s = (1 - s) x0 + s eps (``sdd.families.Prediction`` kind ``flow``).

Parameter sets (docs/METHODS.md section 10.3): ``xattn`` is what carries text into the image tokens, the joint
attention's text projections ``attn.add_k_proj`` and ``attn.add_v_proj`` (the keys and values the image queries
read) and ``attn.add_q_proj`` (the text tokens' queries, whose outputs become the next block's text), except in
the last block: it is ``context_pre_only`` (its text outputs are dropped), so its ``add_q_proj`` never reaches the
output and is not trained. ``noxattn`` (ESD-u) is the image stream: everything but the text pathway (the context
embedder, the text stream's norms, projections and feed-forward), the time and pooled-text embedding and the
output layers. ``selfattn`` is the joint attention's image projections (``to_q``, ``to_k``, ``to_v``,
``to_out``, SD3.5's ``attn2`` and q/k norms). ``lora.target_modules`` at its default (SD's ``attn2`` projections,
"mirrors xattn") means ``xattn``'s linear layers here.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length for T5

_TEXT_PATHWAY = re.compile(r"context|\.add_|to_add_out|norm_added|time_text_embed|^norm_out|^proj_out")
_IMAGE_ATTENTION = re.compile(r"\.attn2?\.(to_q|to_k|to_v|to_out|norm_q|norm_k)\.")
_TEXT_KV = re.compile(r"\.attn\.(add_k_proj|add_v_proj)\.")
_TEXT_Q = re.compile(r"^transformer_blocks\.(\d+)\.attn\.add_q_proj\.")


def parameter_sets(num_layers: Optional[int]):
    """SD3's parameter sets for a transformer of ``num_layers`` blocks (None: every block's ``add_q_proj`` is in
    ``xattn``)."""
    last = None if num_layers is None else num_layers - 1

    def xattn(name: str) -> bool:
        q = _TEXT_Q.match(name)
        return bool(_TEXT_KV.search(name)) or (q is not None and int(q.group(1)) != last)

    return {
        "xattn": xattn,
        "noxattn": lambda name: not _TEXT_PATHWAY.search(name),
        "selfattn": lambda name: bool(_IMAGE_ATTENTION.search(name)),
        "full": lambda name: True,
    }


class StableDiffusion3:
    name = "sd3"
    denoiser_name = "transformer"
    single_file = False

    def __init__(self, num_layers: Optional[int] = None, pooled_width: Optional[int] = None):
        # read from the transformer's config once, here: the loop may hand ``denoise`` a DDP wrapper, which has none
        self.num_layers, self.pooled_width = num_layers, pooled_width
        self.parameter_sets = parameter_sets(num_layers)

    def lora_targets(self, target_modules: Sequence[str]) -> list[str]:
        from sdd.config import LoraConfig

        if list(target_modules) != LoraConfig().target_modules:
            return list(target_modules)
        if self.num_layers is None:
            return ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
        return [f"transformer_blocks.{i}.attn.{proj}" for i in range(self.num_layers)
                for proj in ("add_q_proj", "add_k_proj", "add_v_proj")
                if proj != "add_q_proj" or i != self.num_layers - 1]

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
        ids = c.tokenizer_3(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        t5 = c.text_encoder_3(ids)[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat(pooled, dim=-1)
        width, size = t5.shape[-1], pooled.shape[-1]
        rows = math.ceil(size / width)
        extra = F.pad(pooled, (0, rows * width - size)).view(len(prompts), rows, width)
        return torch.cat([clip, t5.to(clip.dtype), extra.to(clip.dtype)], dim=1)

    def denoise(self, transformer, z: torch.Tensor, t, conditioning: torch.Tensor) -> torch.Tensor:
        size = self.pooled_width or transformer.config.pooled_projection_dim
        rows = math.ceil(size / conditioning.shape[-1])
        pooled = conditioning[:, -rows:].flatten(1)[:, :size]
        timestep = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        return transformer(hidden_states=z, timestep=timestep, encoder_hidden_states=conditioning[:, :-rows],
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
