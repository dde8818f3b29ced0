"""Concept Inversion (Pham et al., ICLR 2024): textual inversion of one new token on the *erased* model.

    v* = argmin_v E_{x, t, eps} || eps - eps_erased( sqrt(abar_t) E(x) + sqrt(1 - abar_t) eps ; c(v), t ) ||^2
    (x ~ images of the concept, c(v) = the text encoding of a prompt holding the new token v)

Only the new token's embedding row is trained (every other row stays bit-identical); the UNet, VAE and the rest
of the text encoder are the attacked model's, frozen. It runs as HFI's inversion (``sdd.methods.hfi``) with no
reward (plain textual inversion) through the training loop, so it checkpoints and resumes like any run. The ASR
curve is measured at each budget point: the run is continued to the next point (bit-identical to one straight
run) and the token so far generates the concept prompts with the concept word replaced by it.

Choices the paper leaves open or that differ here (docs/METHODS.md section 7.1): images of the concept are the
given folder, ShapesWorld renders (a world concept, judged by the oracle), or the original model's generations
of the concept prompts; on ShapesWorld each image's own caption is its prompt with the concept word replaced by
the token ("a red circle" -> "a <attack> circle"), elsewhere textual inversion's templates; the token starts from
the mean of ``initializer``'s token rows. Against an inference-time defence (negative prompt, SLD, SEGA) the token
is learned on the model's UNet as for weight-editing methods and then generates through the defence; the paper's
defence-specific objectives (CFG targets for NP, unrolled SLD) are not implemented, so that row is a weaker attack.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from sdd.attacks.common import Target, concept_images, evaluate, token_prompts, train_to
from sdd.config import check
from sdd.methods.hfi import IMAGENET_TEMPLATES_SMALL

DEFAULT_BUDGET = 1000  # optimizer steps (the paper: 5000 at batch 4 x accumulation 4 on SD-1.4)
DEFAULT_CURVE = (100, 300)


@dataclass
class InversionSettings:
    images: int = 64  # concept images rendered or generated (the paper: 25 generated)
    batch_size: int = 16  # the paper's effective batch (4 x gradient accumulation 4)
    lr: float = 5e-3  # the paper's base rate (its --scale_lr multiplies it by the batch: 0.08)
    weight_decay: float = 1e-2  # AdamW, as textual inversion's example
    token: str = "<attack>"
    initializer: str = "thing"
    templates: list[str] = field(default_factory=list)  # prompts with {} for the token (default: see the docstring)

    def __post_init__(self) -> None:
        check(self.images >= 1 and self.batch_size >= 1, "inversion.images/batch_size", "must be >= 1")
        check(self.lr > 0, "inversion.lr", f"must be > 0, got {self.lr}")


def _hfi_overrides(target: Target, s: InversionSettings, images: str, steps: int, seed: int) -> list[str]:
    from sdd.files import to_json

    overrides = [
        f"model.pretrained={target.model}", f"images={images}", "hfi.weighting=none",
        f"hfi.placeholder_token={s.token}", f"hfi.initializer_token={s.initializer}",
        f"train.steps={steps}", f"train.batch_size={s.batch_size}", f"train.lr={s.lr}",
        f"train.weight_decay={s.weight_decay}", "train.max_grad_norm=null", "train.checkpoint_every=0",
        "train.checkpoints_total_limit=1", f"train.seed={seed}", "train.log_every=50",
        "tracking.tracker=none", "tracking.sample_every=0",
    ]
    if s.templates:
        overrides.append(f"hfi.templates={to_json(list(s.templates))}")
    elif target.shapes:
        overrides.append(f"hfi.caption_word={target.concept}")
    else:
        overrides.append(f"hfi.templates={to_json(IMAGENET_TEMPLATES_SMALL)}")
    return overrides


def attack(target: Target, cfg, out: str, points: list[int], progress) -> dict:
    """Run to each budget point; return the curve and what was found."""
    from sdd.methods.hfi import HFIConfig

    s: InversionSettings = cfg.inversion
    images = concept_images(target, cfg.images, os.path.join(out, "concept-images"), s.images, cfg.seed)
    run_dir = os.path.join(out, "inversion")
    curve = []
    for budget in points:
        token_file = os.path.join(out, "tokens", f"step-{budget:06d}.safetensors")
        if not os.path.isfile(token_file):
            progress(f"concept-inversion: training the token to step {budget}")
            train_to(HFIConfig, _hfi_overrides(target, s, images, budget, cfg.seed), run_dir)
            os.makedirs(os.path.dirname(token_file), exist_ok=True)
            shutil.copyfile(os.path.join(run_dir, "learned_embeds.safetensors"), token_file)
        progress(f"concept-inversion: ASR at step {budget}")
        result = evaluate(target, token_prompts(target, s.token), os.path.join(out, "images", f"step-{budget:06d}"),
                          learned_embeds=token_file)
        curve.append({"budget": budget, **result, "found": {"learned_embeds": token_file}})
    return {"curve": curve, "found": {"token": s.token, "learned_embeds": curve[-1]["found"]["learned_embeds"],
                                      "prompts": token_prompts(target, s.token), "concept_images": images}}
