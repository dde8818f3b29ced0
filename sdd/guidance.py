"""Inference-time safety guidance: SLD (Schramowski et al., CVPR 2023) and SEGA (Brack et al., arXiv 2301.12247).

Neither method changes a weight: each adds UNet branches for concept texts and bends the classifier-free-guidance
estimate away from them (SEGA: or toward them) at every denoising step. The math is ours and pure (tensors in,
tensors out), checked against numbers worked out by hand and against diffusers' ``StableDiffusionPipelineSafe`` and
``SemanticStableDiffusionPipeline`` (both deprecated there, hence owned here). Below it: the settings (presets,
validation) and the two ``sdd.generation.Guidance`` objects that plug the math into ``generate``, which runs all
of a step's branches in one batched UNet pass.

Where the paper and the official codes differ we follow the codes (docs/METHODS.md section 3.4): SLD's element
scale is min(1, s_S|Δ|), the threshold is compared to the signed Δ, and the safety term sits inside the CFG
bracket. One deliberate difference from both codes: they switch SLD off below a scale (the original for s_S < 1,
diffusers for s_S <= 1 or s_g <= 1, and diffusers' SEGA for s_g <= 1); here the equations apply for every value,
so s_S = 0 is exactly classifier-free guidance and small scales stay continuous rather than jumping to CFG.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from sdd.errors import UserError

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


# --- SEGA: the math (pure) -----------------------------------------------------------------------------------


def sega_edit_guidance(
    eps_uncond: torch.Tensor,
    eps_edit: torch.Tensor,
    edit_guidance_scale: float,
    edit_threshold: float,
    reverse_editing_direction: bool,
) -> torch.Tensor:
    """SEGA's guidance term ψ for one edit concept e (paper Eq. 4-6, as diffusers computes it).

        ψ = s_e·(ε_e − ε_∅)          (−s_e·(ε_e − ε_∅) for a reverse edit: steer away from e)
        ψ ← ψ where |ψ| ≥ q_λ(|ψ|), else 0

    q_λ is the λ-quantile (``torch.quantile``, linear interpolation) of |ψ| over the spatial elements of each
    (image, channel) separately, so λ = 0.9 keeps the largest 10 % of each latent channel: the edit touches only
    the dimensions where the concept differs most from the unconditional estimate. Shapes: (B, C, H, W) in,
    (B, C, H, W) out.
    """
    psi = eps_edit - eps_uncond
    if reverse_editing_direction:
        psi = psi * -1
    psi = psi * edit_guidance_scale
    # torch.quantile takes float32/64 only (fp16/bf16 models)
    cutoff = torch.quantile(psi.abs().flatten(start_dim=2).float(), edit_threshold, dim=2).to(psi.dtype)
    return torch.where(psi.abs() >= cutoff[:, :, None, None], psi, torch.zeros_like(psi))


def sega_guidance(
    eps_uncond: torch.Tensor,
    eps_prompt: torch.Tensor,
    eps_edits: Sequence[torch.Tensor],
    momentum: torch.Tensor,
    step: int,
    *,
    guidance_scale: float | torch.Tensor,
    edit_guidance_scale: Sequence[float],
    edit_threshold: Sequence[float],
    reverse_editing_direction: Sequence[bool],
    edit_warmup_steps: Sequence[int],
    edit_cooldown_steps: Sequence[Optional[int]],
    edit_weights: Sequence[float],
    edit_momentum_scale: float,
    edit_mom_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SEGA step over edit concepts e = 1..E: the guided noise estimate and the next momentum.

        ψ_e   = ``sega_edit_guidance`` of concept e, or 0 once step ≥ its cooldown
        w_e   = max(0, weight_e), or 0 once step ≥ its cooldown
        g_t   = Σ_e w_e·ψ_e + s_m·ν_t
        ν_t+1 = β_m·ν_t + (1 − β_m)·g_t                       (ν_0 = 0, updated on every step)
        ε̄     = ε_∅ + s_g·(ε_p − ε_∅) + g_t                   once every concept is past its warm-up
        ε̄     = ε_∅ + s_g·(ε_p − ε_∅)                         while none is

    Unlike SLD the edit term sits outside the CFG bracket (not scaled by s_g). With several concepts and only some
    past their warm-up, diffusers adds Σ_{e warm} w_e·ψ_e / Σ_{e warm} w_e (no momentum) for those; so do we,
    except that a zero weight sum adds nothing (diffusers divides 0 by 0 and returns NaN).

    Shapes: ``eps_*`` and ``momentum`` (B, C, H, W); per-concept settings are sequences of length E;
    ``guidance_scale`` a float or a tensor broadcastable to (B, C, H, W).
    """
    direction = guidance_scale * (eps_prompt - eps_uncond)
    psis, weights, warm = [], [], []
    for e, eps_edit in enumerate(eps_edits):
        warm.append(step >= edit_warmup_steps[e])
        cooldown = edit_cooldown_steps[e]
        if cooldown is not None and step >= cooldown:
            psis.append(torch.zeros_like(eps_edit))
            weights.append(0.0)
            continue
        psis.append(sega_edit_guidance(eps_uncond, eps_edit, edit_guidance_scale[e], edit_threshold[e],
                                       reverse_editing_direction[e]))
        weights.append(max(0.0, float(edit_weights[e])))
    n_warm = sum(warm)
    if 0 < n_warm < len(psis):
        total = sum(w for w, is_warm in zip(weights, warm) if is_warm)
        if total > 0:
            direction = direction + sum(w / total * psi for w, psi, is_warm in zip(weights, psis, warm) if is_warm)
    edit = sum(w * psi for w, psi in zip(weights, psis)) + edit_momentum_scale * momentum
    next_momentum = edit_mom_beta * momentum + (1 - edit_mom_beta) * edit
    if psis and n_warm == len(psis):
        direction = direction + edit
    return eps_uncond + direction, next_momentum


