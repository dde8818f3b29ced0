"""Pieces every fine-tuning method shares: a built base model, its text embeddings, sample grids, export."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from sdd.config import TrackingConfig
from sdd.export import ModelCard, export_model
from sdd.generation import Request, generate, with_unet
from sdd.models import SDComponents, load_components
from sdd.sampling import encode_prompts

UNRELATED_PROMPTS = ["a photo of a dog", "a landscape painting of mountains"]


def load_base(pretrained: str, revision: str | None, device, learned_embeds: str | None = None) -> SDComponents:
    base = load_components(pretrained, revision)
    if learned_embeds:
        from sdd.textual_inversion import load_learned_embeds

        load_learned_embeds(base, learned_embeds)
    base.text_encoder.requires_grad_(False)
    if base.vae is not None:
        base.vae.requires_grad_(False)
    return base.to(device)


def ddim_grid(base: SDComponents, steps: int):
    """A DDIM scheduler on the model's noise schedule with ``steps`` grid points (noisiest first)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def latent_shape(base: SDComponents, resolution: int) -> tuple[int, int, int]:
    f = base.vae_scale_factor
    if resolution % f:
        from sdd.errors import ConfigError

        raise ConfigError(f"config error: resolution {resolution} is not a multiple of the VAE factor {f}")
    return (base.latent_channels, resolution // f, resolution // f)


def embed(base: SDComponents, texts: Sequence[str]) -> torch.Tensor:
    """(N, L, D) text embeddings of ``texts`` with the (frozen) text encoder."""
    return encode_prompts(base.tokenizer, base.text_encoder, list(texts))


class TextEmbeddings:
    """A method's fixed prompts: encoded once (the text encoder is frozen), or every call (``cache=False``,
    what the original code did, kept to measure it)."""

    def __init__(self, base: SDComponents, texts: Sequence[str], cache: bool = True):
        from sdd.textual_inversion import check_placeholders

        check_placeholders(base.tokenizer, texts)  # a learned token named without its learned_embeds file
        self.base, self.texts = base, list(texts)
        self.cached = embed(base, self.texts) if cache else None

    def get(self) -> torch.Tensor:
        return self.cached if self.cached is not None else embed(self.base, self.texts)


def share_frozen(perf) -> bool:
    """Frozen tensors can be shared between two UNets unless FSDP shards (and so replaces) them."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    return perf.share_frozen and PartialState().distributed_type != DistributedType.FSDP


def validation_images(base: SDComponents, unet, prompts: Sequence[str], tracking: TrackingConfig, resolution: int):
    requests = [
        Request(prompt=p, seed=tracking.seed + i, guidance_scale=tracking.guidance_scale, height=resolution,
                width=resolution)
        for i, p in enumerate(prompts)
    ]
    was_training = unet.training
    unet.eval()
    images = generate(with_unet(base, unet), requests, num_inference_steps=tracking.num_inference_steps)
    unet.train(was_training)
    return images, list(prompts)


def default_prompts(concepts: Sequence[str], tracking: TrackingConfig) -> list[str]:
    return list(tracking.validation_prompts) or [*concepts, *UNRELATED_PROMPTS]


def export_unet(output_dir: str, base: SDComponents, unet, cfg, card: ModelCard) -> dict[str, str]:
    from sdd.config import to_yaml

    return export_model(
        output_dir,
        base,
        unet,
        config_yaml=to_yaml(cfg),
        card=card,
        is_lora=cfg.finetune == "lora",
        merge_lora=cfg.export.merge_lora,
        dtype=cfg.export.dtype,
    )


def hyperparameters(cfg, section) -> dict:
    train = cfg.train
    out = {
        "lr": train.lr,
        "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "mixed_precision": train.mixed_precision,
        "seed": train.seed,
    }
    out.update(dataclasses.asdict(section))
    if cfg.finetune == "lora":
        out.update({f"lora.{k}": v for k, v in dataclasses.asdict(cfg.lora).items()})
    return out
