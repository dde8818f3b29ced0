"""Image generation shared by every method and baseline.

Each request carries its own seed; its initial latent is drawn from a CPU generator seeded with it, so the same
row gives the same noise for every model and every guidance rule (and matches diffusers' pipeline called with
``generator=torch.Generator().manual_seed(seed)`` for one image). The guidance rule is a small object: plain
classifier-free guidance here; SLD and others plug in the same way, and all of a step's UNet branches run in
one batched forward pass. The branches are the model family's denoiser outputs (epsilon, or v for a v-prediction
model); a guidance combines epsilon (SLD's and SEGA's thresholds are in epsilon), so a v model's outputs are
converted to epsilon and back around ``combine``, except for a guidance that declares ``affine = True`` (plain
CFG: weights summing to one commute with the conversion, so it combines v as diffusers' pipelines do). A flow
model (SD3, FLUX) runs only affine guidance: at its first step (sigma = 1) epsilon is the latent itself and carries no
prediction, so SLD, SEGA and SAFREE refuse it in one line. A guidance-distilled model (FLUX.1-dev) has no
unconditional branch: a step is one forward on the prompt with the request's ``guidance_scale`` as the model's
guidance input, as ``FluxPipeline`` samples it (a negative prompt, which would need true CFG, is refused). A
guidance that changes the text conditioning from step to step or hooks into the UNet (SAFREE) adds one optional
method, ``open_batch``; the others need nothing of it.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from sdd.errors import UserError
from sdd.models import SDComponents
from sdd.sampling import classifier_free_guidance


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    guidance_scale: float = 7.5
    height: Optional[int] = None
    width: Optional[int] = None
    negative_prompt: str = ""  # text of the unconditional branch ("" = plain CFG)


class Guidance(Protocol):
    """How the branch predictions of one denoising step combine into one noise estimate."""

    def extra_prompts(self) -> list[str]:
        """Texts of branches beyond (unconditional, prompt), e.g. SLD's safety concept."""
        ...

    def init_state(self, eps_shape: torch.Size, device, dtype) -> Any: ...

    def combine(
        self,
        eps_uncond: torch.Tensor,
        eps_prompt: torch.Tensor,
        eps_extra: list[torch.Tensor],
        guidance_scale: torch.Tensor,
        step: int,
        state: Any,
    ) -> tuple[torch.Tensor, Any]: ...


class GuidanceBatch(Protocol):
    """What an optional ``open_batch(model, requests, context, embed)`` of a guidance returns for one batch.

    ``context`` holds the branches' text conditioning, (B·n, L, D) for B branches of n images: (unconditional,
    prompt, extra prompts...). ``embed(texts)`` encodes texts as ``generate`` does (cached). The guidance may
    install forward hooks on the UNet when it opens a batch; ``close`` removes them (always called).
    """

    def context(self, step: int) -> torch.Tensor:
        """The conditioning of denoising step ``step``: the batch's context or a replacement, (B'·n, L, D). Rows
        beyond the batch's branches are further branches whose predictions reach ``combine`` after the extras."""
        ...

    def close(self) -> None: ...


class CFGGuidance:
    """Plain classifier-free guidance (with a negative prompt when the request has one)."""

    affine = True  # uncond + s (cond - uncond): the same in epsilon and in v

    def extra_prompts(self) -> list[str]:
        return []

    def init_state(self, eps_shape, device, dtype):
        return None

    def combine(self, eps_uncond, eps_prompt, eps_extra, guidance_scale, step, state):
        return classifier_free_guidance(eps_uncond, eps_prompt, guidance_scale), state


