"""The ShapesWorld base model, trained from scratch through the generic loop in two stages (``stages``).

    loss_vae = || D(E(x) + sigma eps) - x ||^2 + w_kl KL(q(z|x) || N(0, I))
    loss     = E_{t, eps} [ min(SNR(t), gamma) / SNR(t) * || eps - eps_theta(z_t, c, t) ||^2 ],  c = "" w.p. p_empty

1. ``ShapesVAEMethod``: the AutoencoderKL, on reconstruction (MSE) + a small KL term.
2. ``ShapesDiffusionMethod``: UNet and text encoder jointly, on the standard epsilon-prediction loss with
   min-SNR-5 weighting (Hang et al. 2023), 10 % empty captions (for classifier-free guidance), and an EMA of the
   weights, which is what gets exported.

Images are rendered on the fly from each micro-step's generator; nothing is stored.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdd.config import TrackingConfig, TrainConfig, check
from sdd.errors import UserError
from sdd.export import ModelCard, export_model
from sdd.files import atomic_path
from sdd.generation import Request, generate, to_pil
from sdd.methods.sdd import ema_update_
from sdd.shapes import model as shapes_model
from sdd.shapes import world

# --- the math (pure) -----------------------------------------------------------------------------------------


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR(t), gamma) / SNR(t): the min-SNR-gamma weighting for epsilon prediction (Hang et al. 2023)."""
    alpha_bar = alphas_cumprod[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def batch_rng(generator: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class VAESettings:
    steps: int = 3000
    lr: float = 1e-3
    batch_size: int = 32
    kl_weight: float = 1e-6


@dataclass
class DiffusionSettings:
    p_empty: float = 0.1  # captions dropped for classifier-free guidance
    ema_decay: float = 0.999
    min_snr_gamma: Optional[float] = 5.0  # null: plain MSE
    guidance_scale: float = 5.0  # for sample grids

    def __post_init__(self) -> None:
        check(0.0 <= self.p_empty < 1.0, "diffusion.p_empty", "must lie in [0, 1)")
        check(0.0 <= self.ema_decay < 1.0, "diffusion.ema_decay", "must lie in [0, 1)")


@dataclass
class ShapesBaseConfig:
    method: Literal["shapes-base"] = "shapes-base"
    output_dir: str = "outputs/shapes-base"
    seed: int = 0  # initial weights
    vae_path: Optional[str] = None  # a trained VAE folder: skips stage 1
    vae: VAESettings = field(default_factory=VAESettings)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=20000, batch_size=64, lr=3e-4, weight_decay=0.0, lr_scheduler="constant_with_warmup",
            lr_warmup_steps=500, checkpoint_every=1000, checkpoints_total_limit=2, log_every=50,
        )
    )
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(
            sample_every=2000, num_inference_steps=25, guidance_scale=5.0,
            validation_prompts=["a red circle", "a blue square", "a green triangle", "yellow", "red", "circle"],
        )
    )

    def vae_train(self) -> TrainConfig:
        return dataclasses.replace(
            self.train, steps=self.vae.steps, lr=self.vae.lr, batch_size=self.vae.batch_size,
            lr_scheduler="constant", lr_warmup_steps=0,
        )


def vae_folder(cfg: ShapesBaseConfig) -> str:
    """The trained VAE the diffusion stage uses: ``vae_path``, or stage 1's export in ``OUT/vae/vae``."""
    return cfg.vae_path or os.path.join(cfg.output_dir, "vae", "vae")


def stages(cfg: ShapesBaseConfig) -> list[tuple[ShapesBaseConfig, type]]:
    """(config, method class) of each stage to run: the VAE (unless one is given or trained already), then the
    UNet + text encoder. Stage 1 runs in ``OUT/vae`` with its own steps, LR and batch, and no sample grids."""
    out = []
    if not os.path.isdir(vae_folder(cfg)):
        vae_cfg = dataclasses.replace(
            cfg, output_dir=os.path.join(cfg.output_dir, "vae"), train=cfg.vae_train(),
            tracking=dataclasses.replace(cfg.tracking, sample_every=0, run_name="shapes-vae"),
        )
        out.append((vae_cfg, ShapesVAEMethod))
    out.append((cfg, ShapesDiffusionMethod))
    return out


# --- stage 1: the autoencoder --------------------------------------------------------------------------------


