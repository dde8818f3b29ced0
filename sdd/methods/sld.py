"""SLD: Safe Latent Diffusion (Schramowski et al., CVPR 2023), an inference-time method: no weight changes.

    Δ = ε_p − ε_S;  μ = min(1, s_S·|Δ|) where Δ < λ, else 0
    γ_t = μ ⊙ (ε_S − ε_∅) + s_m·ν_t;  ν_t+1 = β_m·ν_t + (1 − β_m)·γ_t
    ε̄ = ε_∅ + s_g·(ε_p − ε_∅ − γ_t)   (after the warm-up δ; plain CFG before)

One extra UNet branch (the safety concept) bends the classifier-free-guidance estimate away from the concept at
every denoising step. The math is ours and pure, checked against numbers worked out by hand and against diffusers'
``StableDiffusionPipelineSafe`` (deprecated there, hence owned here). Below it: the settings (the paper's presets,
validation) and the ``sdd.generation.Guidance`` object that plugs the math into ``generate``, which runs all of a
step's branches in one batched UNet pass.

Where the paper and the official codes differ we follow the codes (docs/METHODS.md section 3.4): the element
scale is min(1, s_S|Δ|), the threshold is compared to the signed Δ, and the safety term sits inside the CFG
bracket. One deliberate difference from both codes: they switch SLD off below a scale (the original for s_S < 1,
diffusers for s_S <= 1 or s_g <= 1); here the equations apply for every value, so s_S = 0 is exactly
classifier-free guidance and small scales stay continuous rather than jumping to CFG.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from sdd.errors import UserError
from sdd.methods.knobs import checked_overrides, coerce, count, finite, need

# The original SLD safety text (ml-research/safe-latent-diffusion). diffusers prefixes it with "an image showing ";
# we keep the original, as the paper lists it.
SLD_SAFETY_CONCEPT = (
    "hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood, "
    "obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, brutality, cruelty"
)
# diffusers' default `safety_concept`, which SDD's generate.py also used as SD+NEG and SEGA text.
DIFFUSERS_SAFETY_CONCEPT = "an image showing " + SLD_SAFETY_CONCEPT


# --- SLD: the math (pure) ------------------------------------------------------------------------------------


def sld_safety_scale(
    eps_prompt: torch.Tensor, eps_safety: torch.Tensor, sld_guidance_scale: float, sld_threshold: float
) -> torch.Tensor:
    """SLD's element-wise scale μ (paper Eq. 5-6, as both official codes compute it).

        Δ = ε_p − ε_S;   μ = min(1, s_S·|Δ|) where Δ < λ,  0 where Δ ≥ λ

    The gate compares the *signed* Δ with λ: elements where the prompt already points further along than the
    safety concept (Δ ≥ λ) are left alone. The paper text has max(1, ·); the codes clamp at 1, which makes
    the gate soft only for |Δ| < 1/s_S. Shapes: any two equal shapes, e.g. (B, C, H, W); returns that shape.
    """
    delta = eps_prompt - eps_safety
    mu = torch.clamp(delta.abs() * sld_guidance_scale, max=1.0)
    return torch.where(delta >= sld_threshold, torch.zeros_like(mu), mu)


def sld_guidance(
    eps_uncond: torch.Tensor,
    eps_prompt: torch.Tensor,
    eps_safety: torch.Tensor,
    momentum: torch.Tensor,
    step: int,
    *,
    guidance_scale: float | torch.Tensor,
    sld_guidance_scale: float,
    sld_warmup_steps: int,
    sld_threshold: float,
    sld_momentum_scale: float,
    sld_mom_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SLD step: the guided noise estimate and the next momentum.

        γ_t   = μ ⊙ (ε_S − ε_∅) + s_m·ν_t                    (Eq. 4 and 7; μ from ``sld_safety_scale``)
        ν_t+1 = β_m·ν_t + (1 − β_m)·γ_t                       (Eq. 8; ν_0 = 0)
        ε̄     = ε_∅ + s_g·(ε_p − ε_∅ − γ_t)   if step ≥ δ     (Eq. 3)
        ε̄     = ε_∅ + s_g·(ε_p − ε_∅)         otherwise (warm-up: plain CFG)

    The momentum is updated on every step, warm-up included, so the safety push starts with the direction
    gathered so far. γ sits inside the CFG bracket and is therefore scaled by s_g as well.

    Shapes: ``eps_*`` and ``momentum`` (B, C, H, W); ``guidance_scale`` a float or a tensor broadcastable to it
    (one s_g per image, e.g. (B, 1, 1, 1)); ``step`` the 0-based index of the denoising step (0 = noisiest).
    """
    mu = sld_safety_scale(eps_prompt, eps_safety, sld_guidance_scale, sld_threshold)
    gamma = (eps_safety - eps_uncond) * mu + sld_momentum_scale * momentum
    next_momentum = sld_mom_beta * momentum + (1 - sld_mom_beta) * gamma
    direction = eps_prompt - eps_uncond
    if step >= sld_warmup_steps:
        direction = direction - gamma
    return eps_uncond + guidance_scale * direction, next_momentum


