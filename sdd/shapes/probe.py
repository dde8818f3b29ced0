"""Does a ShapesWorld model read a word from the text, or from the latent? Two probes on one-step x0 predictions
from noised real scenes (docs/METHODS.md section 10, "ShapesWorld of the SD3 kind"):

- *wrong word*: each scene is captioned "a {colour} {shape}" with its shape (or colour) word swapped for another;
  the share of scenes whose x0 (read by the oracle) follows the caption, and the share that keeps the latent's own;
- *difference*: the norm of x0("a red circle") - x0("a red square") over the norm of x0("a red circle") (the same
  for "a blue circle"), on the same noised scenes.

The noise level is given as a flow sigma s (x_s = (1 - s) x0 + s eps); a model on a VP schedule (the UNet model) is
probed at the timestep of the same signal-to-noise ratio, (1 - s)^2 / s^2, so the two kinds are compared at equal
noise. Works on any model of the world (``load_components``) or on a ``shapes-base`` checkpoint's live weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from sdd.shapes import oracle, world


@dataclass
class ProbeRow:
    sigma: float
    timestep: float
    shape_followed: float  # wrong shape word: share of x0 that draw the caption's shape
    shape_own: float  # ... that keep the scene's own shape
    colour_followed: float
    colour_own: float
    shape_difference: float  # |x0(red circle) - x0(red square)| / |x0(red circle)|
    colour_difference: float  # |x0(red circle) - x0(blue circle)| / |x0(red circle)|


def noised(components, z0: torch.Tensor, eps: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
    """(x_t, t) at the flow sigma ``sigma``, or on a VP schedule at the timestep of the same SNR."""
    p = components.prediction
    if p.kind == "flow":
        return (1 - sigma) * z0 + sigma * eps, sigma * p.num_train_timesteps
    from sdd.methods.shapes_base import teacher_timesteps

    t = int(teacher_timesteps(torch.tensor([sigma], dtype=torch.float64), p.alphas_cumprod)[0])
    a = float(p.alphas_cumprod.to(torch.float64)[t])
    return a**0.5 * z0 + (1 - a) ** 0.5 * eps, float(t)


@torch.no_grad()
def x0_of(components, x_t: torch.Tensor, t: float, conditioning: torch.Tensor) -> torch.Tensor:
    c = components
    return c.prediction.to_x0(c.family.denoise(c.unet, x_t, t, conditioning), x_t, t)


@torch.no_grad()
def run(components, sigmas=(0.95, 0.85, 0.7, 0.5), n: int = 36, seed: int = 7) -> list[ProbeRow]:
    c = components
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    images = np.stack([world.render(s) for s in scenes]).transpose(0, 3, 1, 2) * 2.0 - 1.0
    vae = c.vae
    z0 = vae.encode(torch.from_numpy(images).float()).latent_dist.mean
    z0 = (z0 - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    wrong = {
        "shape": [[o for o in world.SHAPES if o != s.shape][i % 2] for i, s in enumerate(scenes)],
        "colour": [[o for o in world.COLOURS if o != s.colour][i % 3] for i, s in enumerate(scenes)],
    }
    captions = {
        "shape": [f"a {s.colour} {w}" for s, w in zip(scenes, wrong["shape"])],
        "colour": [f"a {w} {s.shape}" for s, w in zip(scenes, wrong["colour"])],
    }
    conditioning = {kind: c.family.encode(c, texts) for kind, texts in captions.items()}  # once, for every sigma
    pairs = ("a red circle", "a red square", "a blue circle")
    pair_conditioning = {p: c.family.encode(c, [p]).expand(n, -1, -1) for p in pairs}
    rows = []
    for sigma in sigmas:
        x_t, t = noised(c, z0, eps, sigma)
        rates = {}
        for kind in ("shape", "colour"):
            x0 = x0_of(c, x_t, t, conditioning[kind]) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            reads = oracle.read_many(((vae.decode(x0).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
            got = [getattr(r, kind) for r in reads]
            rates[kind] = (float(np.mean([g == w for g, w in zip(got, wrong[kind])])),
                           float(np.mean([g == getattr(s, kind) for g, s in zip(got, scenes)])))
        pair = {p: x0_of(c, x_t, t, cond) for p, cond in pair_conditioning.items()}
        ref = pair["a red circle"].norm()
        rows.append(ProbeRow(
            sigma, t, *rates["shape"], *rates["colour"],
            float((pair["a red circle"] - pair["a red square"]).norm() / ref),
            float((pair["a red circle"] - pair["a blue circle"]).norm() / ref),
        ))
    return rows


def load_checkpoint(checkpoint: str):
    """The live weights of a ``shapes-base`` diffusion checkpoint (``OUT/checkpoints/step-N``) as components."""
    from safetensors.torch import load_file

    from sdd.config import load_config
    from sdd.errors import UserError
    from sdd.methods.shapes_base import ShapesBaseConfig, ShapesDiffusionMethod

    config, weights = os.path.join(checkpoint, "config.yaml"), os.path.join(checkpoint, "model.safetensors")
    if not (os.path.isfile(config) and os.path.isfile(weights)):
        raise UserError(f"{checkpoint}: not a shapes-base checkpoint (needs config.yaml and model.safetensors)")
    method = ShapesDiffusionMethod(load_config(ShapesBaseConfig, config))
    result = method.model.load_state_dict(load_file(weights), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("pos_embed.pos_embed")]  # a buffer, not saved
    if missing or result.unexpected_keys:
        raise UserError(f"{checkpoint}: its weights do not fit its config.yaml "
                        f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected)")
    for module in (method.model, method.base.vae):
        module.eval()
    return method.base


def table(rows: list[ProbeRow]) -> str:
    head = ("| sigma | t | wrong shape: followed | own | wrong colour: followed | own | |circle - square| "
            "| |red - blue| |\n|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *(
        f"| {r.sigma} | {r.timestep:.0f} | {r.shape_followed:.2f} | {r.shape_own:.2f} | {r.colour_followed:.2f} | "
        f"{r.colour_own:.2f} | {r.shape_difference:.3f} | {r.colour_difference:.3f} |" for r in rows)])