class Autoencoder(nn.Module):
    """The VAE's encode -> reparameterised sample -> decode as one forward (so DDP sees it)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, noise):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise
        return self.vae.decode(z).sample, posterior


class ShapesVAEMethod:
    def __init__(self, cfg: ShapesBaseConfig, device="cpu", process_index: int = 0, num_processes: int = 1):
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.vae = shapes_model.build_vae().to(device)
        self.model = Autoencoder(self.vae).train()
        self.device = device

    def compute_loss(self, model, micro_step, generator):
        images, _, _ = world.sample_batch(batch_rng(generator), self.cfg.vae.batch_size)
        x = torch.from_numpy(images).to(self.device)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        noise_shape = (x.shape[0], self.vae.config.latent_channels, x.shape[2] // f, x.shape[3] // f)
        recon, posterior = model(x, torch.randn(noise_shape, generator=generator).to(self.device))
        mse = F.mse_loss(recon.float(), x.float())
        kl = posterior.kl().mean() / float(np.prod(noise_shape[1:]))
        return mse + self.cfg.vae.kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}

    @torch.no_grad()
    def validation_images(self):
        images, captions, _ = world.sample_batch(np.random.default_rng(self.cfg.tracking.seed), 4)
        x = torch.from_numpy(images).to(self.device)
        self.vae.eval()
        recon = self.vae.decode(self.vae.encode(x).latent_dist.mean).sample
        self.vae.train()
        return to_pil(torch.cat([x, recon])), [*captions, *(f"reconstruction: {c}" for c in captions)]

    @torch.no_grad()
    def scaling_factor(self, n: int = 2048) -> float:
        """1 / std of the latents, so that the diffusion model sees unit-variance inputs (as SD's 0.18215)."""
        images, _, _ = world.sample_batch(np.random.default_rng(12345), n)
        self.vae.eval()
        z = self.vae.encode(torch.from_numpy(images).to(self.device)).latent_dist.mean
        self.vae.train()
        return float(1.0 / z.float().std())

    def export(self, output_dir):
        vae = copy.deepcopy(self.vae).eval()
        vae.register_to_config(scaling_factor=self.scaling_factor())
        path = os.path.join(output_dir, "vae")
        with atomic_path(path) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        return {"vae": path}


# --- stage 2: UNet + text encoder ----------------------------------------------------------------------------


class TextToImage(nn.Module):
    """UNet and text encoder as one trainable module (what the loop prepares)."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, z_t, t, input_ids):
        context = self.text_encoder(input_ids)[0]
        return self.unet(z_t, t, encoder_hidden_states=context).sample


class ShapesDiffusionMethod:
    def __init__(self, cfg: ShapesBaseConfig, device="cpu", process_index: int = 0, num_processes: int = 1):
        from diffusers import AutoencoderKL

        vae_path = vae_folder(cfg)
        if not os.path.isdir(vae_path):
            raise UserError(f"vae_path: no such folder: {vae_path}")
        self.cfg = cfg
        self.device = device
        vae = AutoencoderKL.from_pretrained(vae_path, use_safetensors=True).to(device).eval().requires_grad_(False)
        self.base = shapes_model.build_untrained(cfg.seed, vae=vae)
        self.base.text_encoder.to(device).train()
        self.base.unet.to(device).train()
        self.model = TextToImage(self.base.unet, self.base.text_encoder)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self._pairs = (list(self.ema.parameters()), list(self.model.parameters()))
        self.alphas_cumprod = self.base.scheduler.alphas_cumprod.to(device)

    def tokenize(self, captions):
        tok = self.base.tokenizer
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    def compute_loss(self, model, micro_step, generator):
        cfg = self.cfg
        rng = batch_rng(generator)
        images, captions, _ = world.sample_batch(rng, cfg.train.batch_size, p_empty=cfg.diffusion.p_empty)
        x = torch.from_numpy(images).to(self.device)
        with torch.no_grad():
            posterior = self.base.vae.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
            sample = posterior.mean + posterior.std * noise
            z0 = sample * self.base.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=generator).to(self.device)
        t = torch.randint(0, len(self.alphas_cumprod), (z0.shape[0],), generator=generator).to(self.device)
        z_t = self.base.scheduler.add_noise(z0, noise, t)
        eps = model(z_t, t, self.tokenize(captions))
        per_sample = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.diffusion.min_snr_gamma:
            per_sample = per_sample * min_snr_weights(self.alphas_cumprod, t, cfg.diffusion.min_snr_gamma)
        return per_sample.mean(), {}

    def after_optimizer_step(self):
        ema_update_(*self._pairs, self.cfg.diffusion.ema_decay)

    def extra_state(self):
        return {f"ema.{n}": p for n, p in self.ema.named_parameters()}

    def load_extra_state(self, state):
        with torch.no_grad():
            for n, p in self.ema.named_parameters():
                p.copy_(state[f"ema.{n}"])

    def ema_components(self):
        return dataclasses.replace(self.base, unet=self.ema.unet, text_encoder=self.ema.text_encoder)

    def validation_images(self):
        t = self.cfg.tracking
        prompts = list(t.validation_prompts)
        requests = [Request(p, seed=t.seed + i, guidance_scale=t.guidance_scale) for i, p in enumerate(prompts)]
        return generate(self.ema_components(), requests, num_inference_steps=t.num_inference_steps), prompts

    def export(self, output_dir):
        from sdd.config import to_yaml

        card = ModelCard(
            base_model="(trained from scratch)",
            method="ShapesWorld base model",
            concepts=[],
            steps=self.cfg.train.steps,
            finetune="UNet + text encoder",
            hyperparameters={"lr": self.cfg.train.lr, "batch_size": self.cfg.train.batch_size,
                             **dataclasses.asdict(self.cfg.diffusion)},
            exported="EMA of the weights",
        )
        return export_model(output_dir, self.ema_components(), self.ema.unet, config_yaml=to_yaml(self.cfg),
                            card=card)
