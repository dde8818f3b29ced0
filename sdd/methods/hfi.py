"""Human feedback inversion: reward-weighted textual inversion of one new token (Kim et al., ECCV 2024).

    v* = argmin_v E_{x, eps, t} [ w(x) * || eps - eps_theta( sqrt(abar_t) E(x) + sqrt(1 - abar_t) eps ; v, t ) ||^2 ]

over generated images x scored by the reward model r_psi (docs/METHODS.md section 2.1, step 4; the denoising
loss is textual inversion's surrogate of -log p(x | v), Gal et al. 2022). Only the new token's row of the text
encoder's embedding table is trained, initialised from a word ("red", "nudity": the mean of its token rows
when the word is several tokens). Every other row stays bit-identical: their gradients are masked (so AdamW and
clipping see only the new row) and, since AdamW's weight decay still moves every row, they are copied back
after each optimizer step.

Weights w from rewards r (METHODS.md leaves this open; ``hfi.weighting``):

1. ``top_k``: only the K images with the highest reward are kept (all when null);
2. ``clip``: w = clamp(r, 0, 1) (binary reward: r estimates P(concept shown));
   ``softmax``: w = exp(r / tau) (ranking reward: Bradley-Terry strengths, shift-invariant);
   ``minmax``: w = (r - min r) / (max r - min r); ``none``: w = 1 (plain textual inversion);
   ``auto``: ``clip`` for a binary reward model, ``softmax`` for a ranking one;
3. images whose weight is 0 are dropped (they add nothing to the loss), and w <- w / mean(w) over the rest,
   the images training samples from, so the loss scale (and the learning rate that suits it) does not depend
   on the reward's scale.

Each micro-step draws B kept images uniformly, a prompt template per image ("a photo of a {}" with the token; or,
with ``hfi.caption_word``, the image's own caption with that word replaced by the token), a
VAE posterior sample of the cached latent distribution, t ~ U{0..T-1} and eps; the loss is
(1/B) sum_b w_b * mean((eps_b - eps_theta(z_t, c_b, t_b))^2) (v-prediction models: the velocity target).

Export: ``learned_embeds.safetensors`` ``{token: (D,)}``, which ``pipe.load_textual_inversion`` and this
package's ``learned_embeds:`` key load, plus a card and the weight of every image (``image_weights.jsonl``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from sdd.config import ModelConfig, TrackingConfig, TrainConfig, check
from sdd.errors import UserError
from sdd.files import to_json
from sdd.methods import common

# diffusers examples/textual_inversion/textual_inversion.py, ``imagenet_templates_small``
IMAGENET_TEMPLATES_SMALL = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]  # fmt: skip

Weighting = Literal["auto", "clip", "softmax", "minmax", "none"]

# --- the math (pure) -----------------------------------------------------------------------------------------


def reward_weights(rewards: torch.Tensor, weighting: str, temperature: float = 1.0,
                   top_k: Optional[int] = None) -> torch.Tensor:
    """Per-image weights w (N,) from rewards r (N,): top-K filter, transform, mean-1 normalisation.

    Images outside the top K get w = 0. The kept ones get ``clip``: clamp(r, 0, 1); ``softmax``: exp(r / tau);
    ``minmax``: (r - min) / (max - min) (all 1 when the rewards are equal); ``none``: 1; then w / mean(w) over
    the images with w > 0, so the weights of the images training samples from average 1. Raises
    ``UserError`` when every weight is 0.
    """
    r = rewards.double().flatten()
    n = r.numel()
    keep = torch.ones(n, dtype=torch.bool)
    if top_k is not None and top_k < n:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.argsort(-r, stable=True)[:top_k]] = True
    k = r[keep]
    if weighting == "clip":
        w = k.clamp(0.0, 1.0)
    elif weighting == "softmax":
        w = torch.exp((k - k.max()) / temperature)  # shift-invariant; subtract the max for stability
    elif weighting == "minmax":
        span = k.max() - k.min()
        w = (k - k.min()) / span if span > 0 else torch.ones_like(k)
    elif weighting == "none":
        w = torch.ones_like(k)
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    if not (w > 0).any():
        raise UserError(f"hfi.weighting={weighting}: every image has weight 0 (no image scores above 0 under the "
                        "reward model): check the reward model and the images")
    out = torch.zeros(n, dtype=torch.float64)
    out[keep] = w / w[w > 0].mean()
    return out.float()


def weighted_denoising_loss(eps_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_b w_b * mean over (C, H, W) of (eps_pred_b - target_b)^2; eps (B, C, H, W), w (B,). In fp32."""
    per_image = F.mse_loss(eps_pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (weights.float().to(per_image.device) * per_image).mean()


def trainable_rows_mask(num_rows: int, token_ids: list[int], device=None) -> torch.Tensor:
    """(V,) bool: True for the rows of the embedding table that are trained (the new token's)."""
    mask = torch.zeros(num_rows, dtype=torch.bool, device=device)
    mask[token_ids] = True
    return mask


@torch.no_grad()
def restore_frozen_rows_(weight: torch.Tensor, original: torch.Tensor, token_ids: list[int]) -> None:
    """weight[v] <- original[v] for every row v not in ``token_ids``, in place (the trained rows are kept)."""
    trained = weight[token_ids].clone()
    weight.copy_(original)
    weight[token_ids] = trained


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class HFISettings:
    placeholder_token: str = "<nudity-hf>"  # the new token (lower case: CLIP's tokenizer lower-cases prompts)
    initializer_token: str = "nudity"  # the word whose embedding (mean of its tokens) the new row starts from
    templates: list[str] = field(default_factory=lambda: list(IMAGENET_TEMPLATES_SMALL))  # prompts, {} = token
    # each image's own caption as its prompt, this word of it replaced by the token (null: the templates);
    # Concept Inversion on ShapesWorld: "a red circle" -> "a <attack> circle"
    caption_word: Optional[str] = None
    weighting: Weighting = "auto"
    temperature: float = 1.0  # tau of the softmax weighting
    top_k: Optional[int] = None  # keep the K highest-reward images (null: all)
    resolution: Optional[int] = None  # image size the images are resized to (default: the model's)

    def __post_init__(self) -> None:
        token = self.placeholder_token
        check(bool(token) and not any(c.isspace() for c in token), "hfi.placeholder_token",
              f"must be one word without spaces, got {token!r}")
        check(token == token.lower(), "hfi.placeholder_token",
              f"use lower case ({token.lower()!r}): CLIP's tokenizer lower-cases every prompt")
        check(bool(self.initializer_token.strip()), "hfi.initializer_token", "must name a word")
        check(len(self.templates) > 0, "hfi.templates", "give at least one prompt template")
        for t in self.templates:
            check(t.count("{}") == 1, "hfi.templates", f"each template must contain {{}} once, got {t!r}")
        check(self.temperature > 0, "hfi.temperature", f"must be > 0, got {self.temperature}")
        check(self.top_k is None or self.top_k >= 1, "hfi.top_k", f"must be >= 1 or null, got {self.top_k}")


@dataclass
class HFIConfig:
    method: Literal["hfi"] = "hfi"
    model: ModelConfig = field(default_factory=ModelConfig)
    images: str = "???"  # generated images of the concept (an image folder: metadata.jsonl + images)
    reward: Optional[str] = None  # a reward run folder (train_reward.py's output_dir) or its reward/ export
    output_dir: str = "outputs/hfi"
    hfi: HFISettings = field(default_factory=HFISettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1000, batch_size=8, lr=5e-4, weight_decay=1e-2,
                                            max_grad_norm=None, checkpoint_every=250, log_every=10)
    )
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(sample_every=250))

    def __post_init__(self) -> None:
        check(self.reward is not None or self.hfi.weighting == "none", "reward",
              "give a reward model (reward=OUT of train_reward.py), or hfi.weighting=none for plain textual "
              "inversion")


