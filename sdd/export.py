"""Export an erased model in formats people load elsewhere.

``<out>/pipeline/``              a folder of the family's diffusers pipeline (``StableDiffusionPipeline``,
                                 ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``; ``from_pretrained``)
``<out>/unet.safetensors``       the UNet alone, one safetensors file with diffusers keys (SD3:
                                 ``transformer.safetensors``)
``<out>/lora/pytorch_lora_weights.safetensors``   LoRA runs: ``pipe.load_lora_weights`` loads it
``<out>/model.safetensors``      ``format=single-file``: UNet, VAE and text encoder in the original (A1111/ComfyUI)
                                 layout; ``<out>/model-config/`` is the local config ``from_single_file`` reads
``<out>/config.yaml``            the resolved run config
``<out>/README.md``              a model card

Every path is written under a temporary name and renamed into place (see ``sdd.files``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from sdd.errors import UserError
from sdd.files import atomic_path, reporting_write_failures, write_text
from sdd.models import BUILT_IN_MODELS, SDComponents
from sdd.single_file import write_single_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelCard:
    base_model: str
    method: str  # e.g. "SDD (self-distillation)"
    concepts: list[str]
    steps: int
    finetune: str
    hyperparameters: dict = field(default_factory=dict)
    exported: str = ""  # which weights, e.g. "EMA teacher"
    notes: str = ""


def _card_text(card: ModelCard, has_pipeline: bool, has_lora: bool, has_single_file: bool = False,
               pipeline: str = "StableDiffusionPipeline") -> str:
    hub_base = card.base_model if card.base_model not in BUILT_IN_MODELS else None
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-image"]
    if hub_base and not os.path.exists(hub_base) and not hub_base.endswith(".safetensors"):  # a hub id, not a path
        front.append(f"base_model: {hub_base}")
    front += ["tags:", "- stable-diffusion", "- concept-erasure", f"- {card.method.split()[0].lower()}", "---", ""]
    concepts = ", ".join(f"`{c}`" for c in card.concepts)
    if card.concepts:
        title = f"# {card.method}: {', '.join(card.concepts)} erased"
        intro = f"Stable Diffusion fine-tuned with **{card.method}** so that it no longer generates {concepts}."
    else:
        title, intro = f"# {card.method}", "A text-to-image model in Stable Diffusion format."
    lines = [
        title,
        "",
        intro,
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{card.base_model}` |",
        f"| method | {card.method} |",
        f"| concepts | {concepts} |",
        f"| trained parameters | `{card.finetune}` |",
        f"| optimizer steps | {card.steps} |",
    ]
    if card.exported:
        lines.append(f"| exported weights | {card.exported} |")
    for key, value in card.hyperparameters.items():
        lines.append(f"| {key} | `{value}` |")
    lines += ["", "## Use", "", "```python", "import torch", f"from diffusers import {pipeline}", ""]
    if has_pipeline:
        lines += [f'pipe = {pipeline}.from_pretrained("pipeline")']
    if has_single_file and not has_pipeline:
        lines += [f'pipe = {pipeline}.from_single_file("model.safetensors", config="model-config",',
                  ' ' * (len(pipeline) + 25) + 'local_files_only=True)']
    if has_lora:
        lines += [
            f'pipe = {pipeline}.from_pretrained("{card.base_model}")  # the base model',
            'pipe.load_lora_weights("lora")',
        ]
    lines += ['image = pipe("a photo of a cat").images[0]', "```", ""]
    lines += ["The full training configuration is in `config.yaml`.", ""]
    if card.notes:
        lines += [card.notes, ""]
    return "\n".join(front + lines)


def _state_dict(unet, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}


def merged_unet(unet):
    """A plain UNet with the LoRA adapters folded into the base weights (the input is left untouched)."""
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def export_model(
    out_dir: str,
    base: SDComponents,
    unet,
    *,
    config_yaml: str,
    card: ModelCard,
    is_lora: bool = False,
    merge_lora: bool = True,
    dtype: str = "fp32",
    format: str = "diffusers",
) -> dict[str, str]:
    """Write the export of ``unet`` (with ``base``'s VAE, text encoder, tokenizer and scheduler); return the paths.
    ``format``: ``diffusers`` (pipeline/, unet.safetensors), ``single-file`` (model.safetensors, model-config/) or
    ``both``."""
    family = base.family  # its stock pipeline (sdd.families)

    if base.vae is None:
        raise UserError("export: the model has no VAE, so no pipeline can be written")
    if format != "diffusers" and not family.single_file:  # also checked before training (methods.common)
        raise UserError(f"export.format: single files are written for SD-1.x, SD-2.x and SDXL models; {base.source} "
                        f"is a {family.name} model: use export.format=diffusers")
    if format != "diffusers" and is_lora and not merge_lora:
        raise UserError("export.format: a single file holds the merged model; set export.merge_lora=true")
    torch_dtype = DTYPES[dtype]
    written: dict[str, str] = {}
    with reporting_write_failures(out_dir, "export"):
        os.makedirs(out_dir, exist_ok=True)
        if is_lora:
            path = os.path.join(out_dir, "lora")
            with atomic_path(path) as tmp:
                name = family.denoiser_name  # unet_lora_layers=..., or transformer_lora_layers=... (SD3)
                family.pipeline_class().save_lora_weights(
                    tmp,
                    safe_serialization=True,
                    **{f"{name}_lora_layers": {k: v.to(torch_dtype) for k, v in lora_state_dict(unet).items()},
                       f"{name}_lora_adapter_metadata": unet.peft_config["default"].to_dict()},
                )
            written["lora"] = path
        full_unet = (merged_unet(unet) if is_lora else unet) if (merge_lora or not is_lora) else None
        if full_unet is not None and format != "diffusers":
            path = os.path.join(out_dir, "model.safetensors")
            write_single_file(path, full_unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler,
                              dtype=torch_dtype, config_folder=os.path.join(out_dir, "model-config"),
                              text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                              force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt)
            written["single-file"] = path
            written["single-file-config"] = os.path.join(out_dir, "model-config")
        if full_unet is not None and format != "single-file":
            path = os.path.join(out_dir, "pipeline")
            def cast(module):  # copies, so the caller's fp32 modules stay untouched
                if module is None or torch_dtype == torch.float32:
                    return module
                return copy.deepcopy(module).to(torch_dtype)

            with atomic_path(path) as tmp:
                parts = dataclasses.replace(base, vae=cast(base.vae), text_encoder=cast(base.text_encoder),
                                            text_encoder_2=cast(base.text_encoder_2),
                                            text_encoder_3=cast(base.text_encoder_3), unet=cast(full_unet))
                family.pipeline(parts).save_pretrained(tmp, safe_serialization=True)
            written["pipeline"] = path
            # unet.safetensors; SD3: transformer.safetensors (its pipeline's name for the denoiser)
            path = os.path.join(out_dir, f"{family.denoiser_name}.safetensors")
            with atomic_path(path) as tmp:
                save_file(_state_dict(full_unet, torch_dtype), tmp, metadata={"format": "pt", "keys": "diffusers"})
            written[family.denoiser_name] = path
        path = os.path.join(out_dir, "config.yaml")
        write_text(path, config_yaml)
        written["config"] = path
        path = os.path.join(out_dir, "README.md")
        write_text(path, _card_text(card, has_pipeline=full_unet is not None and format != "single-file",
                                    has_lora=is_lora, has_single_file=full_unet is not None and format != "diffusers",
                                    pipeline=family.pipeline_class().__name__))
        written["card"] = path
    return written
