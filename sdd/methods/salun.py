"""SalUn: saliency unlearning (Fan et al., ICLR 2024), the diffusion variant, on the same loop as SDD.

    once, before the first step (theta = the original model):
        g = sum over forget batches of grad_theta -|| eps - ((1+w) eps_theta(x_t^f, c_f) - w eps_theta(x_t^f)) ||^2
        m = 1 on the floor(fraction * N) largest |g| over all N trainable elements together, else 0
    repeat:  (x^f, c_f, c_p) ~ forget set (c_p: the pseudo prompt of c_f);  (x^r, c_r) ~ retain set
             x_t^f = noised x^f;  x_t^r = noised x^r (its own t and noise)
             loss = || eps_theta(x_t^f, c_f) - sg[eps_theta(x_t^f, c_p)] ||^2
                    + alpha * || eps - eps_theta(x_t^r, c_r) ||^2
             grad <- m * grad                                     (non-salient elements never move)
    export theta

The forget and retain sets are image folders (``metadata.jsonl``: file_name, prompt, seed), or, when a folder is not
given, the base model's generations of their prompts, cached under ``output_dir/data/`` (a resumed run reuses them).
The mask is kept in every checkpoint (the method's extra state), so a resumed run continues with the mask it
started with. Only the salient elements can change: the mask multiplies every gradient (tensor hooks) and the
config refuses weight decay (AdamW's decay would shrink the non-salient weights too). See docs/METHODS.md, SalUn.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from sdd.config import FinetuneSet, TrainConfig, check
from sdd.errors import UserError
from sdd.export import ModelCard
from sdd.methods import common
from sdd.methods.finetune import denoising_loss
from sdd.params import configure_trainable
from sdd.perf import apply_to_unet

# --- the math (pure) -----------------------------------------------------------------------------------------


def cfg_prediction(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """(1 + w) * eps(x_t, c) - w * eps(x_t): the classifier-free-guided prediction the saliency is taken of."""
    return (1.0 + guidance) * eps_cond - guidance * eps_uncond


def saliency_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean over elements of (target - prediction)^2, in fp32: the forgetting loss whose gradient's magnitude
    is the weight saliency (the sign does not matter, only |gradient| is used)."""
    return -F.mse_loss(prediction.float(), target.float())