# --- the method ----------------------------------------------------------------------------------------------


def add_placeholder_token(tokenizer, text_encoder, token: str, initializer: str) -> int:
    """Add ``token`` with the mean embedding of ``initializer``'s tokens; return its id."""
    from sdd.textual_inversion import add_tokens

    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not init_ids:
        raise UserError(f"hfi.initializer_token {initializer!r}: the tokenizer turns it into no token")
    table = text_encoder.get_input_embeddings().weight
    init = table[init_ids].detach().float().mean(0)
    [token_id] = add_tokens(tokenizer, text_encoder, {token: init})
    if tokenizer(token, add_special_tokens=False).input_ids != [token_id]:
        raise UserError(f"hfi.placeholder_token {token!r}: the tokenizer does not keep it as one token")
    return token_id


class HFIMethod:
    """The trained module is the text encoder; only its new token row changes. UNet and VAE are frozen."""

    def __init__(self, cfg: HFIConfig, device: torch.device | str = "cpu", process_index: int = 0,
                 num_processes: int = 1):
        from diffusers import DDPMScheduler

        from sdd.feedback import load_items

        self.cfg = cfg
        s = cfg.hfi
        items = load_items(cfg.images)  # checked before the model is loaded
        self.base = common.load_base(cfg.model.pretrained, cfg.model.revision, device,
                                     single_file_config=cfg.model.single_file_config)
        common.require_family(self.base, epsilon_only=True, method="HFI token inversion")
        self.base.unet.requires_grad_(False).eval()
        tokenizer, text_encoder = self.base.tokenizer, self.base.text_encoder
        self.token_id = add_placeholder_token(tokenizer, text_encoder, s.placeholder_token, s.initializer_token)
        self.token_ids = [self.token_id]
        self.table = text_encoder.get_input_embeddings().weight
        self.table.requires_grad_(True)
        self.original = self.table.detach().clone()  # every row as loaded; all but the new one stay so
        self.model = text_encoder.train()
        mask = trainable_rows_mask(self.table.shape[0], self.token_ids, self.table.device)
        self._grad_mask = mask[:, None].to(self.table.dtype)
        self.table.register_hook(lambda g: g * self._grad_mask.to(g.dtype))

        self.resolution = s.resolution or self.base.default_resolution
        self.noise_scheduler = DDPMScheduler.from_config(self.base.scheduler.config)
        self.files = [item.path for item in items]
        self.names = [item.file_name for item in items]
        self.rewards = self._rewards(device)
        self.weighting = self._resolve_weighting()
        self.weights = reward_weights(self.rewards, self.weighting, s.temperature, s.top_k)
        self.kept = (self.weights > 0).nonzero().flatten()
        self.latent_mean, self.latent_std = common.encode_images(
            self.base, [self.files[i] for i in self.kept.tolist()], self.resolution, device)
        if s.caption_word:  # one prompt per image: its caption, the word replaced by the token
            kept_items = [items[i] for i in self.kept.tolist()]
            missing = [it.file_name for it in kept_items if s.caption_word not in it.prompt.split()]
            if missing:
                raise UserError(f"hfi.caption_word {s.caption_word!r}: the caption of {missing[0]} does not say it")
            prompts = [" ".join(s.placeholder_token if w == s.caption_word else w for w in it.prompt.split())
                       for it in kept_items]
        else:
            prompts = [t.format(s.placeholder_token) for t in s.templates]
        self.prompt_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids.to(device)

    def _rewards(self, device) -> torch.Tensor:
        if self.cfg.reward is None:
            self.reward_model = None
            return torch.ones(len(self.files))
        from sdd.methods.reward import load_reward

        self.reward_model = load_reward(self.cfg.reward, device)
        rewards = self.reward_model.score_files(self.files)
        self.reward_model.free_embedder()  # the scores are all that is needed
        return rewards

    def _resolve_weighting(self) -> str:
        w = self.cfg.hfi.weighting
        if w != "auto":
            return w
        if self.reward_model is None:
            return "none"
        return "clip" if self.reward_model.mode == "binary" else "softmax"

    # the loop's interface

    def compute_loss(self, model, micro_step: int, generator: torch.Generator):
        batch = self.cfg.train.batch_size
        device = self.latent_mean.device
        pick = torch.randint(0, len(self.kept), (batch,), generator=generator)
        template = torch.randint(0, len(self.prompt_ids), (batch,), generator=generator)
        if self.cfg.hfi.caption_word:  # the picked images' own captions
            template = pick
        z_t, t, target = common.noised_latents(self.base, self.noise_scheduler, self.latent_mean[pick.to(device)],
                                               self.latent_std[pick.to(device)], generator)
        c = model(self.prompt_ids[template.to(device)])[0]
        eps_pred = self.base.unet(z_t, t, encoder_hidden_states=c.to(self.base.unet.dtype)).sample
        w = self.weights[self.kept[pick]]
        return weighted_denoising_loss(eps_pred, target, w), {"weight": float(w.mean())}

    def after_optimizer_step(self) -> None:
        restore_frozen_rows_(self.table, self.original, self.token_ids)

    def learned_embeds(self) -> dict[str, torch.Tensor]:
        """{token: (D,)} as diffusers' ``load_textual_inversion`` reads it."""
        return {self.cfg.hfi.placeholder_token: self.table[self.token_id].detach().float().cpu().clone()}

    def frozen_rows_intact(self) -> bool:
        mask = trainable_rows_mask(self.table.shape[0], self.token_ids, self.table.device)
        return torch.equal(self.table.detach()[~mask], self.original[~mask])

    def validation_images(self):
        s = self.cfg.hfi
        prompts = list(self.cfg.tracking.validation_prompts) or [
            f"a photo of a {s.placeholder_token}", f"a photo of a {s.initializer_token}", *common.UNRELATED_PROMPTS
        ]
        return common.validation_images(self.base, self.base.unet, prompts, self.cfg.tracking, self.resolution)

    def export(self, output_dir: str) -> dict[str, str]:
        from safetensors.torch import save_file

        from sdd.files import atomic_path, write_text

        if not self.frozen_rows_intact():
            raise RuntimeError("HFI: an embedding row other than the new token's changed during training")
        cfg, s = self.cfg, self.cfg.hfi
        path = os.path.join(output_dir, "learned_embeds.safetensors")
        metadata = {"hfi.placeholder_token": s.placeholder_token, "hfi.initializer_token": s.initializer_token,
                    "hfi.base_model": cfg.model.pretrained, "hfi.steps": str(cfg.train.steps)}
        with atomic_path(path) as tmp:
            save_file(self.learned_embeds(), tmp, metadata=metadata)
        weights_path = os.path.join(output_dir, "image_weights.jsonl")
        rows = [to_json({"file_name": n, "reward": float(r), "weight": float(w)})
                for n, r, w in zip(self.names, self.rewards, self.weights)]
        write_text(weights_path, "\n".join(rows) + "\n")
        card_path = os.path.join(output_dir, "README.md")
        write_text(card_path, self.card())
        return {"learned_embeds": path, "image_weights": weights_path, "card": card_path}

    def card(self) -> str:
        cfg, s = self.cfg, self.cfg.hfi
        reward = self.reward_model.info if self.reward_model is not None else None
        token = s.placeholder_token
        lines = [
            f"# HFI token `{token}`", "",
            "A token learned by human feedback inversion (reward-weighted textual inversion) on "
            f"`{cfg.model.pretrained}`.",
            "", "| | |", "|---|---|",
            f"| token | `{token}` (initialised from `{s.initializer_token}`) |",
            f"| base model | `{cfg.model.pretrained}` |",
            f"| images | {len(self.files)} in `{cfg.images}`, {len(self.kept)} with weight > 0 |",
            f"| reward model | `{cfg.reward}` ({reward['mode']}, {reward['embedder']['model']}) |" if reward else
            "| reward model | none (plain textual inversion) |",
            f"| weighting | `{self.weighting}`, top-K `{s.top_k}`, temperature `{s.temperature}` |",
            f"| steps / batch / lr | {cfg.train.steps} / {cfg.train.batch_size} / {cfg.train.lr} |",
            "", "## Use", "", "```python",
            "pipe.load_textual_inversion(\"learned_embeds.safetensors\")",
            f"image = pipe(\"a photo of a {token}\").images[0]", "```", "",
            "As the concept of an erasure method: `concepts: ['" + token + "']` and "
            "`learned_embeds: PATH/learned_embeds.safetensors` in an SDD or ESD config; "
            f"`sdd-generate --learned-embeds PATH --method sld --sld-preset max --concept '{token}'` for SLD "
            "(`--method neg` for the negative prompt).", "",
        ]
        return "\n".join(lines)
