"""Plain text-to-image fine-tuning on captioned images: the relearning attack's step, and benign fine-tuning.

    loss = E_{(x, c), t, eps} || eps - eps_theta( sqrt(abar_t) E(x) + sqrt(1 - abar_t) eps ; c, t ) ||^2

over an image folder (``metadata.jsonl``: ``file_name``, ``prompt``, ``seed``), each image with its own caption c
(replaced by the empty prompt with probability ``data.caption_dropout``; v-prediction models: the velocity target).
Any of SDD's parameter sets trains (``xattn`` by default, ``lora`` included). Relearning (docs/METHODS.md section
7.5) fine-tunes an erased model on images of the erased concept and counts the steps until the concept is back;
fine-tuning on unrelated images measures concept resurgence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from sdd.config import ExportConfig, FinetuneSet, LoraConfig, ModelConfig, TrackingConfig, TrainConfig, check
from sdd.export import ModelCard
from sdd.methods import common
from sdd.params import configure_trainable
from sdd.perf import PerfConfig, apply_to_unet

# --- the math (pure) -----------------------------------------------------------------------------------------


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over elements of (prediction - target)^2, in fp32."""
    return F.mse_loss(prediction.float(), target.float())


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class DataSettings:
    caption_dropout: float = 0.0  # share of captions replaced by the empty prompt
    resolution: Optional[int] = None  # image size (default: the model's)

    def __post_init__(self) -> None:
        check(0.0 <= self.caption_dropout < 1.0, "data.caption_dropout", "must lie in [0, 1)")


@dataclass
class FinetuneConfig:
    method: Literal["finetune"] = "finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    images: str = "???"  # the captioned images: an image folder (metadata.jsonl + images)
    learned_embeds: Optional[str] = None
    output_dir: str = "outputs/finetune"
    finetune: FinetuneSet = "xattn"
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, batch_size=4, lr=1e-5))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(tracker="none", sample_every=0))
    export: ExportConfig = field(default_factory=ExportConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


# --- the method ----------------------------------------------------------------------------------------------


class FinetuneMethod:
    """The UNet's chosen parameters learn to denoise the captioned images; text encoder and VAE frozen."""

    def __init__(self, cfg: FinetuneConfig, device: torch.device | str = "cpu", process_index: int = 0,
                 num_processes: int = 1):
        from diffusers import DDPMScheduler

        from sdd.feedback import load_items

        self.cfg = cfg
        items = load_items(cfg.images)  # checked before the model is loaded
        self.base = common.load_base(cfg.model.pretrained, cfg.model.revision, device, cfg.learned_embeds,
                                     single_file_config=cfg.model.single_file_config)
        common.require_family(self.base, epsilon_only=True, method="fine-tuning on images")
        self.model = self.base.unet
        self.trainable_names = configure_trainable(self.model, cfg.finetune, cfg.lora)
        self.model.train()
        apply_to_unet(self.model, cfg.perf, training=True)
        self.resolution = cfg.data.resolution or self.base.default_resolution
        self.noise_scheduler = DDPMScheduler.from_config(self.base.scheduler.config)
        self.latent_mean, self.latent_std = common.encode_images(self.base, [i.path for i in items],
                                                                 self.resolution, device)
        captions = list(dict.fromkeys(["", *(i.prompt for i in items)]))
        self.texts = common.TextEmbeddings(self.base, captions, cfg.perf.cache_text_embeddings)
        self.caption_index = torch.tensor([captions.index(i.prompt) for i in items])

    def compute_loss(self, model, micro_step: int, generator: torch.Generator):
        batch, device = self.cfg.train.batch_size, self.latent_mean.device
        pick = torch.randint(0, len(self.caption_index), (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < self.cfg.data.caption_dropout
        z_t, t, target = common.noised_latents(self.base, self.noise_scheduler, self.latent_mean[pick.to(device)],
                                               self.latent_std[pick.to(device)], generator)
        c = self.texts.get()[torch.where(dropped, 0, self.caption_index[pick]).to(device)]
        prediction = model(z_t, t, encoder_hidden_states=c).sample
        return denoising_loss(prediction, target), {}

    def validation_images(self):
        prompts = list(self.cfg.tracking.validation_prompts)
        if not prompts:
            return [], []
        return common.validation_images(self.base, self.model, prompts, self.cfg.tracking, self.resolution)

    def export(self, output_dir: str) -> dict[str, str]:
        cfg = self.cfg
        card = ModelCard(
            base_model=cfg.model.pretrained,
            method="fine-tuning on captioned images",
            concepts=[],
            steps=cfg.train.steps,
            finetune=cfg.finetune,
            hyperparameters={"lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "images": cfg.images,
                             "caption_dropout": cfg.data.caption_dropout},
            exported="the fine-tuned model",
        )
        return common.export_unet(output_dir, self.base, self.model, cfg, card)