def saliency_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """m = 1 (True) on the k = floor(fraction * N) largest scores ranked over all tensors together (N elements in
    all), else 0; one boolean tensor per score tensor, same shape.

    Ties are broken by position: among equal scores the element earlier in the dict's order (and, within a
    tensor, in row-major order) is taken first, so exactly k elements are salient and the mask is deterministic.
    """
    check(0.0 < fraction <= 1.0, "salun.mask_fraction", f"must lie in (0, 1], got {fraction}")
    flat = torch.cat([s.detach().float().flatten() for s in scores.values()])
    k = math.floor(round(flat.numel() * fraction, 6))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = chosen[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def forget_loss(eps_forget: torch.Tensor, eps_pseudo: torch.Tensor) -> torch.Tensor:
    """mean over elements of (eps_theta(x_t^f, c_f) - sg[eps_theta(x_t^f, c_p)])^2, in fp32: the forget images
    under the concept's prompt are pulled to what the model itself predicts for them under the pseudo prompt."""
    return F.mse_loss(eps_forget.float(), eps_pseudo.detach().float())


def salun_loss(forget: torch.Tensor, retain: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_forget + alpha * L_retain."""
    return forget + alpha * retain


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """A forget or retain set: an image folder, or (``images: null``) the base model's images of ``prompts``."""

    images: Optional[str] = None  # an image folder (metadata.jsonl: file_name, prompt, seed); null: generate
    prompts: list[str] = field(default_factory=list)  # what to generate (the forget set's default: the concepts)
    images_per_prompt: int = 8
    seed: int = 0  # image j of prompt i has seed seed + i * images_per_prompt + j
    guidance_scale: float = 7.5
    num_inference_steps: int = 25

    def __post_init__(self) -> None:
        check(self.images_per_prompt >= 1, "images_per_prompt", f"must be >= 1, got {self.images_per_prompt}")
        check(self.num_inference_steps >= 1, "num_inference_steps", "must be >= 1")


@dataclass
class SalUnSettings:
    alpha: float = 0.1  # weight of the retain loss (paper, NSFW: 0.1)
    mask_fraction: float = 0.5  # share of the trainable elements that are salient (paper: top 50 %)
    mask_guidance: float = 7.5  # w of the saliency loss's CFG prediction (paper's c_guidance)
    mask_batch_size: int = 8  # images per gradient of the saliency pass (one pass over the forget set)
    # one pseudo prompt for every forget image, or one per forget prompt (forget.prompts, same order)
    pseudo_prompts: list[str] = field(default_factory=lambda: ["a photo of a person wearing clothes"])
    resolution: Optional[int] = None  # image size (default: the model's)

    def __post_init__(self) -> None:
        check(0.0 < self.mask_fraction <= 1.0, "salun.mask_fraction", f"must lie in (0, 1], got {self.mask_fraction}")
        check(self.alpha >= 0, "salun.alpha", f"must be >= 0, got {self.alpha}")
        check(self.mask_batch_size >= 1, "salun.mask_batch_size", "must be >= 1")
        check(len(self.pseudo_prompts) >= 1, "salun.pseudo_prompts", "name at least one pseudo prompt")


@dataclass
class SalUnConfig(common.FineTuningConfig):
    method: Literal["salun"] = "salun"
    output_dir: str = "outputs/salun"
    finetune: FinetuneSet = "full"  # the paper masks the whole UNet; xattn/noxattn/selfattn mask within that set
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, batch_size=8, lr=1e-5,
                                                                   weight_decay=0.0))
    salun: SalUnSettings = field(default_factory=SalUnSettings)
    forget: ImageSet = field(default_factory=lambda: ImageSet(seed=200000))
    retain: ImageSet = field(default_factory=lambda: ImageSet(prompts=["a photo of a person wearing clothes"],
                                                              seed=100000))

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.finetune != "lora", "finetune", "SalUn masks the model's own weights; lora is not supported "
              "(choose full, xattn, noxattn or selfattn)")
        check(self.train.weight_decay == 0, "train.weight_decay",
              f"must be 0 for SalUn (got {self.train.weight_decay}): AdamW's decoupled decay would move the "
              "non-salient weights that the mask keeps fixed")
        n_forget = len(self.forget.prompts) or len(self.concepts)
        n_pseudo = len(self.salun.pseudo_prompts)
        check(n_pseudo == 1 or n_pseudo == n_forget, "salun.pseudo_prompts",
              f"give one pseudo prompt, or one per forget prompt ({n_forget}), got {n_pseudo}")
        check(self.retain.images is not None or len(self.retain.prompts) > 0, "retain",
              "give retain.images (an image folder) or retain.prompts to generate it")


# --- the data ------------------------------------------------------------------------------------------------


def image_set(base, spec: ImageSet, prompts: Sequence[str], folder: str, model_name: str, resolution: int,
              process_index: int) -> list:
    """The items (``sdd.feedback.Item``) of an image set: ``spec.images``, or the base model's images of
    ``prompts`` generated into ``folder`` once (a folder whose ``images.json`` matches the request is reused)."""
    from sdd.feedback import load_items

    if spec.images:
        return load_items(spec.images)
    import json

    from sdd.files import to_json, write_text
    from sdd.generation import Request, generate
    from sdd.jobs import distributed_state

    request = {"model": model_name, "prompts": list(prompts), "images_per_prompt": spec.images_per_prompt,
               "seed": spec.seed, "guidance_scale": spec.guidance_scale,
               "num_inference_steps": spec.num_inference_steps, "resolution": resolution}
    stamp = os.path.join(folder, "images.json")

    def cached() -> bool:
        if not os.path.isfile(stamp):
            return False
        with open(stamp, encoding="utf-8") as f:
            return json.load(f) == request

    if process_index == 0 and not cached():
        rows = [(p, spec.seed + i * spec.images_per_prompt + j)
                for i, p in enumerate(prompts) for j in range(spec.images_per_prompt)]
        requests = [Request(prompt=p, seed=s, guidance_scale=spec.guidance_scale, height=resolution,
                            width=resolution) for p, s in rows]
        images = generate(base, requests, num_inference_steps=spec.num_inference_steps, progress=True,
                          desc=f"generating {os.path.basename(folder)} set")
        os.makedirs(folder, exist_ok=True)
        lines = []
        for n, ((p, s), image) in enumerate(zip(rows, images)):
            name = f"{n:05d}.png"
            image.save(os.path.join(folder, name))
            lines.append(to_json({"file_name": name, "prompt": p, "seed": s}, ensure_ascii=False))
        write_text(os.path.join(folder, "metadata.jsonl"), "\n".join(lines) + "\n")
        write_text(stamp, to_json(request, indent=2) + "\n")  # last: the folder is complete
    distributed_state().wait_for_everyone()
    return load_items(folder)


