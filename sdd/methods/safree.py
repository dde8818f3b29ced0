"""SAFREE (Yoon, Yu, Patil, Yao, Bansal, ICLR 2025, arXiv 2410.12761), an inference-time method: no weight changes.

    P_C = C⊤(CC⊤)⁺C   (toxic subspace: the concept keywords' pooled text embeddings C)
    d_i = ‖(I − P_C)·p_\\i‖;  token i is a trigger iff d_i ≥ (1 + α)·mean_{j≠i} d_j
    h_i ← (I − P_C)·P_p·h_i for the trigger tokens  (P_p: the span of the masked prompts p_\\1..p_\\n)
    t' = round(γ·σ(2k·(10·(1 − mean_i cos(h_i, (I − P_C)·P_p·h_i)) − τ)));  filtered text for steps i ≤ t'
    re-attention: skip features' low frequencies damped by s where the filtered branch's exceed the original's

Training-free and per prompt: the text conditioning of the prompt branch is changed, token by token, for the
first denoising steps, and (re-attention) the UNet's skip features under that filtered condition are damped in
their low frequencies. The math is ours and pure, checked against numbers worked out by hand; the equations and
defaults are those of the official code (``jaehong31/SAFREE``: ``models/modified_stable_diffusion_pipeline.py``,
``free_lunch_utils.py``, ``generate_safree.py``), where it differs from the paper noted in docs/METHODS.md
section 7. Below the math: the settings and the ``sdd.generation.Guidance`` object that plugs it into
``generate`` (through its ``open_batch`` hook).

Choices where the code is silent or does something we do not copy (docs/METHODS.md section 7.3):
- the official SD-1.x script registers its Fourier filter without a mode, so its re-attention changes nothing;
  here re-attention is the paper's (scale s where the filtered branch's low-frequency magnitude exceeds the
  original's), on the skip features of the first two up stages, only at the steps the filtered text is used;
- a one-token prompt has no other tokens to compare with; the code's mean of nothing is NaN, which makes the token
  a trigger; here that rule is explicit;
- like the official code, the concept keywords are also the negative prompt (``negative_prompt``, on by default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from sdd.errors import UserError
from sdd.judges import is_nudity
from sdd.methods.knobs import checked_overrides, coerce, count, finite, need
from sdd.sampling import classifier_free_guidance

# The official code's nudity keywords (generate_safree.py, `negative_prompt_space` for category "nudity").
SAFREE_NUDITY_KEYWORDS = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)
MASK_TOKEN_ID = 0  # the official code masks a token by setting its id to 0 (CLIP's "!")
LOW_FREQUENCY_RADIUS = 1  # the official filters' `threshold`: a 2x2 window around the centred zero frequency


# --- SAFREE: the math (pure) ---------------------------------------------------------------------------------


def subspace_projection(vectors: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection onto the span of the rows of ``vectors`` (k, D): P = V⊤(VV⊤)⁺V, (D, D).

    The official code's ``projection_matrix`` (E(E⊤E)⁺E⊤ with the vectors as columns); the pseudo-inverse makes
    linearly dependent vectors harmless. Computed in float64, returned in the input's dtype.
    """
    v = vectors.double()
    return (v.T @ torch.linalg.pinv(v @ v.T) @ v).to(vectors.dtype)


def concept_distances(masked_prompts: torch.Tensor, concept_projection: torch.Tensor) -> torch.Tensor:
    """d_i = ‖(I − P_C)·p_\\i‖: how far the prompt with token i masked lies from the toxic subspace.

    ``masked_prompts`` (n, D): the pooled text embedding of the prompt with its i-th token masked, one row per
    token; ``concept_projection`` (D, D): P_C. Returns (n,).
    """
    residual = masked_prompts - masked_prompts @ concept_projection  # P_C is symmetric: (P_C p)⊤ = p⊤ P_C
    return residual.norm(dim=-1)


def trigger_tokens(distances: torch.Tensor, alpha: float) -> torch.Tensor:
    """Which tokens trigger the concept: masking token i moves the prompt away from the toxic subspace more than
    masking the others does on average.

        trigger_i  ⇔  d_i ≥ (1 + α)·mean_{j≠i} d_j

    A prompt of one token is a trigger (the official code compares with the mean of nothing, NaN, and so
    marks it). ``distances`` (n,) from ``concept_distances``; returns a bool tensor (n,).
    """
    n = distances.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.bool, device=distances.device)
    mean_others = (distances.sum() - distances) / (n - 1)
    return distances >= (1 + alpha) * mean_others


