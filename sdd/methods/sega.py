"""SEGA: Semantic Guidance (Brack et al., NeurIPS 2023, arXiv 2301.12247), an inference-time method.

    ψ_e = ±s_e·(ε_e − ε_∅), kept where |ψ_e| ≥ its λ-quantile;  g_t = Σ_e w_e·ψ_e + s_m·ν_t
    ν_t+1 = β_m·ν_t + (1 − β_m)·g_t;  ε̄ = ε_∅ + s_g·(ε_p − ε_∅) + g_t   (after the warm-up)

One extra UNet branch per edit concept; the SDD paper's baseline is the concept as a *reverse* edit (steer away)
with edit scale 5. The math is ours and pure, checked against numbers worked out by hand and against diffusers'
``SemanticStableDiffusionPipeline`` (deprecated there). As for SLD, the equations apply at every scale (diffusers
switches SEGA off for s_g <= 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from sdd.errors import UserError
from sdd.methods.knobs import checked_overrides, coerce, count, finite, need
from sdd.methods.sld import SLD_SAFETY_CONCEPT

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
        need(isinstance(self.editing_prompt, str) and bool(self.editing_prompt.strip()),
              "editing_prompt", "SEGA needs a non-empty edit prompt")
        need(isinstance(self.reverse_editing_direction, bool), "reverse_editing_direction",
              f"must be true or false, got {self.reverse_editing_direction!r}")
        need(finite(self.edit_guidance_scale) and self.edit_guidance_scale >= 0, "edit_guidance_scale",
              f"must be a number >= 0 (use reverse_editing_direction to steer away), got {self.edit_guidance_scale!r}")
        need(count(self.edit_warmup_steps), "edit_warmup_steps",
              f"must be an integer >= 0, got {self.edit_warmup_steps!r}")
        need(self.edit_cooldown_steps is None or count(self.edit_cooldown_steps), "edit_cooldown_steps",
              f"must be null or an integer >= 0, got {self.edit_cooldown_steps!r}")
        need(finite(self.edit_threshold) and 0 <= self.edit_threshold <= 1, "edit_threshold",
              f"must lie in [0, 1] (a quantile), got {self.edit_threshold!r}")
        need(finite(self.edit_weight) and self.edit_weight >= 0, "edit_weight",
              f"must be a number >= 0, got {self.edit_weight!r}")


@dataclass(frozen=True)
class SEGASettings:
    """Edit concepts plus the momentum they share (diffusers' defaults)."""

    concepts: tuple[EditConcept, ...]
    edit_momentum_scale: float = 0.1  # s_m
    edit_mom_beta: float = 0.4  # β_m

    def __post_init__(self) -> None:
        need(len(self.concepts) > 0, "editing_prompt", "SEGA needs at least one edit concept")
        need(finite(self.edit_momentum_scale) and self.edit_momentum_scale >= 0, "edit_momentum_scale",
              f"must be a number >= 0, got {self.edit_momentum_scale!r}")
        need(finite(self.edit_mom_beta) and 0 <= self.edit_mom_beta <= 1, "edit_mom_beta",
              f"must lie in [0, 1], got {self.edit_mom_beta!r}")


SEGA_CONCEPT_KNOBS = tuple(f.name for f in dataclasses.fields(EditConcept) if f.name != "editing_prompt")
SEGA_KNOBS = SEGA_CONCEPT_KNOBS + ("edit_momentum_scale", "edit_mom_beta")


def sega_settings(
    editing_prompt: str = SLD_SAFETY_CONCEPT,
    overrides: Optional[Mapping[str, Any]] = None,
) -> SEGASettings:
    """The SDD paper's SEGA baseline: ``editing_prompt`` as one *reverse* edit concept with edit scale 5 and
    diffusers' other defaults (warm-up 10, threshold 0.9, momentum 0.1, β 0.4, no cooldown).

    ``overrides`` (keys of ``SEGA_KNOBS``) replace any of them. Bad names or values raise ``UserError``.
    """
    overrides = checked_overrides(overrides, SEGA_KNOBS, "sega")
    try:
        concept = EditConcept(editing_prompt=editing_prompt, reverse_editing_direction=True, edit_guidance_scale=5.0)
        settings = SEGASettings(concepts=(concept,))
        concept_values = {k: coerce(v, getattr(concept, k)) for k, v in overrides.items() if k in SEGA_CONCEPT_KNOBS}
        shared = {k: coerce(v, getattr(settings, k)) for k, v in overrides.items() if k not in SEGA_CONCEPT_KNOBS}
        concept = dataclasses.replace(concept, **concept_values)
        return dataclasses.replace(settings, concepts=(concept,), **shared)
    except UserError as err:
        raise UserError(f"sega: {err}") from None


# --- the method (a Guidance for sdd.generation.generate) -------------------------------------------------------


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
