"""Pieces every fine-tuning method shares: the config sections, a built base model, its text embeddings, the
latents' draws, sample grids, export."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from sdd.config import (
    ExportConfig,
    FinetuneSet,
    LoraConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
    check,
)
from sdd.export import ModelCard, export_model
from sdd.generation import Request, generate, with_unet
from sdd.models import SDComponents, load_components
from sdd.perf import PerfConfig

UNRELATED_PROMPTS = ["a photo of a dog", "a landscape painting of mountains"]


@dataclass
class FineTuningConfig:
    """The config sections every fine-tuning method shares; a method's config adds its own section (``sdd``,
    ``esd``) and may change a default (ESD's ``finetune`` choices and ``train`` defaults)."""

    method: str = ""  # which method the file is for (the registry's name; sdd-export and sdd.api read it)
    model: ModelConfig = field(default_factory=ModelConfig)
    concepts: list[str] = field(default_factory=lambda: ["nudity"])
    learned_embeds: Optional[str] = None  # a learned_embeds.safetensors whose token(s) may appear in concepts
    output_dir: str = "outputs/run"
    finetune: FinetuneSet = "xattn"
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)

    def __post_init__(self) -> None:
        check(len(self.concepts) > 0, "concepts", "name at least one concept, e.g. concepts='[nudity]'")
        check(all(c.strip() for c in self.concepts), "concepts", "a concept is empty")


def sample_offset(micro_step: int, process_index: int, num_processes: int, batch_size: int) -> int:
    """How many latents all processes drew before this process's micro-step ``micro_step``."""
    return (micro_step * num_processes + process_index) * batch_size


def load_base(pretrained: str, revision: str | None, device, learned_embeds: str | None = None, *,
              single_file_config: str | None = None) -> SDComponents:
    base = load_components(pretrained, revision, single_file_config=single_file_config)
    if learned_embeds:
        from sdd.textual_inversion import load_learned_embeds

        if base.text_encoder_2 is not None:
            from sdd.errors import UserError

            raise UserError("learned_embeds: a learned token goes into one text encoder; models with two or three "
                            "(SDXL, SD3, FLUX) are not supported yet")

        load_learned_embeds(base, learned_embeds)
    for encoder in base.text_encoders:
        encoder.requires_grad_(False)
    if base.vae is not None:
        base.vae.requires_grad_(False)
    return base.to(device)


def require_family(base: SDComponents, method: str, epsilon_only: bool = False) -> None:
    """One line, before anything is trained, for a method that does not run on the model's family yet (every
    method but SDD and ESD: the SD family only, so SDXL, SD3 and FLUX are refused; ``epsilon_only``: its loss reads the
    UNet's output as epsilon)."""
    from sdd.errors import UserError
    from sdd.families import prediction_of

    if base.family.name != "sd":
        raise UserError(f"model: {method} runs on SD-1.x and SD-2.x models so far, and {base.source} is a "
                        f"{base.family.name} model (SDD and ESD run on it)")
    kind = prediction_of(base.scheduler).kind
    if epsilon_only and kind != "epsilon":
        raise UserError(f"model: {method} reads the UNet's output as epsilon, and {base.source} predicts {kind} "
                        "(SDD and ESD run on it)")


def require_export(base: SDComponents, export: ExportConfig) -> None:
    """One line before anything is trained for an export the model's family cannot write (the same check
    ``export_model`` makes when ``sdd-export`` runs): SD3 and FLUX have no single-file layout here."""
    if export.format != "diffusers" and not base.family.single_file:
        from sdd.errors import UserError

        raise UserError(f"export.format: single files are written for SD-1.x, SD-2.x and SDXL models; {base.source} "
                        f"is a {base.family.name} model: use export.format=diffusers")


def ddim_grid(base: SDComponents, steps: int, resolution: Optional[int] = None):
    """A DDIM scheduler on the model's noise schedule with ``steps`` grid points (noisiest first); for a
    flow-matching model (SD3, FLUX) its own flow-matching scheduler's grid, as its pipeline sets it for images of
    ``resolution`` (default: the model's; FLUX's shift depends on it) (``sdd.sampling.grid_step`` takes the Euler
    steps on its sigmas)."""
    from diffusers import DDIMScheduler

    from sdd.sampling import is_flow_matching

    if is_flow_matching(base.scheduler):
        scheduler = base.scheduler.__class__.from_config(base.scheduler.config)
        base.family.set_timesteps(scheduler, steps, latent_shape(base, resolution or base.default_resolution))
        return scheduler
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
    """(N, L, D) conditionings of ``texts`` by the model's family with the (frozen) text encoder(s) (SDXL: the
    pooled embedding as one more row, sdd.families.sdxl)."""
    return base.family.encode(base, list(texts))


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
        format=cfg.export.format,
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


@torch.no_grad()
def encode_images(base: SDComponents, files: Sequence[str], resolution: int, device, batch: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every image file (resized and centre-cropped to ``resolution``),
    computed once; a method trained on images samples its latents from it."""
    import numpy as np

    from sdd.images import load_rgb, resize_center_crop

    vae = base.vae
    means, stds = [], []
    for start in range(0, len(files), batch):
        pixels = []
        for path in files[start : start + batch]:
            image = resize_center_crop(load_rgb(path), resolution)
            pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        x = torch.stack(pixels).to(device, next(vae.parameters()).dtype)
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def noised_latents(base: SDComponents, noise_scheduler, mean: torch.Tensor, std: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The standard denoising batch of images given by their VAE posteriors (B, C, H, W): a posterior sample
    z_0, t ~ U{0..T-1}, eps, and (z_t, t, target) with the target the model predicts (eps, or v for a
    v-prediction model)."""
    device = mean.device
    sample = mean + std * torch.randn(mean.shape, generator=generator).to(device)
    z_0 = sample * base.vae.config.scaling_factor
    eps = torch.randn(z_0.shape, generator=generator).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (mean.shape[0],), generator=generator)
    t = t.to(device)
    z_t = noise_scheduler.add_noise(z_0, eps, t)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return z_t, t, noise_scheduler.get_velocity(z_0, eps, t)
    return z_t, t, eps
