"""The ShapesWorld base model, trained from scratch through the generic loop in two stages (``stages``).

    loss_vae = || D(E(x) + sigma eps) - x ||^2 + w_kl KL(q(z|x) || N(0, I))
    loss     = E_{t, eps} [ min(SNR(t), gamma) / SNR(t) * || eps - eps_theta(z_t, c, t) ||^2 ],  c = "" w.p. p_empty
    loss_sd3 = E_{s, eps} [ || (eps - x0) - v_theta((1 - s) x0 + s eps, c, 1000 s) ||^2 ]   (``family: sd3``)

1. ``ShapesVAEMethod``: the AutoencoderKL, on reconstruction (MSE) + a small KL term.
2. ``ShapesDiffusionMethod``: UNet and text encoder jointly, on the standard epsilon-prediction loss with
   min-SNR-5 weighting (Hang et al. 2023), 10 % empty captions (for classifier-free guidance), and an EMA of the
   weights, which is what gets exported.

``family: sd3`` (``configs/shapes/base_sd3.yaml``) trains the same world's model of the SD3 kind instead
(:func:`sdd.shapes.model.build_untrained_sd3`: an MMDiT and two CLIP encoders with projections, trained jointly;
no T5): stage 2 is flow matching (Esser et al. 2024, SD3): x_s = (1 - s) x0 + s eps, target v = eps - x0, the
transformer called at timestep 1000 s, s drawn logit-normal (or uniform) and moved by the scheduler's shift,
s' = shift s / (1 + (shift - 1) s), so that training sees the sigmas sampling visits. No min-SNR weighting (SD3's
logit-normal sampling is its weighting). Same captions, p_empty, EMA and export (a ``StableDiffusion3Pipeline``
folder). ``flow.teacher`` distils a model of the UNet kind instead: where the teacher's schedule reaches, s is moved
to the nearest of its timesteps and the target is its x0 estimate as a velocity, (x_s - x0_teacher) / s.

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


def flow_noisy(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps, with ``sigma`` (B,) broadcast over (B, C, H, W)."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def flow_matching_loss(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|| target - v ||^2, the mean over every entry: flow matching's velocity regression (SD3), the target the
    data's eps - x0 (or a teacher's velocity, ``flow.teacher``)."""
    return F.mse_loss(v.float(), target.float())


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """shift s / (1 + (shift - 1) s): FlowMatchEulerDiscreteScheduler's static shift (1: the identity)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, generator: torch.Generator, sampling: str = "logit_normal", mean: float = 0.0,
                  std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """(n,) sigmas in (0, 1): sigmoid(N(mean, std^2)) (SD3's logit-normal) or U(0, 1), then shifted."""
    if sampling == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    else:
        u = torch.rand(n, generator=generator)
    return shift_sigmas(u, shift)


def teacher_timesteps(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """A VP teacher's timestep for each flow sigma: the integer t whose noise-to-signal ratio sqrt((1 - a_t) / a_t)
    is nearest (in log) to the flow's s / (1 - s); the flow sigma of that t exactly, sig_t / (1 + sig_t); and
    whether s lies inside the range the teacher's schedule covers (t = 0 .. T - 1)."""
    ac = alphas_cumprod.to(torch.float64).cpu()
    table = ((1 - ac) / ac).sqrt()  # increasing in t
    s = sigma.to(torch.float64).cpu()
    ratio = (s / (1 - s)).clamp(min=1e-12)
    hi = torch.searchsorted(table, ratio).clamp(1, len(table) - 1)
    lo = hi - 1
    t = torch.where((ratio.log() - table[lo].log()).abs() <= (table[hi].log() - ratio.log()).abs(), lo, hi)
    covered = (ratio >= table[0]) & (ratio <= table[-1])
    return t, (table[t] / (1 + table[t])).to(sigma.dtype), covered


def velocity_of_x0(x_s: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(x_s - x0) / s: the velocity eps - x0 a flow model predicts at x_s, given its x0 estimate."""
    return (x_s - x0) / sigma.reshape(-1, *([1] * (x_s.ndim - 1))).to(x_s.dtype)


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
class FlowSettings:
    """``family: sd3``: how the flow-matching stage draws sigmas, and the model's size."""

    sigma_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_layers: int = 4  # MMDiT blocks (the last is context_pre_only)
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    text_layers: int = 3  # each CLIP encoder's
    p_drop_pooled: float = 0.0  # share of captions whose pooled vectors are the empty prompt's (tokens must carry)
    shift: float = 1.0  # the scheduler's static shift: training's sigmas and the exported sampler's (SD3: 3.0)
    text_init: Optional[str] = None  # a CLIPTextModel folder CLIP-L starts from (then trained jointly); null: random
    # a ShapesWorld model of the UNet kind ('shapes' or a pipeline folder) whose predictions, as velocities, are the
    # targets wherever its schedule reaches (distillation; the data's eps - x0 beyond); null: the data's everywhere
    teacher: Optional[str] = None

    def __post_init__(self) -> None:
        check(self.logit_std > 0, "flow.logit_std", "must be > 0")
        check(self.num_layers >= 1, "flow.num_layers", "must be >= 1")
        check(self.shift > 0, "flow.shift", "must be > 0")


@dataclass
class ShapesBaseConfig:
    method: Literal["shapes-base"] = "shapes-base"
    output_dir: str = "outputs/shapes-base"
    seed: int = 0  # initial weights
    family: Literal["sd", "sd3"] = "sd"  # sd: UNet, epsilon, DDIM (model.pretrained: shapes); sd3: MMDiT, flow
    flow: FlowSettings = field(default_factory=FlowSettings)
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


class TextToImageSD3(nn.Module):
    """SD3's transformer and its two CLIP encoders as one trainable module; the conditioning is assembled as
    ``StableDiffusion3Pipeline.encode_prompt`` does (:func:`sdd.families.sd3.conditioning`); the T5 rows are the
    zeros the model's zero T5 outputs (:func:`sdd.shapes.model.build_zero_t5`), without running it."""

    def __init__(self, transformer, text_encoder, text_encoder_2):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, x_s, timestep, input_ids, input_ids_2, pooled_ids=None, pooled_ids_2=None):
        """``pooled_ids``: other texts' ids for the pooled vectors (``flow.p_drop_pooled``), else the captions'."""
        from sdd.families import sd3

        hidden, pooled = [], []
        for encoder, ids, other in ((self.text_encoder, input_ids, pooled_ids),
                                    (self.text_encoder_2, input_ids_2, pooled_ids_2)):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0] if other is None else encoder(other)[0])
        config = self.transformer.config
        t5 = hidden[0].new_zeros(len(ids), sd3.MAX_SEQUENCE_LENGTH, config.joint_attention_dim)
        context = sd3.conditioning(hidden, pooled, t5)
        return sd3.StableDiffusion3(config.num_layers, config.pooled_projection_dim).denoise(
            self.transformer, x_s, timestep, context)