def initial_latent(seed: int, shape: Sequence[int], init_noise_sigma: float = 1.0) -> torch.Tensor:
    """The (1, C, H, W) starting noise of one image: a pure function of its seed."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator) * init_noise_sigma


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.float().clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in arr]


def _batches(requests: Sequence[Request], batch_size: int):
    """Consecutive runs of requests that can share a forward pass (same size), at most batch_size long."""
    index = 0
    for _, group in itertools.groupby(requests, key=lambda r: (r.height, r.width)):
        group = list(group)
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            yield index, chunk
            index += len(chunk)


@torch.no_grad()
def generate(
    model: SDComponents,
    requests: Sequence[Request],
    *,
    num_inference_steps: int = 25,
    guidance: Guidance | None = None,
    batch_size: int = 4,
    output_type: str = "pil",
    progress: bool = False,
    desc: str = "generating",
    on_batch=None,
) -> list:
    """Generate one image per request. ``output_type``: ``'pil'``, ``'pt'`` (images in [-1, 1]) or ``'latent'``.

    ``on_batch(first_index, images)`` is called after each batch (used to write images as they come).
    """
    guidance = guidance or CFGGuidance()
    unet, vae = model.unet, model.vae
    family = model.family
    prediction = model.prediction
    convert = prediction.kind != "epsilon" and not getattr(guidance, "affine", False)
    if convert and prediction.kind == "flow":
        raise UserError(f"generation: {type(guidance).__name__} combines the branches in epsilon, and {model.source} "
                        f"is a flow-matching model ({family.name.upper()}), whose prediction cannot be recovered from "
                        "epsilon at sigma = 1; only plain classifier-free guidance (methods sd, neg) runs on it")
    distilled = family.guidance_distilled  # FLUX: one forward on the prompt, guidance_scale embedded
    if distilled and (guidance.extra_prompts() or any(r.negative_prompt for r in requests)):
        raise UserError(f"generation: {model.source} is a guidance-distilled {family.name.upper()} model, sampled "
                        "with one forward per step on the prompt and no unconditional branch, so a negative prompt "
                        "or a further branch (method neg) would need true CFG, which is not run here (method sd "
                        "runs)")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    extra = guidance.extra_prompts()
    text_cache: dict[str, torch.Tensor] = {}

    def embed(texts: Sequence[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in text_cache})
        if missing:
            for text, e in zip(missing, family.encode(model, missing, device)):
                text_cache[text] = e
        return torch.stack([text_cache[t] for t in texts]).to(dtype)

    outputs: list = []
    batches = list(_batches(requests, batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=desc, unit="img")
    for first, chunk in batches:
        n = len(chunk)
        height = chunk[0].height or model.default_resolution
        width = chunk[0].width or model.default_resolution
        f = model.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        scheduler = model.scheduler.__class__.from_config(model.scheduler.config)  # fresh state per batch
        shape = (model.latent_channels, height // f, width // f)
        family.set_timesteps(scheduler, num_inference_steps, shape, device)
        sigma_max = getattr(scheduler, "init_noise_sigma", 1.0)  # a flow-matching scheduler starts at 1
        latents = torch.cat([initial_latent(r.seed, shape, sigma_max) for r in chunk])
        latents = latents.to(device=device, dtype=dtype)
        branches = [] if distilled else [embed([r.negative_prompt for r in chunk])]
        branches += [embed([r.prompt for r in chunk])] + [embed([text] * n) for text in extra]
        context = torch.cat(branches)
        scale = torch.tensor([r.guidance_scale for r in chunk], device=device, dtype=dtype).view(n, 1, 1, 1)
        state = guidance.init_state(latents.shape, device, dtype)
        open_batch = getattr(guidance, "open_batch", None)
        batch = open_batch(model, chunk, context, embed) if open_batch is not None else None
        try:
            for step, t in enumerate(scheduler.timesteps):
                step_context = context if batch is None else batch.context(step)
                scale_input = getattr(scheduler, "scale_model_input", None)  # flow matching: none
                model_in = latents if scale_input is None else scale_input(latents, t)
                if distilled:  # the prompt's prediction at its guidance value is the step's
                    eps_hat = family.denoise(unet, model_in, t, step_context, guidance=scale.flatten())
                else:
                    out = family.denoise(unet, model_in.repeat(step_context.shape[0] // n, 1, 1, 1), t, step_context)
                    parts = list(out.split(n))
                    if convert:  # v -> epsilon, combined, -> v for the model's own scheduler
                        parts = [prediction.to_epsilon(p, model_in, t) for p in parts]
                    eps_hat, state = guidance.combine(parts[0], parts[1], parts[2:], scale, step, state)
                    if convert:
                        eps_hat = prediction.from_epsilon(eps_hat, model_in, t)
                latents = scheduler.step(eps_hat, t, latents).prev_sample
        finally:
            if batch is not None:
                batch.close()
        if output_type == "latent":
            result = list(latents)
        else:
            shift = vae.config.get("shift_factor") or 0.0  # SD3's, FLUX's VAE: latents = (x - shift) * scale
            images = vae.decode(latents / vae.config.scaling_factor + shift).sample
            result = to_pil(images) if output_type == "pil" else list(images.float().cpu())
        outputs.extend(result)
        if on_batch is not None:
            on_batch(first, result)
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return outputs


def image_grid(images: Sequence[Image.Image], rows: int, cols: int) -> Image.Image:
    if not images:
        raise ValueError("no images for the grid")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images[: rows * cols]):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def with_unet(model: SDComponents, unet) -> SDComponents:
    return dataclasses.replace(model, unet=unet)
