"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), on the same loop as SDD.

    theta* <- theta (frozen)
    repeat:  z_T ~ N(0, I);  k ~ U{0..K-1};  c = one concept
             z_t, t = k CFG-DDIM steps of the model being trained (theta) toward c (start guidance)
             target = eps*(z_t, t) - eta * (eps*(z_t, c, t) - eps*(z_t, t))
             loss = || eps_theta(z_t, c, t) - target ||^2
    export theta

Variants: ``esd-x`` trains cross-attention (``xattn``), ``esd-u`` everything but cross-attention, the time
embedding and the output conv (``noxattn``); ``lora``/``full``/``selfattn`` are shared with SDD. The latents are
sampled with the same partial sampler as SDD's teacher (``sdd.sampling.sample_to_k``), and the model is queried
at the grid timestep of the latent it sees (the original script used a DDPM step about two DDIM steps off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from sdd import timing
from sdd.config import TrainConfig, check
from sdd.export import ModelCard
from sdd.methods import common
from sdd.params import configure_trainable
from sdd.perf import apply_to_unet, frozen_copy, sampling_autocast
from sdd.sampling import concept_indices, sample_k, sample_to_k

# --- the math (pure) -----------------------------------------------------------------------------------------


def esd_target(eps_frozen_uncond: torch.Tensor, eps_frozen_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """eps*(z_t, t) - eta * (eps*(z_t, c, t) - eps*(z_t, t)): negative guidance away from c, frozen model."""
    return eps_frozen_uncond - eta * (eps_frozen_concept - eps_frozen_uncond)


def esd_loss(eps_concept: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over elements of (eps_theta(z_t, c, t) - target)^2, in fp32; the target carries no gradient."""
    return F.mse_loss(eps_concept.float(), target.detach().float())


# --- configuration -------------------------------------------------------------------------------------------

ESDFinetune = Literal["esd-x", "esd-u", "xattn", "noxattn", "selfattn", "full", "lora"]
FINETUNE_SETS = {"esd-x": "xattn", "esd-u": "noxattn"}


@dataclass
class ESDSettings:
    negative_guidance: float = 1.0  # eta (ESD-x-1, ESD-u-1; the SDD paper compares with eta = 3)
    start_guidance: float = 3.0  # CFG scale with which the trained model samples z_t toward c
    ddim_steps: int = 50
    k_distribution: Literal["uniform", "beta"] = "uniform"
    beta_a: float = 3.0
    beta_b: float = 3.0
    concept_schedule: Literal["iterative", "random"] = "random"
    resolution: Optional[int] = None

    def __post_init__(self) -> None:
        check(self.ddim_steps >= 1, "esd.ddim_steps", f"must be >= 1, got {self.ddim_steps}")
        check(self.beta_a > 0 and self.beta_b > 0, "esd.beta_a/beta_b", "must be > 0")


@dataclass
class ESDConfig(common.FineTuningConfig):
    method: Literal["esd"] = "esd"
    output_dir: str = "outputs/esd"
    finetune: ESDFinetune = "esd-x"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, lr=1e-5, weight_decay=0.0))
    esd: ESDSettings = field(default_factory=ESDSettings)


# --- the method ----------------------------------------------------------------------------------------------


class ESDMethod:
    """Trained model = the UNet being fine-tuned (it also samples z_t); frozen = the original UNet (targets)."""

    def __init__(self, cfg: ESDConfig, device: torch.device | str = "cpu", process_index: int = 0,
                 num_processes: int = 1):
        self.cfg = cfg
        self.process_index, self.num_processes = process_index, num_processes
        self.base = common.load_base(cfg.model.pretrained, cfg.model.revision, device, cfg.learned_embeds,
                                     single_file_config=cfg.model.single_file_config)
        common.require_export(self.base, cfg.export)
        self.model = self.base.unet
        self.denoise = self.base.family.denoise  # one denoiser call of the model's family (sdd.families)
        finetune = FINETUNE_SETS.get(cfg.finetune, cfg.finetune)
        self.trainable_names = configure_trainable(self.model, finetune, cfg.lora, self.base.family)
        self.model.train()
        # taken before any step, so it is the original model (LoRA adapters start as the identity)
        self.frozen = frozen_copy(self.model, common.share_frozen(cfg.perf))
        apply_to_unet(self.model, cfg.perf, training=True)
        apply_to_unet(self.frozen, cfg.perf, training=False)

        s = cfg.esd
        self.texts = common.TextEmbeddings(self.base, ["", *cfg.concepts], cfg.perf.cache_text_embeddings)
        self.resolution = s.resolution or self.base.default_resolution
        self.scheduler = common.ddim_grid(self.base, s.ddim_steps, self.resolution)
        self.latent_shape = common.latent_shape(self.base, self.resolution)

    def draw(self, micro_step: int, generator: torch.Generator):
        """A micro-step's random draws: initial noise z_T, sampling steps k, concept index per latent."""
        s, batch = self.cfg.esd, self.cfg.train.batch_size
        z_T = torch.randn((batch, *self.latent_shape), generator=generator)
        k = sample_k(batch, s.ddim_steps, generator, s.k_distribution, (s.beta_a, s.beta_b))
        offset = common.sample_offset(micro_step, self.process_index, self.num_processes, batch)
        n_concepts = len(self.cfg.concepts)
        return z_T, k, concept_indices(s.concept_schedule, n_concepts, batch, offset, generator)

    def sample_latents(self, model, z_T, k, idx):
        """z_t sampled by the model being trained toward c, its timesteps, c, and the frozen model's target."""
        s, batch = self.cfg.esd, z_T.shape[0]
        embeds = self.texts.get()
        c_uncond, c = embeds[:1], embeds[1:][idx]
        z_T = z_T.to(c_uncond.device)
        c_uncond_b = c_uncond.expand(batch, -1, -1)
        with sampling_autocast(c_uncond.device, self.cfg.perf.teacher_precision):
            z_t, t = sample_to_k(model, self.scheduler, z_T, c, c_uncond, s.start_guidance, k, denoise=self.denoise,
                                 distilled=self.base.family.guidance_distilled)
            with torch.no_grad():
                if self.cfg.perf.frozen_passes == "batched":
                    eps = self.denoise(self.frozen, torch.cat([z_t, z_t]), torch.cat([t, t]),
                                       torch.cat([c_uncond_b, c]))
                    eps_uncond, eps_concept = eps[:batch], eps[batch:]
                else:  # two calls, as the original script
                    eps_uncond = self.denoise(self.frozen, z_t, t, c_uncond_b)
                    eps_concept = self.denoise(self.frozen, z_t, t, c)
                target = esd_target(eps_uncond.float(), eps_concept.float(), s.negative_guidance)
        return z_t.float(), t, c, target

    # the loop's interface

    def compute_loss(self, model, micro_step: int, generator: torch.Generator):
        z_T, k, idx = self.draw(micro_step, generator)
        with timing.region("sampling"):
            z_t, t, c, target = self.sample_latents(model, z_T, k, idx)
        loss = esd_loss(self.denoise(model, z_t, t, c), target)
        logs = {"k": k.float().mean().item()}
        return loss, logs

    def export_unet(self):
        return self.model

    def validation_images(self):
        prompts = common.default_prompts(self.cfg.concepts, self.cfg.tracking)
        return common.validation_images(self.base, self.export_unet(), prompts, self.cfg.tracking, self.resolution)

    def export(self, output_dir: str) -> dict[str, str]:
        cfg = self.cfg
        card = ModelCard(
            base_model=cfg.model.pretrained,
            method=f"ESD ({cfg.finetune}, eta={cfg.esd.negative_guidance:g})",
            concepts=list(cfg.concepts),
            steps=cfg.train.steps,
            finetune=cfg.finetune,
            hyperparameters=common.hyperparameters(cfg, cfg.esd),
            exported="the fine-tuned model",
        )
        return common.export_unet(output_dir, self.base, self.export_unet(), cfg, card)
