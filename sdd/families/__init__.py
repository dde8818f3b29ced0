"""Model families: the seam between the methods and a family of diffusion models.

A family is a short module that fulfils :class:`ModelFamily`, the few operations the methods, the sampler,
generation, guidance and export need: encode prompts into a conditioning, one denoiser call, the named parameter
sets, and the stock diffusers pipeline class that loads an export. What the denoiser's output predicts is data of
the model (its scheduler's ``prediction_type``), and :class:`Prediction` turns an output into epsilon or x0 at
(x_t, t) and back; the scheduler step is the model's own scheduler's ``step``, which reads the same field.

``sd`` (:mod:`sdd.families.sd`) serves SD-1.x (epsilon) and SD-2.x (epsilon or v-prediction): the same UNet call
and pipeline class, the text encoder's depth and activation being config. ``sdxl`` (:mod:`sdd.families.sdxl`):
two text encoders, pooled embeddings and time ids. ``sd3`` (:mod:`sdd.families.sd3`): an MMDiT transformer in the
``unet`` slot, three text encoders, flow matching (``Prediction`` kind ``flow``). ``flux``
(:mod:`sdd.families.flux`): FLUX.1's transformer on packed latents, CLIP's pooled output and T5, flow matching on a
grid shifted by the image size, distilled guidance (one forward per step, no unconditional branch). What the two
MMDiT families share is :mod:`sdd.families.mmdit`. See docs/METHODS.md section 10.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Protocol, Sequence

import torch

from sdd.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")  # a VP model's scheduler.config.prediction_type; "flow": SD3, FLUX


class ModelFamily(Protocol):
    """What every family provides; ``components`` is the family's bundle (``sdd.models.SDComponents``)."""

    name: str
    parameter_sets: Mapping[str, Callable[[str], bool]]  # finetune name -> does it train this parameter
    denoiser_name: str  # what the denoiser is called in its pipeline ("unet", "transformer"): export file names
    single_file: bool  # whether export.format=single-file (the original layout) is written for the family
    # False: a sampling step combines an unconditional and a conditional branch (CFG); True (FLUX): one forward on
    # the prompt, the guidance value an input of the denoiser (``denoise(..., guidance=s)``)
    guidance_distilled: bool
    latent_patch: int  # the denoiser reads p x p latent patches packed into its channels (1; FLUX: 2)

    def lora_targets(self, target_modules: Sequence[str]) -> list[str]:
        """The modules ``lora.target_modules`` names on this family (the default mirrors ``xattn``)."""
        ...

    def encode(self, components, prompts: Sequence[str], device=None) -> torch.Tensor:
        """The conditioning of ``prompts`` (one row per prompt), as the family's pipeline computes it."""
        ...

    def denoise(self, unet, z: torch.Tensor, t, conditioning: torch.Tensor) -> torch.Tensor:
        """One denoiser call: the raw output (what :class:`Prediction` says it predicts)."""
        ...

    def set_timesteps(self, scheduler, steps: int, latent_shape: Sequence[int], device=None) -> None:
        """Put ``scheduler`` on the grid of ``steps`` the family's pipeline samples latents of ``latent_shape``
        (C, H, W) on (FLUX: shifted by the image token count)."""
        ...

    def pipeline_class(self) -> type:
        """The stock diffusers pipeline that loads an export (``from_pretrained``) and checks it in tests."""
        ...

    def pipeline(self, components):
        """That pipeline holding ``components`` (no safety checker, no watermark): what export saves."""
        ...