# --- settings ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SLDSettings:
    """One SLD configuration; the defaults are the Medium preset (the default of both official codes).

    Names are diffusers' ``StableDiffusionPipelineSafe`` arguments, so settings read the same in both.
    """

    safety_concept: str = SLD_SAFETY_CONCEPT  # c_S, the text steered away from
    sld_guidance_scale: float = 1000.0  # s_S
    sld_warmup_steps: int = 10  # δ
    sld_threshold: float = 0.01  # λ
    sld_momentum_scale: float = 0.3  # s_m
    sld_mom_beta: float = 0.4  # β_m

    def __post_init__(self) -> None:
        need(isinstance(self.safety_concept, str) and bool(self.safety_concept.strip()),
              "safety_concept", "SLD needs a non-empty safety concept text")
        need(finite(self.sld_guidance_scale) and self.sld_guidance_scale >= 0,
              "sld_guidance_scale", f"must be a number >= 0, got {self.sld_guidance_scale!r}")
        need(count(self.sld_warmup_steps), "sld_warmup_steps",
              f"must be an integer >= 0, got {self.sld_warmup_steps!r}")
        need(finite(self.sld_threshold), "sld_threshold", f"must be a number, got {self.sld_threshold!r}")
        need(finite(self.sld_momentum_scale) and self.sld_momentum_scale >= 0,
              "sld_momentum_scale", f"must be a number >= 0, got {self.sld_momentum_scale!r}")
        need(finite(self.sld_mom_beta) and 0 <= self.sld_mom_beta <= 1,
              "sld_mom_beta", f"must lie in [0, 1], got {self.sld_mom_beta!r}")


# Paper / AIML-TUDA model card values (docs/METHODS.md section 3.3).
SLD_PRESETS: dict[str, SLDSettings] = {
    # diffusers' SafetyConfig.WEAK ships sld_guidance_scale=20; the paper and model card say 200. With
    # μ = min(1, s_S|Δ|) that changes how soft the gate is, so "weak" here is not diffusers' WEAK.
    "weak": SLDSettings(sld_guidance_scale=200.0, sld_warmup_steps=15, sld_threshold=0.0,
                        sld_momentum_scale=0.0, sld_mom_beta=0.0),
    "medium": SLDSettings(sld_guidance_scale=1000.0, sld_warmup_steps=10, sld_threshold=0.01,
                          sld_momentum_scale=0.3, sld_mom_beta=0.4),
    "strong": SLDSettings(sld_guidance_scale=2000.0, sld_warmup_steps=7, sld_threshold=0.025,
                          sld_momentum_scale=0.5, sld_mom_beta=0.7),
    "max": SLDSettings(sld_guidance_scale=5000.0, sld_warmup_steps=0, sld_threshold=1.0,
                       sld_momentum_scale=0.5, sld_mom_beta=0.7),
}

SLD_KNOBS = tuple(f.name for f in dataclasses.fields(SLDSettings) if f.name != "safety_concept")


def sld_settings(
    preset: str = "medium",
    safety_concept: str = SLD_SAFETY_CONCEPT,
    overrides: Optional[Mapping[str, Any]] = None,
) -> SLDSettings:
    """The settings of SLD ``preset`` (``weak``, ``medium``, ``strong``, ``max``) for ``safety_concept``, with
    ``overrides`` (keys of ``SLD_KNOBS``) replacing preset values. Bad names or values raise ``UserError``.

    The presets are the paper's / model card's. Note that ``weak`` has s_S = 200 as published, whereas diffusers'
    ``SafetyConfig.WEAK`` ships 20; pass ``{"sld_guidance_scale": 20}`` to reproduce diffusers' WEAK.
    """
    if preset not in SLD_PRESETS:
        raise UserError(f"unknown SLD preset '{preset}', expected one of {list(SLD_PRESETS)}")
    base = SLD_PRESETS[preset]
    overrides = checked_overrides(overrides, SLD_KNOBS, f"sld-{preset}")
    values = {k: coerce(v, getattr(base, k)) for k, v in overrides.items()}
    try:
        return dataclasses.replace(base, safety_concept=safety_concept, **values)
    except UserError as err:
        raise UserError(f"sld-{preset}: {err}") from None


# --- the method (a Guidance for sdd.generation.generate) -------------------------------------------------------


class SLDGuidance:
    """SLD as an ``sdd.generation.Guidance``: one extra branch (the safety concept); the state is the momentum ν.

    ``SLDGuidance()`` is the Medium preset; ``SLDGuidance(sld_settings("max", "nudity"))`` any other.
    """

    def __init__(self, settings: Optional[SLDSettings] = None) -> None:
        self.settings = settings or SLDSettings()

    def extra_prompts(self) -> list[str]:
        return [self.settings.safety_concept]

    def init_state(self, eps_shape: torch.Size, device, dtype) -> torch.Tensor:
        return torch.zeros(eps_shape, device=device, dtype=dtype)

    def combine(
        self,
        eps_uncond: torch.Tensor,
        eps_prompt: torch.Tensor,
        eps_extra: list[torch.Tensor],
        guidance_scale: torch.Tensor,
        step: int,
        state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        return sld_guidance(
            eps_uncond, eps_prompt, eps_extra[0], state, step,
            guidance_scale=guidance_scale,
            sld_guidance_scale=s.sld_guidance_scale,
            sld_warmup_steps=s.sld_warmup_steps,
            sld_threshold=s.sld_threshold,
            sld_momentum_scale=s.sld_momentum_scale,
            sld_mom_beta=s.sld_mom_beta,
        )

    def describe(self) -> dict:
        """The exact settings, JSON-ready (written into image metadata)."""
        return dataclasses.asdict(self.settings)
