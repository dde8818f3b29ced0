"""Prompt encoding and the partial DDIM sampler shared by SDD (EMA teacher) and ESD (the trained model).

``sample_to_k`` runs classifier-free-guided DDIM from pure noise for exactly ``k`` steps per latent and returns
the latents together with the timestep they now sit at, which is the timestep the student must be queried at.
On a flow-matching model (SD3: ``FlowMatchEulerDiscreteScheduler``, x_s = (1 - s) x0 + s eps, the output
v = eps - x0) the same sampler takes Euler steps z + (s_{i+1} - s_i) v on the scheduler's ``sigmas`` instead
(``grid_step``). On a guidance-distilled model (FLUX.1-dev) a step is one forward on the guiding prompt with s_g
as the model's guidance input, and no unconditional branch (``distilled``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: Sequence[str], device=None) -> torch.Tensor:
    """CLIP hidden states of ``prompts`` padded to the tokenizer's max length, as Stable Diffusion uses them."""
    device = device or next(text_encoder.parameters()).device
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + s_g * (eps_cond - eps_uncond)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def ddim_step(scheduler, eps: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
    """One deterministic (eta = 0) DDIM step from timestep ``t`` on ``scheduler``'s grid."""
    return scheduler.step(eps, t, z, eta=0.0).prev_sample


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching one (SD3's, FLUX's): x_s = (1 - s) x0 + s eps, the model predicts
    v = eps - x0, and ``timesteps`` are ``sigmas * num_train_timesteps``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def grid_step(scheduler, output: torch.Tensor, i: int, z: torch.Tensor) -> torch.Tensor:
    """One deterministic step from grid point ``i`` to ``i + 1`` of ``scheduler``'s grid: DDIM (eta = 0), or on a
    flow-matching grid the Euler step z + (sigmas[i + 1] - sigmas[i]) v, in fp32 as
    ``FlowMatchEulerDiscreteScheduler.step`` computes it. That scheduler's own ``step`` keeps a step counter,
    which a sampler whose batches stop at different steps, and is called again from the top, would put out of
    step; the index here is explicit."""
    if is_flow_matching(scheduler):
        sigmas = scheduler.sigmas.to(z.device)
        return (z.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * output).to(output.dtype)
    return ddim_step(scheduler, output, scheduler.timesteps[i], z)


def plain_timesteps(scheduler, steps: int, latent_shape: Sequence[int], device=None) -> None:
    """The grid SD's, SDXL's and SD3's pipelines sample on (their families' ``set_timesteps``):
    ``set_timesteps(steps)``, the image size does not enter (FLUX's grid is shifted by it)."""
    scheduler.set_timesteps(steps, device=device)


def unet_denoise(unet, z, t, c):
    """The SD-1.x/2.x denoiser call (``sdd.families.sd``)."""
    return unet(z, t, encoder_hidden_states=c).sample


@torch.no_grad()
def sample_to_k(
    unet: nn.Module,
    scheduler,
    z_T: torch.Tensor,
    c_cond: torch.Tensor,
    c_uncond: torch.Tensor,
    guidance_scale: float,
    k: torch.Tensor,
    denoise=None,
    distilled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run CFG-DDIM from ``z_T`` for exactly ``k[b]`` steps for each latent ``b``.

    Args:
        unet: the sampling model (SDD: the EMA teacher; ESD: the model being trained).
        scheduler: a DDIM scheduler (a flow-matching one for a flow model, ``grid_step``) on which
            ``set_timesteps(K)`` was called; its grid is ``scheduler.timesteps`` (noisiest first).
        z_T: (B, C, H, W) initial noise.
        c_cond, c_uncond: (B or 1, L, D) text embeddings of the guiding and the empty prompt.
        guidance_scale: s_g.
        k: (B,) integers in [0, K). Latent ``b`` is denoised ``k[b]`` times; all latents move in lockstep on the
            grid and each is frozen once it has taken its own ``k[b]`` steps, so one batched pass serves them all.
            Or (B, R): trajectory ``b`` runs to ``max_r k[b, r]`` and yields its latent after each ``k[b, r]``
            steps, R latents from one trajectory (the B * R latents in order b, r).
        denoise: ``denoise(unet, z, t, c)``, the family's denoiser call (``sdd.families``); default SD's
            ``unet(z, t, encoder_hidden_states=c).sample``. Its output (epsilon, v, or a flow model's v) is
            combined as it is (CFG commutes with the conversion) and stepped by ``grid_step``: DDIM reads the
            model's prediction type; a flow grid's Euler step takes the flow v.
        distilled: the family's ``guidance_distilled`` (FLUX): each step is ``denoise(unet, z, t, c_cond,
            guidance=guidance_scale)``, one forward with s_g embedded; ``c_uncond`` is not used.

    Returns:
        ``(z_t, t)``: the latents and, for each, the grid timestep ``scheduler.timesteps[k[b]]`` at which it sits.
        ``k = 0`` returns ``z_T`` itself at the first (noisiest) grid timestep.
    """
    timesteps = scheduler.timesteps
    denoise = denoise or unet_denoise
    k = k.to(torch.long).cpu()
    if k.ndim not in (1, 2) or k.shape[0] != z_T.shape[0]:
        raise ValueError(f"k must have shape ({z_T.shape[0]},) or ({z_T.shape[0]}, R), got {tuple(k.shape)}")
    if (k < 0).any() or (k >= len(timesteps)).any():
        raise ValueError(f"k must lie in [0, {len(timesteps)}), got {k.tolist()}")
    ks = k if k.ndim == 2 else k[:, None]
    last = ks.amax(1) if ks.numel() else ks.new_zeros(ks.shape[0])  # the steps each trajectory takes
    batch = z_T.shape[0]
    c_cond = c_cond.expand(batch, -1, -1)
    c_uncond = c_uncond.expand(batch, -1, -1)
    z = z_T.clone()
    out = z.new_empty((batch, ks.shape[1], *z.shape[1:]))
    for i in range(int(last.max()) + 1 if batch else 0):
        rows, cols = (ks == i).nonzero(as_tuple=True)  # latents due after i steps: the trajectory's z now
        out[rows.to(z.device), cols.to(z.device)] = z.index_select(0, rows.to(z.device))
        active = (last > i).nonzero().flatten().to(z.device)  # trajectories that still have steps to take
        if not len(active):
            break
        t = timesteps[i]
        z_a = z.index_select(0, active)
        n = z_a.shape[0]
        c_a = c_cond.index_select(0, active)
        if distilled:
            guided = denoise(unet, z_a, t, c_a, guidance=guidance_scale)
        else:
            eps = denoise(unet, torch.cat([z_a, z_a]), t, torch.cat([c_uncond.index_select(0, active), c_a]))
            guided = classifier_free_guidance(eps[:n], eps[n:], guidance_scale)
        z_new = grid_step(scheduler, guided.to(z_a.dtype), i, z_a)
        z = z.index_copy(0, active, z_new.to(z.dtype))
    t_k = timesteps[ks.flatten()].to(z.device)
    return out.flatten(0, 1), t_k


def sample_k(
    batch: int,
    num_steps: int,
    generator: torch.Generator,
    distribution: str = "uniform",
    beta: tuple[float, float] = (3.0, 3.0),
) -> torch.Tensor:
    """Number of teacher DDIM steps per latent, in [0, num_steps).

    ``uniform``: k ~ U{0, ..., K-1} (SDD). ``beta``: k = floor(K * u), u ~ Beta(a, b) (ECCV'24 SDD: a = b = 3).
    """
    if distribution == "uniform":
        return torch.randint(0, num_steps, (batch,), generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    u = np.random.default_rng(seed).beta(beta[0], beta[1], size=batch)
    return torch.from_numpy(np.minimum(np.floor(num_steps * u), num_steps - 1).astype(np.int64))


def concept_indices(
    schedule: str, num_concepts: int, batch: int, sample_offset: int, generator: torch.Generator
) -> torch.Tensor:
    """Which concept each latent of a micro-step uses: round-robin over the global sample count, or random."""
    if schedule == "iterative":
        return (sample_offset + torch.arange(batch)) % num_concepts
    return torch.randint(0, num_concepts, (batch,), generator=generator)