@dataclass(frozen=True)
class Prediction:
    """What a denoiser output predicts on a VP schedule x_t = a_t x0 + s_t eps (a_t^2 = alphas_cumprod[t],
    s_t^2 = 1 - a_t^2), and its conversions at (x_t, t):

        v   = a_t eps - s_t x0          eps = s_t x_t + a_t v          x0 = a_t x_t - s_t v

    For ``epsilon`` the conversion to epsilon is the identity (the very tensor comes back), so an epsilon model's
    numbers never pass through it.

    ``flow`` (SD3, FLUX: flow matching): x_s = (1 - s) x0 + s eps with s = t / ``num_train_timesteps`` (the
    scheduler's timesteps are sigmas times that), and the output is v = eps - x0:

        eps = x_s + (1 - s) v           x0 = x_s - s v

    At s = 1 (the first step of every flow sampler) eps is x_s itself and v cannot be recovered from it, so
    nothing combines a flow model's predictions in epsilon (generation refuses a guidance that would).
    """

    kind: str  # "epsilon", "v_prediction" or "flow"
    alphas_cumprod: Optional[torch.Tensor]  # (T,) of the model's training schedule (None: a scheduler without one)
    num_train_timesteps: int = 1000  # flow: t = s * num_train_timesteps

    def coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) shaped to broadcast over ``like`` (B, ...); ``t`` a number or a (B,) tensor. A fractional
        t (Euler grids) takes s/a interpolated linearly in t, as Euler's sigmas are."""
        if self.alphas_cumprod is None:
            raise UserError("model: its scheduler has no alphas_cumprod, so its prediction cannot be converted")
        ac = self.alphas_cumprod.to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        sigma = ((1 - ac) / ac).sqrt()
        lo = t.floor().long().clamp(0, len(ac) - 1)
        hi = (lo + 1).clamp(max=len(ac) - 1)
        frac = t - t.floor()
        sig = sigma[lo] * (1 - frac) + sigma[hi] * frac
        a = (1 / (1 + sig**2)).sqrt()
        s = sig * a
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (a.to(like.device, like.dtype).reshape(shape), s.to(like.device, like.dtype).reshape(shape))

    def sigma(self, t, like: torch.Tensor) -> torch.Tensor:
        """Flow: s = t / num_train_timesteps, shaped to broadcast over ``like``."""
        s = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu() / self.num_train_timesteps
        return s.to(like.device, like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))

    def to_epsilon(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        if self.kind == "epsilon":
            return output
        if self.kind == "flow":
            return x_t + (1 - self.sigma(t, output)) * output
        a, s = self.coefficients(t, output)
        return s * x_t + a * output

    def from_epsilon(self, eps: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The output that predicts ``eps`` (the inverse of :meth:`to_epsilon`)."""
        if self.kind == "epsilon":
            return eps
        if self.kind == "flow":
            return (eps - x_t) / (1 - self.sigma(t, eps))
        a, s = self.coefficients(t, eps)
        return (eps - s * x_t) / a

    def to_x0(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        if self.kind == "flow":
            return x_t - self.sigma(t, output) * output
        a, s = self.coefficients(t, output)
        if self.kind == "epsilon":
            return (x_t - s * output) / a
        return a * x_t - s * output


def prediction_of(scheduler) -> Prediction:
    """The :class:`Prediction` of a model from its scheduler (``prediction_type``, ``alphas_cumprod``; a
    flow-matching scheduler: ``flow``)."""
    from sdd.sampling import is_flow_matching

    if is_flow_matching(scheduler):
        return Prediction("flow", None, scheduler.config.num_train_timesteps)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise UserError(f"model: prediction_type '{kind}' is not supported (supported: {', '.join(PREDICTION_TYPES)})")
    return Prediction(kind, getattr(scheduler, "alphas_cumprod", None))


def family(name: str, components=None) -> ModelFamily:
    """The family called ``name`` (for ``sdxl``, bound to ``components``: its VAE factor gives the time ids, its
    ``force_zeros_for_empty_prompt`` the empty prompt's conditioning; for ``sd3``, to its transformer's depth (the
    last block reads no text for the image) and pooled width; for ``flux``, to whether its transformer embeds a
    guidance value and its pooled width)."""
    from sdd.families import flux, sd, sd3, sdxl

    if name == sd.FAMILY.name:
        return sd.FAMILY
    if name == sd3.StableDiffusion3.name:
        if components is None:
            return sd3.StableDiffusion3()
        config = components.unet.config
        return sd3.StableDiffusion3(config.num_layers, config.pooled_projection_dim, config.joint_attention_dim)
    if name == sdxl.StableDiffusionXL.name:
        if components is None:
            return sdxl.StableDiffusionXL()
        return sdxl.StableDiffusionXL(components.vae_scale_factor, components.force_zeros_for_empty_prompt)
    if name == flux.Flux.name:
        if components is None:
            return flux.Flux()
        config = components.unet.config
        return flux.Flux(config.guidance_embeds, config.pooled_projection_dim)
    raise UserError(f"model: unknown model family '{name}' (known: sd, sdxl, sd3, flux)")