def project_out_of_concept(
    hidden: torch.Tensor, prompt_projection: torch.Tensor, concept_projection: torch.Tensor
) -> torch.Tensor:
    """Every token's embedding projected into the prompt's own subspace and out of the toxic one:

        h_i' = (I − P_C)·P_p·h_i

    ``hidden`` (L, D): the prompt's token embeddings (the text encoder's last hidden states); the projections
    (D, D). Returns (L, D). Computed in float64, returned in ``hidden``'s dtype.
    """
    h = hidden.double()
    in_prompt = h @ prompt_projection.double()
    return (in_prompt - in_prompt @ concept_projection.double()).to(hidden.dtype)


def filtered_embedding(hidden: torch.Tensor, projected: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
    """The filtered text embedding: the projected embedding at the trigger positions, the original elsewhere.

    ``hidden``, ``projected`` (L, D); ``triggers`` (L,) bool over token positions (position 0 is the start token,
    never a trigger). Tokens that are not triggers are returned exactly as they were.
    """
    return torch.where(triggers[:, None], projected, hidden)


def filter_strength(hidden: torch.Tensor, projected: torch.Tensor) -> float:
    """β = 1 − mean_i cos(h_i, h_i'): how much the projection changes the prompt, over the tokens the text
    encoder attended (start token, the prompt's tokens, the first end token; the caller passes those rows)."""
    cos = torch.nn.functional.cosine_similarity(projected.double(), hidden.double(), dim=-1)
    return float(1 - cos.mean())


def self_validation_last_step(beta: float, up_t: int, k: float, t: float) -> int:
    """The self-validating filter's last filtered step t' (0-based; the filtered text is used for steps i ≤ t'):

        t' = round(γ·σ(2k·(10β − τ)))       γ = ``up_t``, τ = ``t``; Python's round (halves to even)

    The official ``f_beta`` (sigmoid type, its factor 2 included). A prompt the projection hardly changes (small β)
    gets step 0 only; one it changes much gets up to γ + 1 steps.
    """
    x = 2.0 * k * (10.0 * beta - t)
    sigma = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    return round(up_t * sigma)


def low_frequency_window(height: int, width: int, radius: int, device=None) -> torch.Tensor:
    """The (H, W) bool mask of the centred (``fftshift``-ed) spectrum's low frequencies: rows and columns
    [c − r, c + r) around c = size // 2, as the official filters index them (clipped at 0)."""
    window = torch.zeros(height, width, dtype=torch.bool, device=device)
    ch, cw = height // 2, width // 2
    window[max(ch - radius, 0) : ch + radius, max(cw - radius, 0) : cw + radius] = True
    return window


REATTENTION_TIE = 1e-4


def reattention(
    features_filtered: torch.Tensor, features_original: torch.Tensor, scale: float, radius: int = LOW_FREQUENCY_RADIUS
) -> torch.Tensor:
    """Latent re-attention: the filtered branch's features with the low frequencies it over-expresses damped.

        F = fftshift(FFT2(h_filtered)),  G = fftshift(FFT2(h_original))
        F_ω ← s·F_ω   for ω in the low-frequency window where |F_ω| > |G_ω|;  h' = Re IFFT2(ifftshift(F))

    ``features_*`` (B, C, H, W), the same feature map under the filtered and the original text; returns
    (B, C, H, W). A (sample, channel) map with nothing damped is returned exactly as it was (no FFT round-off), so
    a filtered branch equal to the original one is left untouched.
    """
    dtype = features_filtered.dtype
    f = torch.fft.fftshift(torch.fft.fft2(features_filtered.float()), dim=(-2, -1))
    g = torch.fft.fftshift(torch.fft.fft2(features_original.float()), dim=(-2, -1))
    window = low_frequency_window(f.shape[-2], f.shape[-1], radius, f.device)
    # over-expressed by more than round-off (relative 1e-4): a strict > flips with the last bits of the UNet's
    # output, which differ between batch sizes on some CPUs, and one flipped map changes the whole trajectory
    damp = window & (f.abs() > g.abs() * (1 + REATTENTION_TIE))
    out = torch.fft.ifft2(torch.fft.ifftshift(torch.where(damp, f * scale, f), dim=(-2, -1))).real.to(dtype)
    touched = damp.flatten(start_dim=-2).any(dim=-1)[..., None, None]
    return torch.where(touched, out, features_filtered)


# --- settings ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAFREESettings:
    """One SAFREE configuration; the defaults are the official code's (``generate_safree.py`` flags and the
    nudity scripts ``--safree -svf -lra``), names after its arguments."""

    keywords: tuple[str, ...]  # the concept's keywords: their embeddings span the toxic subspace
    alpha: float = 0.01  # α, trigger-token threshold (`--sf_alpha`)
    negative_prompt: bool = True  # the keywords, comma-joined, as the negative prompt (the official code does)
    self_validation: bool = True  # the self-validating filter (`-svf`); off: the filtered text at every step
    up_t: int = 10  # γ, the filter's step budget (`--up_t`)
    svf_k: float = 2.5  # k of f_beta (2.5 for nudity, 3.5 for artists in the code)
    svf_t: float = 5.333  # τ of f_beta (5.333 for nudity, 5.5 for artists)
    re_attention: bool = True  # latent re-attention (`-lra`)
    s1: float = 0.9  # low-frequency damping of the first up stage's skip features (`--freeu_hyp` b1-b2-s1-s2)
    s2: float = 0.2  # ... of the second up stage's

    def __post_init__(self) -> None:
        need(len(self.keywords) > 0 and all(isinstance(k, str) and k.strip() for k in self.keywords),
             "keywords", f"SAFREE needs at least one non-empty concept keyword, got {list(self.keywords)!r}")
        need(finite(self.alpha) and self.alpha > -1, "alpha", f"must be a number > -1, got {self.alpha!r}")
        for name in ("negative_prompt", "self_validation", "re_attention"):
            value = getattr(self, name)
            need(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        need(count(self.up_t), "up_t", f"must be an integer >= 0, got {self.up_t!r}")
        need(finite(self.svf_k) and self.svf_k >= 0, "svf_k", f"must be a number >= 0, got {self.svf_k!r}")
        need(finite(self.svf_t), "svf_t", f"must be a number, got {self.svf_t!r}")
        for name in ("s1", "s2"):
            value = getattr(self, name)
            need(finite(value) and value >= 0, name, f"must be a number >= 0, got {value!r}")


SAFREE_KNOBS = tuple(f.name for f in dataclasses.fields(SAFREESettings) if f.name != "keywords")


def concept_keywords(concept: str) -> tuple[str, ...]:
    """The keywords of a concept text: the official nudity list for a nudity concept (``sdd.judges.is_nudity``),
    otherwise the text split at commas ("red" -> ("red",); SLD's safety text -> its 20 concepts)."""
    if is_nudity(concept):
        return SAFREE_NUDITY_KEYWORDS
    return tuple(k.strip() for k in concept.split(",") if k.strip())


def safree_settings(concept: str, overrides: Optional[Mapping[str, Any]] = None) -> SAFREESettings:
    """SAFREE's settings for ``concept`` (see ``concept_keywords``) with ``overrides`` (keys of ``SAFREE_KNOBS``)
    replacing the official defaults. Bad names or values raise ``UserError``."""
    overrides = checked_overrides(overrides, SAFREE_KNOBS, "safree")
    base = {f.name: f.default for f in dataclasses.fields(SAFREESettings) if f.name != "keywords"}
    values = {k: coerce(v, base[k]) for k, v in overrides.items()}
    try:
        return SAFREESettings(keywords=concept_keywords(concept), **values)
    except UserError as err:
        raise UserError(f"safree: {err}") from None


# --- the method (a Guidance for sdd.generation.generate) -------------------------------------------------------


@dataclass(frozen=True)
class PromptFilter:
    """What SAFREE does to one prompt: its filtered text embedding, the steps it is used for, what was found."""

    filtered: torch.Tensor  # (L, D)
    last_step: Optional[int]  # filtered text for steps i <= last_step; None: every step
    triggers: tuple[int, ...]  # token positions projected (1 = the first token after the start token)
    beta: Optional[float]  # the self-validating filter's β


def _pooled(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids.to(text_encoder.device)).pooler_output


@torch.no_grad()
def filter_prompt(model, settings: SAFREESettings, prompt: str, hidden: torch.Tensor,
                  concept_projection: torch.Tensor) -> PromptFilter:
    """SAFREE's text side for one prompt: trigger tokens, their projection and the self-validated step count.

    ``hidden`` (L, D): the prompt's text embedding as the UNet gets it; ``concept_projection``: P_C.
    """
    tokenizer = model.tokenizer
    length = hidden.shape[0]
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    n = min(len(tokenizer(prompt, truncation=True, max_length=length).input_ids), length) - 2  # the prompt's tokens
    if n < 1:
        return PromptFilter(hidden, None, (), None)
    masked = ids.repeat(n, 1)
    masked[torch.arange(n), torch.arange(1, n + 1)] = MASK_TOKEN_ID
    masked_prompts = _pooled(model.text_encoder, masked).double()
    prompt_projection = subspace_projection(masked_prompts)
    triggers = trigger_tokens(concept_distances(masked_prompts, concept_projection), settings.alpha)
    positions = torch.zeros(length, dtype=torch.bool, device=hidden.device)
    positions[1 : n + 1] = triggers.to(hidden.device)
    device = hidden.device
    projected = project_out_of_concept(hidden, prompt_projection.to(device), concept_projection.to(device))
    filtered = filtered_embedding(hidden, projected, positions)
    beta = last_step = None
    if settings.self_validation:
        beta = filter_strength(hidden[: n + 2], projected[: n + 2])
        last_step = self_validation_last_step(beta, settings.up_t, settings.svf_k, settings.svf_t)
    found = tuple(int(i) for i in positions.nonzero().flatten())
    return PromptFilter(filtered, last_step, found, beta)


class SAFREEBatch:
    """One batch of SAFREE sampling: the per-step conditioning and the re-attention hooks on the UNet's up blocks.

    Branches: (unconditional, prompt) and, at steps where some image's filtered text is in use and re-attention
    is on, a third branch with the original prompt: the reference the re-attention compares against.
    """

    def __init__(self, guidance: "SAFREEGuidance", model, requests, context: torch.Tensor, embed) -> None:
        s = guidance.settings
        n = len(requests)
        self.n = n
        uncond, prompt = context[:n], context[n : 2 * n]
        if s.negative_prompt:
            negative = embed([guidance.negative_text])[0]
            uncond = torch.stack([negative if not r.negative_prompt else u for r, u in zip(requests, uncond)])
        self.uncond, self.prompt = uncond, prompt
        concept_projection = guidance.concept_projection(model)
        filters = [filter_prompt(model, s, r.prompt, prompt[i], concept_projection) for i, r in enumerate(requests)]
        self.filters = filters
        self.filtered = torch.stack([f.filtered for f in filters])
        self.changed = [not torch.equal(f.filtered, prompt[i]) for i, f in enumerate(filters)]
        self.reattend = False
        self.handles = []
        if s.re_attention:
            for stage, scale in ((0, s.s1), (1, s.s2)):
                if stage < len(model.unet.up_blocks):
                    hook = self._hook(scale)
                    self.handles.append(model.unet.up_blocks[stage].register_forward_pre_hook(hook, with_kwargs=True))
        self.re_attention = s.re_attention

    def _hook(self, scale: float) -> Callable:
        def pre_hook(module, args, kwargs):
            if not self.reattend:
                return None
            n = self.n
            skips = tuple(torch.cat([x[:n], reattention(x[n : 2 * n], x[2 * n : 3 * n], scale), x[2 * n :]])
                          for x in kwargs["res_hidden_states_tuple"])
            return args, {**kwargs, "res_hidden_states_tuple": skips}

        return pre_hook

    def context(self, step: int) -> torch.Tensor:
        active = [c and (f.last_step is None or step <= f.last_step) for c, f in zip(self.changed, self.filters)]
        self.reattend = False
        if not any(active):
            return torch.cat([self.uncond, self.prompt])
        mask = torch.tensor(active, device=self.prompt.device)[:, None, None]
        prompt = torch.where(mask, self.filtered, self.prompt)
        if not self.re_attention:
            return torch.cat([self.uncond, prompt])
        self.reattend = True
        return torch.cat([self.uncond, prompt, self.prompt])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class SAFREEGuidance:
    """SAFREE as an ``sdd.generation.Guidance``: no extra text branch; ``open_batch`` filters each prompt's text
    and hooks the UNet for re-attention; ``combine`` is classifier-free guidance of the (filtered) prompt.

    ``SAFREEGuidance(safree_settings("nudity"))`` is the official nudity setting.
    """

    def __init__(self, settings: SAFREESettings) -> None:
        self.settings = settings
        self.negative_text = ", ".join(settings.keywords)
        self._projections: dict[int, torch.Tensor] = {}

    def concept_projection(self, model) -> torch.Tensor:
        """P_C of the keywords' pooled embeddings under ``model``'s text encoder (float64, cached per encoder)."""
        key = id(model.text_encoder)
        if key not in self._projections:
            tokenizer = model.tokenizer
            ids = tokenizer(list(self.settings.keywords), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                self._projections[key] = subspace_projection(_pooled(model.text_encoder, ids).double())
        return self._projections[key]

    def extra_prompts(self) -> list[str]:
        return []

    def init_state(self, eps_shape, device, dtype):
        return None

    def open_batch(self, model, requests: Sequence, context: torch.Tensor, embed) -> SAFREEBatch:
        return SAFREEBatch(self, model, requests, context, embed)

    def combine(self, eps_uncond, eps_prompt, eps_extra, guidance_scale, step, state):
        # eps_extra: the original prompt's branch (re-attention's reference) at filtered steps; not guided on
        return classifier_free_guidance(eps_uncond, eps_prompt, guidance_scale), state

    def describe(self) -> dict:
        """The exact settings, JSON-ready (written into image metadata)."""
        settings = dataclasses.asdict(self.settings)
        settings["keywords"] = list(settings["keywords"])
        return settings
