"""What the two MMDiT families (``sd3``, ``flux``) share: the T5 token rows, the pooled text embedding carried in
rows of the one conditioning tensor, and the parameter sets of the joint attention.

The conditioning is one tensor (B, L + r, D): the text token rows (D wide) and r = ceil(P / D) more rows that
carry the pooled embedding (P wide) flattened into their first P entries, so every tensor operation the sampler,
generation and the methods apply to a conditioning (cache, stack, cat, expand, index, split) works unchanged and
only the family's denoiser call unpacks it.

Parameter sets (docs/METHODS.md section 10): ``xattn`` is what carries text into the image tokens, the joint
attention's text projections ``attn.add_k_proj`` and ``attn.add_v_proj`` (the keys and values the image queries
read) and ``attn.add_q_proj`` (the text tokens' queries, whose outputs become the next block's text), except in a
last block that is ``context_pre_only`` (SD3's: its text outputs are dropped, so its ``add_q_proj`` never reaches
the output). FLUX's single-stream blocks have no text projections of their own (one ``to_q/to_k/to_v`` for the
concatenated text and image tokens), so ``xattn`` holds only its double-stream blocks' ``add_*``. ``noxattn``
(ESD-u) is the image stream: everything but the text pathway (the context embedder, the text stream's norms,
projections and feed-forward), the time, guidance and pooled-text embedding and the output layers (FLUX's
single-stream blocks are in it). ``selfattn`` is the joint attention's image projections (``to_q``, ``to_k``,
``to_v``, ``to_out``, SD3.5's ``attn2``, the q/k norms; FLUX's single-stream attention). ``lora.target_modules`` at
its default (SD's ``attn2`` projections, "mirrors xattn") means ``xattn``'s linear layers.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

_TEXT_PATHWAY = re.compile(r"context|\.add_|to_add_out|norm_added|time_text_embed|^norm_out|^proj_out")
_IMAGE_ATTENTION = re.compile(r"\.attn2?\.(to_q|to_k|to_v|to_out|norm_q|norm_k)\.")
_TEXT_KV = re.compile(r"\.attn\.(add_k_proj|add_v_proj)\.")
_TEXT_Q = re.compile(r"^transformer_blocks\.(\d+)\.attn\.add_q_proj\.")
_TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj")


def parameter_sets(num_layers: Optional[int]):
    """The parameter sets of a joint-attention transformer whose last of ``num_layers`` (double-stream) blocks is
    ``context_pre_only`` (None: no block is, every block's ``add_q_proj`` is in ``xattn``: FLUX)."""
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


def lora_targets(target_modules: Sequence[str], num_layers: Optional[int]) -> list[str]:
    """The modules ``lora.target_modules`` names: at its default, ``xattn``'s linear layers (``num_layers`` as in
    :func:`parameter_sets`); any other list as given."""
    from sdd.config import LoraConfig

    if list(target_modules) != LoraConfig().target_modules:
        return list(target_modules)
    if num_layers is None:
        return [f"attn.{proj}" for proj in _TEXT_PROJECTIONS]
    return [f"transformer_blocks.{i}.attn.{proj}" for i in range(num_layers) for proj in _TEXT_PROJECTIONS
            if proj != "add_q_proj" or i != num_layers - 1]


def t5_encode(tokenizer, encoder, prompts: Sequence[str], max_length: int, device) -> torch.Tensor:
    """T5's last hidden states of ``prompts`` padded to ``max_length`` tokens, as the pipelines compute them."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids.to(device)
    return encoder(ids)[0]


def with_pooled(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) token rows and (B, P) pooled embeddings as one (B, L + ceil(P / D), D) conditioning."""
    width, size = tokens.shape[-1], pooled.shape[-1]
    rows = math.ceil(size / width)
    extra = F.pad(pooled, (0, rows * width - size)).view(len(pooled), rows, width)
    return torch.cat([tokens, extra.to(tokens.dtype)], dim=1)


def split_pooled(conditioning: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`with_pooled`: (token rows, pooled) of a conditioning whose pooled part is ``size``
    wide."""
    rows = math.ceil(size / conditioning.shape[-1])
    return conditioning[:, :-rows], conditioning[:, -rows:].flatten(1)[:, :size]