# --- the method ----------------------------------------------------------------------------------------------


class SalUnMethod:
    """Trained model = the UNet (its chosen set, masked); the pseudo prediction is the same model, detached."""

    def __init__(self, cfg: SalUnConfig, device: torch.device | str = "cpu", process_index: int = 0,
                 num_processes: int = 1):
        from diffusers import DDPMScheduler

        self.cfg = cfg
        s = cfg.salun
        forget_prompts = list(cfg.forget.prompts) or list(cfg.concepts)
        if cfg.forget.images:  # checked before the model is loaded
            from sdd.feedback import load_items

            load_items(cfg.forget.images)
        self.base = common.load_base(cfg.model.pretrained, cfg.model.revision, device, cfg.learned_embeds,
                                     single_file_config=cfg.model.single_file_config)
        common.require_family(self.base, epsilon_only=True, method="SalUn")
        self.model = self.base.unet
        self.resolution = s.resolution or self.base.default_resolution
        common.latent_shape(self.base, self.resolution)  # the resolution fits the VAE
        data = os.path.join(cfg.output_dir, "data")
        forget = image_set(self.base, cfg.forget, forget_prompts, os.path.join(data, "forget"),
                           cfg.model.pretrained, self.resolution, process_index)
        retain = image_set(self.base, cfg.retain, cfg.retain.prompts, os.path.join(data, "retain"),
                           cfg.model.pretrained, self.resolution, process_index)
        pseudo = self.pseudo_of(forget_prompts, [i.prompt for i in forget])

        self.trainable_names = configure_trainable(self.model, cfg.finetune, cfg.lora)
        self.model.train()
        self.noise_scheduler = DDPMScheduler.from_config(self.base.scheduler.config)
        self.forget_mean, self.forget_std = common.encode_images(self.base, [i.path for i in forget],
                                                                 self.resolution, device)
        self.retain_mean, self.retain_std = common.encode_images(self.base, [i.path for i in retain],
                                                                 self.resolution, device)
        captions = list(dict.fromkeys(["", *(i.prompt for i in forget), *pseudo, *(i.prompt for i in retain)]))
        self.texts = common.TextEmbeddings(self.base, captions, cfg.perf.cache_text_embeddings)
        self.forget_index = torch.tensor([captions.index(i.prompt) for i in forget])
        self.pseudo_index = torch.tensor([captions.index(p) for p in pseudo])
        self.retain_index = torch.tensor([captions.index(i.prompt) for i in retain])

        self.mask = self.compute_mask()  # from the original weights, before any step and before perf wrappers
        self.salient = int(sum(m.sum().item() for m in self.mask.values()))
        if self.salient == 0:
            raise UserError(f"salun.mask_fraction={s.mask_fraction} selects no element of the "
                            f"{sum(m.numel() for m in self.mask.values())} trainable ones; raise it")
        params = dict(self.model.named_parameters())
        self._hooks = [params[n].register_hook(self._masker(n)) for n in self.mask]
        apply_to_unet(self.model, cfg.perf, training=True)

    def pseudo_of(self, forget_prompts: list[str], captions: list[str]) -> list[str]:
        """The pseudo prompt of each forget image: the single one, or the one paired with its caption."""
        pseudo = list(self.cfg.salun.pseudo_prompts)
        if len(pseudo) == 1:
            return pseudo * len(captions)
        pairs = dict(zip(forget_prompts, pseudo))
        for caption in captions:
            if caption not in pairs:
                raise UserError(f"forget image caption {caption!r} is not one of forget.prompts {forget_prompts}, "
                                "so it has no pseudo prompt: list it there, or give a single pseudo prompt")
        return [pairs[c] for c in captions]

    def _masker(self, name: str):
        return lambda grad: grad * self.mask[name].to(grad.dtype)

    def compute_mask(self) -> dict[str, torch.Tensor]:
        """One pass over the forget set (batches of ``salun.mask_batch_size``, its own seeded draws): the
        saliency loss's gradients summed, their magnitudes ranked over all trainable elements together."""
        s = self.cfg.salun
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        embeds = self.texts.get()
        n = len(self.forget_index)
        for start in range(0, n, s.mask_batch_size):
            pick = torch.arange(start, min(start + s.mask_batch_size, n))
            device_pick = pick.to(self.forget_mean.device)
            z_t, t, target = common.noised_latents(self.base, self.noise_scheduler, self.forget_mean[device_pick],
                                                   self.forget_std[device_pick], generator)
            c = embeds[self.forget_index[pick].to(embeds.device)]
            eps = self.model(torch.cat([z_t, z_t]), torch.cat([t, t]),
                             encoder_hidden_states=torch.cat([c, embeds[:1].expand_as(c)])).sample
            eps_cond, eps_uncond = eps.chunk(2)
            loss = saliency_loss(cfg_prediction(eps_cond, eps_uncond, s.mask_guidance), target)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    scores[name] += grad.float()
        return saliency_mask({name: score.abs() for name, score in scores.items()}, s.mask_fraction)

    # the loop's interface

    def compute_loss(self, model, micro_step: int, generator: torch.Generator):
        batch, device = self.cfg.train.batch_size, self.forget_mean.device
        fi = torch.randint(0, len(self.forget_index), (batch,), generator=generator)
        ri = torch.randint(0, len(self.retain_index), (batch,), generator=generator)
        z_f, t_f, _ = common.noised_latents(self.base, self.noise_scheduler, self.forget_mean[fi.to(device)],
                                            self.forget_std[fi.to(device)], generator)
        z_r, t_r, target_r = common.noised_latents(self.base, self.noise_scheduler, self.retain_mean[ri.to(device)],
                                                   self.retain_std[ri.to(device)], generator)
        embeds = self.texts.get()
        c_f, c_p = embeds[self.forget_index[fi].to(device)], embeds[self.pseudo_index[fi].to(device)]
        c_r = embeds[self.retain_index[ri].to(device)]
        with torch.no_grad():
            eps_pseudo = model(z_f, t_f, encoder_hidden_states=c_p).sample
        eps = model(torch.cat([z_f, z_r]), torch.cat([t_f, t_r]), encoder_hidden_states=torch.cat([c_f, c_r])).sample
        eps_forget, eps_retain = eps.chunk(2)
        forget, retain = forget_loss(eps_forget, eps_pseudo), denoising_loss(eps_retain, target_r)
        return salun_loss(forget, retain, self.cfg.salun.alpha), {"forget_loss": forget.item(),
                                                                  "retain_loss": retain.item()}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"mask.{name}": m for name, m in self.mask.items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        masks = {k.removeprefix("mask."): v for k, v in state.items() if k.startswith("mask.")}
        if set(masks) != set(self.mask):
            raise UserError("the checkpoint's SalUn mask does not cover this run's trainable parameters "
                            "(another finetune set or model?)")
        for name, m in masks.items():
            self.mask[name] = m.to(device=self.mask[name].device, dtype=torch.bool)
        self.salient = int(sum(m.sum().item() for m in self.mask.values()))

    def summary(self) -> dict:
        total = sum(m.numel() for m in self.mask.values())
        return {"salun_mask": {"salient": self.salient, "trainable": total}}

    def validation_images(self):
        prompts = common.default_prompts(self.cfg.concepts, self.cfg.tracking)
        return common.validation_images(self.base, self.model, prompts, self.cfg.tracking, self.resolution)

    def export(self, output_dir: str) -> dict[str, str]:
        cfg, s = self.cfg, self.cfg.salun
        card = ModelCard(
            base_model=cfg.model.pretrained,
            method=f"SalUn ({cfg.finetune}, top {s.mask_fraction:.0%} salient, alpha={s.alpha:g})",
            concepts=list(cfg.concepts),
            steps=cfg.train.steps,
            finetune=cfg.finetune,
            hyperparameters=common.hyperparameters(cfg, s),
            exported="the fine-tuned model (salient weights only)",
        )
        return common.export_unet(output_dir, self.base, self.model, cfg, card)