# --- settings ------------------------------------------------------------------------------------------------


def _need(ok: bool, what: str, message: str) -> None:
    if not ok:
        raise UserError(f"{what}: {message}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
        _need(isinstance(self.safety_concept, str) and bool(self.safety_concept.strip()),
              "safety_concept", "SLD needs a non-empty safety concept text")
        _need(_finite(self.sld_guidance_scale) and self.sld_guidance_scale >= 0,
              "sld_guidance_scale", f"must be a number >= 0, got {self.sld_guidance_scale!r}")
        _need(_count(self.sld_warmup_steps), "sld_warmup_steps",
              f"must be an integer >= 0, got {self.sld_warmup_steps!r}")
        _need(_finite(self.sld_threshold), "sld_threshold", f"must be a number, got {self.sld_threshold!r}")
        _need(_finite(self.sld_momentum_scale) and self.sld_momentum_scale >= 0,
              "sld_momentum_scale", f"must be a number >= 0, got {self.sld_momentum_scale!r}")
        _need(_finite(self.sld_mom_beta) and 0 <= self.sld_mom_beta <= 1,
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


@dataclass(frozen=True)
class EditConcept:
    """One SEGA edit concept. Defaults are diffusers' ``SemanticStableDiffusionPipeline`` defaults (and its
    argument names); ``edit_cooldown_steps=None`` means no cooldown."""

    editing_prompt: str
    reverse_editing_direction: bool = False
    edit_guidance_scale: float = 5.0  # s_e
    edit_warmup_steps: int = 10  # δ: steps before the edit acts
    edit_cooldown_steps: Optional[int] = None  # steps after which the edit stops acting
    edit_threshold: float = 0.9  # λ: quantile of |ψ| below which ψ is dropped
    edit_weight: float = 1.0  # weight among several concepts

    def __post_init__(self) -> None:
        _need(isinstance(self.editing_prompt, str) and bool(self.editing_prompt.strip()),
              "editing_prompt", "SEGA needs a non-empty edit prompt")
        _need(isinstance(self.reverse_editing_direction, bool), "reverse_editing_direction",
              f"must be true or false, got {self.reverse_editing_direction!r}")
        _need(_finite(self.edit_guidance_scale) and self.edit_guidance_scale >= 0, "edit_guidance_scale",
              f"must be a number >= 0 (use reverse_editing_direction to steer away), got {self.edit_guidance_scale!r}")
        _need(_count(self.edit_warmup_steps), "edit_warmup_steps",
              f"must be an integer >= 0, got {self.edit_warmup_steps!r}")
        _need(self.edit_cooldown_steps is None or _count(self.edit_cooldown_steps), "edit_cooldown_steps",
              f"must be null or an integer >= 0, got {self.edit_cooldown_steps!r}")
        _need(_finite(self.edit_threshold) and 0 <= self.edit_threshold <= 1, "edit_threshold",
              f"must lie in [0, 1] (a quantile), got {self.edit_threshold!r}")
        _need(_finite(self.edit_weight) and self.edit_weight >= 0, "edit_weight",
              f"must be a number >= 0, got {self.edit_weight!r}")


@dataclass(frozen=True)
class SEGASettings:
    """Edit concepts plus the momentum they share (diffusers' defaults)."""

    concepts: tuple[EditConcept, ...]
    edit_momentum_scale: float = 0.1  # s_m
    edit_mom_beta: float = 0.4  # β_m

    def __post_init__(self) -> None:
        _need(len(self.concepts) > 0, "editing_prompt", "SEGA needs at least one edit concept")
        _need(_finite(self.edit_momentum_scale) and self.edit_momentum_scale >= 0, "edit_momentum_scale",
              f"must be a number >= 0, got {self.edit_momentum_scale!r}")
        _need(_finite(self.edit_mom_beta) and 0 <= self.edit_mom_beta <= 1, "edit_mom_beta",
              f"must lie in [0, 1], got {self.edit_mom_beta!r}")


SEGA_CONCEPT_KNOBS = tuple(f.name for f in dataclasses.fields(EditConcept) if f.name != "editing_prompt")
SEGA_KNOBS = SEGA_CONCEPT_KNOBS + ("edit_momentum_scale", "edit_mom_beta")


def _coerce(value: Any, like: Any) -> Any:
    """An override value in the type of the field it replaces; a whole float is accepted for an integer
    (YAML and JSON writers produce 10.0), anything else of the wrong kind is left for validation to name."""
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(like, int) and not isinstance(like, bool) and isinstance(value, float) and value.is_integer():
        return int(value)
    if like is None and isinstance(value, float) and value.is_integer():  # optional integers (cooldown)
        return int(value)
    return value


def _checked_overrides(overrides: Optional[Mapping[str, Any]], allowed: Sequence[str], what: str) -> dict:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise UserError(f"{what}: unknown setting '{unknown[0]}', expected one of {list(allowed)}")
    return overrides


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
    overrides = _checked_overrides(overrides, SLD_KNOBS, f"sld-{preset}")
    values = {k: _coerce(v, getattr(base, k)) for k, v in overrides.items()}
    try:
        return dataclasses.replace(base, safety_concept=safety_concept, **values)
    except UserError as err:
        raise UserError(f"sld-{preset}: {err}") from None


def sega_settings(
    editing_prompt: str = SLD_SAFETY_CONCEPT,
    overrides: Optional[Mapping[str, Any]] = None,
) -> SEGASettings:
    """The SDD paper's SEGA baseline: ``editing_prompt`` as one *reverse* edit concept with edit scale 5 and
    diffusers' other defaults (warm-up 10, threshold 0.9, momentum 0.1, β 0.4, no cooldown).

    ``overrides`` (keys of ``SEGA_KNOBS``) replace any of them. Bad names or values raise ``UserError``.
    """
    overrides = _checked_overrides(overrides, SEGA_KNOBS, "sega")
    try:
        concept = EditConcept(editing_prompt=editing_prompt, reverse_editing_direction=True, edit_guidance_scale=5.0)
        settings = SEGASettings(concepts=(concept,))
        concept_values = {k: _coerce(v, getattr(concept, k)) for k, v in overrides.items() if k in SEGA_CONCEPT_KNOBS}
        shared = {k: _coerce(v, getattr(settings, k)) for k, v in overrides.items() if k not in SEGA_CONCEPT_KNOBS}
        concept = dataclasses.replace(concept, **concept_values)
        return dataclasses.replace(settings, concepts=(concept,), **shared)
    except UserError as err:
        raise UserError(f"sega: {err}") from None


# --- the Guidance objects (plumbing for sdd.generation.generate) ---------------------------------------------


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


class SEGAGuidance:
    """SEGA as an ``sdd.generation.Guidance``: one extra branch per edit concept; the state is the momentum ν.

    ``SEGAGuidance()`` is the SDD paper's baseline (the SLD safety text as a reverse edit, scale 5).
    """

    def __init__(self, settings: Optional[SEGASettings] = None) -> None:
        self.settings = settings or sega_settings()

    def extra_prompts(self) -> list[str]:
        return [c.editing_prompt for c in self.settings.concepts]

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
        concepts = self.settings.concepts
        return sega_guidance(
            eps_uncond, eps_prompt, eps_extra, state, step,
            guidance_scale=guidance_scale,
            edit_guidance_scale=[c.edit_guidance_scale for c in concepts],
            edit_threshold=[c.edit_threshold for c in concepts],
            reverse_editing_direction=[c.reverse_editing_direction for c in concepts],
            edit_warmup_steps=[c.edit_warmup_steps for c in concepts],
            edit_cooldown_steps=[c.edit_cooldown_steps for c in concepts],
            edit_weights=[c.edit_weight for c in concepts],
            edit_momentum_scale=self.settings.edit_momentum_scale,
            edit_mom_beta=self.settings.edit_mom_beta,
        )

    def describe(self) -> dict:
        """The exact settings, JSON-ready (written into image metadata)."""
        settings = dataclasses.asdict(self.settings)
        settings["concepts"] = list(settings["concepts"])  # asdict keeps the tuple; JSON writers want a list
        return settings