class ShapesDiffusionMethod:
    def __init__(self, cfg: ShapesBaseConfig, device="cpu", process_index: int = 0, num_processes: int = 1):
        from diffusers import AutoencoderKL

        vae_path = vae_folder(cfg)
        if not os.path.isdir(vae_path):
            raise UserError(f"vae_path: no such folder: {vae_path}")
        self.cfg = cfg
        self.device = device
        vae = AutoencoderKL.from_pretrained(vae_path, use_safetensors=True).to(device).eval().requires_grad_(False)
        if cfg.family == "sd3":
            f = cfg.flow
            self.base = shapes_model.build_untrained_sd3(cfg.seed, vae=vae, num_layers=f.num_layers,
                                                         num_attention_heads=f.num_attention_heads,
                                                         attention_head_dim=f.attention_head_dim,
                                                         text_layers=f.text_layers, shift=f.shift,
                                                         text_init=f.text_init)
            self.base.text_encoder_2.to(device).train()
            modules = (self.base.unet, self.base.text_encoder, self.base.text_encoder_2)
            self.model = TextToImageSD3(*modules)
        else:
            self.base = shapes_model.build_untrained(cfg.seed, vae=vae)
            self.model = TextToImage(self.base.unet, self.base.text_encoder)
        self.base.text_encoder.to(device).train()
        self.base.unet.to(device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self._pairs = (list(self.ema.parameters()), list(self.model.parameters()))
        self.alphas_cumprod = getattr(self.base.scheduler, "alphas_cumprod", None)
        self.teacher = self.load_teacher(cfg.flow.teacher, vae) if cfg.family == "sd3" and cfg.flow.teacher else None

    def load_teacher(self, path: str, vae):
        """The frozen UNet-kind model whose predictions ``flow.teacher`` distils; it must share the VAE's latents."""
        from sdd.models import load_components

        teacher = load_components(path)
        if teacher.prediction.kind == "flow" or teacher.prediction.alphas_cumprod is None:
            raise UserError(f"flow.teacher: {path} is not a model of the UNet kind (a VP schedule is needed)")
        theirs, ours = teacher.vae.state_dict(), vae.state_dict()
        same = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k].to(theirs[k])) for k in ours)
        if not same or teacher.vae.config.scaling_factor != vae.config.scaling_factor:
            raise UserError(f"flow.teacher: {path} has another VAE than {vae_folder(self.cfg)} (its latents differ)")
        teacher.vae = vae
        teacher.unet.to(self.device).eval().requires_grad_(False)
        for encoder in teacher.text_encoders:
            encoder.to(self.device).eval().requires_grad_(False)
        return teacher

    def tokenize(self, captions, tok=None):
        tok = tok or self.base.tokenizer
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
            z0 = (sample - (self.base.vae.config.shift_factor or 0.0)) * self.base.vae.config.scaling_factor
        if cfg.family == "sd3":
            return self.flow_loss(model, z0, captions, generator)
        noise = torch.randn(z0.shape, generator=generator).to(self.device)
        self.alphas_cumprod = self.alphas_cumprod.to(self.device)
        t = torch.randint(0, len(self.alphas_cumprod), (z0.shape[0],), generator=generator).to(self.device)
        z_t = self.base.scheduler.add_noise(z0, noise, t)
        eps = model(z_t, t, self.tokenize(captions))
        per_sample = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.diffusion.min_snr_gamma:
            per_sample = per_sample * min_snr_weights(self.alphas_cumprod, t, cfg.diffusion.min_snr_gamma)
        return per_sample.mean(), {}

    def flow_loss(self, model, z0, captions, generator):
        f = self.cfg.flow
        eps = torch.randn(z0.shape, generator=generator).to(self.device)
        sigma = sample_sigmas(len(z0), generator, f.sigma_sampling, f.logit_mean, f.logit_std,
                              self.base.scheduler.config.shift).to(self.device)
        pooled = {}
        if f.p_drop_pooled > 0:  # the pooled vectors of "" for some captions: the token rows must carry the text
            drop = torch.rand(len(captions), generator=generator) < f.p_drop_pooled
            texts = ["" if d else c for d, c in zip(drop.tolist(), captions)]
            pooled = dict(pooled_ids=self.tokenize(texts), pooled_ids_2=self.tokenize(texts, self.base.tokenizer_2))
        if self.teacher is not None:  # sigmas the teacher's schedule reaches move onto its nearest timestep
            t, exact, covered = teacher_timesteps(sigma, self.teacher.prediction.alphas_cumprod)
            sigma = torch.where(covered.to(sigma.device), exact.to(sigma.device), sigma)
        x_s = flow_noisy(z0, eps, sigma)
        target = eps - z0
        if self.teacher is not None:  # the teacher's velocity there, the data's beyond
            target = torch.where(covered.to(self.device).reshape(-1, 1, 1, 1),
                                 self.teacher_velocity(x_s, sigma, t, captions), target)
        v = model(x_s, sigma * self.base.scheduler.config.num_train_timesteps,
                  self.tokenize(captions), self.tokenize(captions, self.base.tokenizer_2), **pooled)
        return flow_matching_loss(v, target), {}

    @torch.no_grad()
    def teacher_velocity(self, x_s, sigma, t, captions):
        """The teacher's x0 at the VP point of the same noise, x_t = a (1 + sig) x_s, as a velocity at x_s."""
        c = self.teacher
        a, _ = c.prediction.coefficients(t, x_s)
        x_t = x_s / (1 - sigma.reshape(-1, 1, 1, 1)) * a  # (1 + sig) = 1 / (1 - s)
        t = t.to(self.device)
        x0 = c.prediction.to_x0(c.family.denoise(c.unet, x_t, t, c.family.encode(c, captions, self.device)), x_t, t)
        return velocity_of_x0(x_s, x0, sigma)

    def after_optimizer_step(self):
        ema_update_(*self._pairs, self.cfg.diffusion.ema_decay)

    def extra_state(self):
        return {f"ema.{n}": p for n, p in self.ema.named_parameters()}

    def load_extra_state(self, state):
        with torch.no_grad():
            for n, p in self.ema.named_parameters():
                p.copy_(state[f"ema.{n}"])

    def ema_components(self):
        if self.cfg.family == "sd3":
            return dataclasses.replace(self.base, unet=self.ema.transformer, text_encoder=self.ema.text_encoder,
                                       text_encoder_2=self.ema.text_encoder_2)
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
            finetune="transformer + both text encoders" if self.cfg.family == "sd3" else "UNet + text encoder",
            hyperparameters={"lr": self.cfg.train.lr, "batch_size": self.cfg.train.batch_size,
                             **dataclasses.asdict(self.cfg.diffusion),
                             **(dataclasses.asdict(self.cfg.flow) if self.cfg.family == "sd3" else {})},
            exported="EMA of the weights",
        )
        components = self.ema_components()
        return export_model(output_dir, components, components.unet, config_yaml=to_yaml(self.cfg),
                            card=card)
