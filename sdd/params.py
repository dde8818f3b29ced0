"""Which UNet parameters a method trains.

Names follow diffusers' UNet2DConditionModel (cross-attention = ``attn2``, self-attention = ``attn1``):

- ``xattn``: every parameter of a cross-attention layer (SDD default, ESD-x);
- ``noxattn``: everything except cross-attention, the time embedding and the output conv (ESD-u);
- ``selfattn``: every parameter of a self-attention layer;
- ``full``: everything;
- ``lora``: low-rank adapters (PEFT) on ``lora.target_modules``; the base weights stay frozen.

These are SD-1.x/2.x's sets; a model family names its own (``sdd.families``: SDXL's ``noxattn`` also leaves out
``add_embedding``, the pooled-text and size pathway added to the time embedding; SD3's and FLUX's are their
MMDiTs', see ``sdd.families.mmdit``) and the methods pass the family in, which also says what
``lora.target_modules`` names on its model.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from sdd.config import FinetuneSet, LoraConfig
from sdd.errors import ConfigError

SELECTORS: dict[str, Callable[[str], bool]] = {
    "xattn": lambda name: "attn2" in name,
    "noxattn": lambda name: not ("attn2" in name or "time_embed" in name or name.startswith("conv_out")),
    "selfattn": lambda name: "attn1" in name,
    "full": lambda name: True,
}


def configure_trainable(unet: nn.Module, finetune: FinetuneSet, lora: LoraConfig | None = None,
                        family=None) -> list[str]:
    """Freeze ``unet`` except the chosen set of the model ``family``'s parameter sets (default: SD's ``SELECTORS``;
    adding LoRA adapters for ``lora``, on the modules ``family.lora_targets`` names); return the trainable names."""
    parameter_sets: Mapping[str, Callable[[str], bool]] = SELECTORS if family is None else family.parameter_sets
    unet.requires_grad_(False)
    if finetune == "lora":
        from peft import LoraConfig as PeftLoraConfig

        lora = lora or LoraConfig()
        targets = list(lora.target_modules) if family is None else family.lora_targets(lora.target_modules)
        try:
            unet.add_adapter(
                PeftLoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    init_lora_weights="gaussian",
                    target_modules=targets,
                )
            )  # adds the adapter with requires_grad=True on the LoRA weights only
        except ValueError as err:
            if "not found in the base model" not in str(err):
                raise
            raise ConfigError(f"config error: lora.target_modules {targets} names no module of this model") from None
    else:
        select = parameter_sets[finetune]
        for name, param in unet.named_parameters():
            if select(name):
                param.requires_grad_(True)
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError(f"config error: finetune={finetune} selects no parameter of this UNet")
    return names


def named_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def count(params) -> int:
    return sum(p.numel() for p in params)
