"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024), a closed-form edit.

For every cross-attention key and value projection W (each ``attn2.to_k`` and ``attn2.to_v`` of the UNet), with
c_i the erase keys (text-embedding rows of the concepts), v*_i = W_old c_i^guide their targets (the same rows of the
guide concept, through the original projection) and c_j the preserve keys:

    W_new = argmin_W  lam ||W - W_old||^2 + eta_e sum_i ||W c_i - v*_i||^2 + eta_p sum_j ||W c_j - W_old c_j||^2
          = (lam W_old + eta_e sum_i v*_i c_i^T + eta_p sum_j W_old c_j c_j^T)
            (lam I + eta_e sum_i c_i c_i^T + eta_p sum_j c_j c_j^T)^-1

No training loop: the loop's closed-form runner (``sdd.loop.solve``) applies the edit once, checkpoints the edited
projections and exports like every other method. Which token rows of a prompt are keys differs between the
authors' scripts (``uce.token_rows``): ``last`` (the last word token, the current script), ``last-to-end`` (the last
word token to the end of the padded sequence, the paper-era script) or ``all`` (all 77 rows, as RECE uses).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch

from sdd.config import ExportConfig, ModelConfig, TrackingConfig, TrainConfig, check
from sdd.export import ModelCard
from sdd.files import to_json
from sdd.methods import common

TokenRows = Literal["last", "last-to-end", "all"]

# --- the math (pure) -----------------------------------------------------------------------------------------


def uce_edit(W_old: torch.Tensor, erase_keys: torch.Tensor, erase_values: torch.Tensor,
             preserve_keys: torch.Tensor, lam: float, eta_e: float, eta_p: float) -> torch.Tensor:
    """W_new = (lam W_old + eta_e sum_i v*_i c_i^T + eta_p sum_j W_old c_j c_j^T)
              (lam I + eta_e sum_i c_i c_i^T + eta_p sum_j c_j c_j^T)^-1

    ``W_old`` (out, in); ``erase_keys`` c_i as rows (N, in); ``erase_values`` v*_i as rows (N, out);
    ``preserve_keys`` c_j as rows (M, in; M may be 0). Solved (not inverted) in float64; returned in W_old's dtype.
    The right factor is symmetric, so W_new^T = A^-1 B^T with A the right factor and B the left.
    """
    W = W_old.double()
    c, v, p = erase_keys.double(), erase_values.double(), preserve_keys.double()
    A = lam * torch.eye(W.shape[1], dtype=torch.float64, device=W.device) + eta_e * c.T @ c + eta_p * p.T @ p
    B = lam * W + eta_e * v.T @ c + eta_p * (p @ W.T).T @ p
    return torch.linalg.solve(A, B.T).T.to(W_old.dtype)


def token_rows(n_tokens: int, mode: TokenRows, length: int) -> range:
    """The rows of a padded text embedding (``length`` rows, ``n_tokens`` of them BOS, the words and EOS) used as
    keys: the last word token (row n_tokens - 2; BOS for an empty prompt), from it to the end, or all rows."""
    last = max(n_tokens - 2, 0)
    if mode == "last":
        return range(last, last + 1)
    if mode == "last-to-end":
        return range(last, length)
    return range(0, length)


def paired_rows(emb_a: torch.Tensor, n_a: int, emb_b: torch.Tensor, n_b: int, mode: TokenRows
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The key rows of two prompts' embeddings (L, D), paired row by row: both truncated to the shorter selection
    (``last-to-end`` of prompts of different lengths, as the paper-era script truncated them)."""
    a, b = token_rows(n_a, mode, emb_a.shape[0]), token_rows(n_b, mode, emb_b.shape[0])
    n = min(len(a), len(b))
    return emb_a[a.start : a.start + n], emb_b[b.start : b.start + n]


# --- configuration -------------------------------------------------------------------------------------------


@dataclass
class UCESettings:
    guides: list[str] = field(default_factory=lambda: [""])  # one guide for every concept, or one per concept
    preserve_prompts: list[str] = field(default_factory=list)  # prompts whose keys keep their old values
    lam: float = 0.5  # lambda: weight of staying at W_old (the authors' scripts: 0.5)
    erase_scale: float = 1.0  # eta_e
    preserve_scale: float = 1.0  # eta_p (the current script: 1; the paper-era one: max(0.1, 1/|preserve|))
    token_rows: TokenRows = "last-to-end"  # which rows of a prompt's embedding are keys (module docstring)
    templates: list[str] = field(default_factory=lambda: ["{}"])  # erase t.format(concept) toward t.format(guide)

    def __post_init__(self) -> None:
        check(self.lam > 0, "uce.lam", f"must be > 0 (the system is singular without it), got {self.lam}")
        check(self.erase_scale > 0, "uce.erase_scale", f"must be > 0, got {self.erase_scale}")
        check(self.preserve_scale >= 0, "uce.preserve_scale", f"must be >= 0, got {self.preserve_scale}")
        check(len(self.guides) >= 1, "uce.guides", "give one guide (\"\" for the empty prompt) or one per concept")
        check(len(self.templates) >= 1 and all("{}" in t for t in self.templates), "uce.templates",
              "every template must hold {} (where the concept goes), e.g. ['{}', 'a photo of {}']")


def check_finetune(finetune: str) -> None:
    check(finetune != "lora", "finetune", "a closed-form edit writes the cross-attention key/value projections "
          "themselves; LoRA adapters are not meaningful here (leave finetune=kv)")
    check(finetune == "kv", "finetune", f"must be kv (every attn2.to_k and attn2.to_v), got {finetune!r}")


@dataclass
class UCEConfig:
    method: Literal["uce"] = "uce"
    model: ModelConfig = field(default_factory=ModelConfig)
    concepts: list[str] = field(default_factory=lambda: ["nudity"])
    learned_embeds: Optional[str] = None  # a learned_embeds.safetensors whose token(s) may appear in concepts
    output_dir: str = "outputs/uce"
    finetune: str = "kv"  # what is edited: every attn2.to_k / attn2.to_v (the only choice)
    uce: UCESettings = field(default_factory=UCESettings)
    # the closed-form runner reads seed, resume, allow_config_change and checkpoints_total_limit (no optimizer)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1, checkpoints_total_limit=None))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        check(len(self.concepts) > 0, "concepts", "name at least one concept, e.g. concepts='[nudity]'")
        check(all(c.strip() for c in self.concepts), "concepts", "a concept is empty")
        check_finetune(self.finetune)
        check(len(self.uce.guides) in (1, len(self.concepts)), "uce.guides",
              f"give one guide or one per concept ({len(self.concepts)}), got {len(self.uce.guides)}")


# --- the method ----------------------------------------------------------------------------------------------


def kv_projections(unet) -> dict[str, torch.nn.Linear]:
    """Every cross-attention key and value projection of the UNet, by module name."""
    return {name: m for name, m in unet.named_modules()
            if name.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(m, torch.nn.Linear)}


class PromptRows:
    """Text embeddings of prompts and their token counts, with the frozen text encoder."""

    def __init__(self, base, prompts: Sequence[str]):
        prompts = list(dict.fromkeys(prompts))
        from sdd.textual_inversion import check_placeholders

        check_placeholders(base.tokenizer, prompts)
        tok = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        with torch.no_grad():
            embeds = common.embed(base, prompts).float()
        self.rows = {p: (embeds[i], int(tok.attention_mask[i].sum())) for i, p in enumerate(prompts)}

    def pair(self, a: str, b: str, mode: TokenRows) -> tuple[torch.Tensor, torch.Tensor]:
        return paired_rows(*self.rows[a], *self.rows[b], mode)

    def keys(self, prompt: str, mode: TokenRows) -> torch.Tensor:
        return self.pair(prompt, prompt, mode)[0]


def erase_pairs(concepts: Sequence[str], s: UCESettings) -> list[tuple[str, str]]:
    """(erase prompt, guide prompt) for every concept and template."""
    guides = s.guides if len(s.guides) == len(concepts) else list(s.guides) * len(concepts)
    return [(t.format(c), t.format(g)) for c, g in zip(concepts, guides) for t in s.templates]


def edit_all(projections: dict[str, torch.nn.Linear], erase_keys: torch.Tensor, guide_keys: torch.Tensor,
             preserve_keys: torch.Tensor, lam: float, eta_e: float, eta_p: float) -> dict[str, float]:
    """Apply ``uce_edit`` to every projection in place (v* = W_old times the guide keys, per projection); return
    the mean relative erase residual ||W_new c - v*|| / ||v*|| and preserve drift
    ||(W_new - W_old) c_j|| / ||W_old c_j||."""
    residual, drift = [], []
    with torch.no_grad():
        for module in projections.values():
            W_old = module.weight.detach().clone()
            k, g, p = (x.to(W_old.device, W_old.dtype) for x in (erase_keys, guide_keys, preserve_keys))
            values = g @ W_old.T
            W_new = uce_edit(W_old, k, values, p, lam, eta_e, eta_p)
            module.weight.copy_(W_new)
            residual.append(((k @ W_new.T - values).norm() / values.norm().clamp_min(1e-12)).item())
            if len(p):
                drift.append(((p @ (W_new - W_old).T).norm() / (p @ W_old.T).norm().clamp_min(1e-12)).item())
    return {"erase_residual": sum(residual) / len(residual),
            "preserve_drift": sum(drift) / len(drift) if drift else 0.0}


class UCEMethod:
    """The UNet whose attn2.to_k / to_v weights are edited in closed form (they are its only parameters that
    require grad: what a checkpoint holds). ``iterations`` closed-form steps; ``solve_step(i)`` runs step i."""

    iterations = 1

    def __init__(self, cfg: UCEConfig, device: torch.device | str = "cpu", process_index: int = 0,
                 num_processes: int = 1):
        self.cfg = cfg
        self.base = common.load_base(cfg.model.pretrained, cfg.model.revision, device, cfg.learned_embeds,
                                     single_file_config=cfg.model.single_file_config)
        common.require_family(self.base, "UCE")
        self.model = self.base.unet
        self.model.requires_grad_(False)
        self.projections = kv_projections(self.model)
        for module in self.projections.values():
            module.weight.requires_grad_(True)
        self.trainable_names = [f"{name}.weight" for name in self.projections]
        self.model.eval()
        self.resolution = self.base.default_resolution
        s = cfg.uce
        self.pairs = erase_pairs(cfg.concepts, s)
        self.prompts = PromptRows(self.base, [p for pair in self.pairs for p in pair] + list(s.preserve_prompts))
        self.history: list[dict] = []

    def uce_keys(self, s: UCESettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Erase keys, guide keys (row-paired with them) and preserve keys of the settings ``s``."""
        pairs = [self.prompts.pair(e, g, s.token_rows) for e, g in self.pairs]
        erase = torch.cat([a for a, _ in pairs])
        guide = torch.cat([b for _, b in pairs])
        preserve = [self.prompts.keys(p, s.token_rows) for p in s.preserve_prompts]
        return erase, guide, torch.cat(preserve) if preserve else erase.new_zeros((0, erase.shape[1]))

    # the closed-form runner's interface

    def solve_step(self, iteration: int) -> dict[str, float]:
        s = self.cfg.uce
        logs = edit_all(self.projections, *self.uce_keys(s), s.lam, s.erase_scale, s.preserve_scale)
        self.history.append({"iteration": iteration, **logs})
        return {"loss": logs["erase_residual"], **logs}

    def summary(self) -> dict:
        return {"edits": self.history} if self.history else {}

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The steps' numbers so far, as JSON bytes: a resumed run's summary lists every step, not only its own."""
        return {"edits_json": torch.tensor(list(to_json(self.history).encode()), dtype=torch.uint8)}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if "edits_json" in state:
            self.history = json.loads(bytes(state["edits_json"].tolist()).decode())

    def export_unet(self):
        return self.model

    def validation_images(self):
        prompts = common.default_prompts(self.cfg.concepts, self.cfg.tracking)
        return common.validation_images(self.base, self.export_unet(), prompts, self.cfg.tracking, self.resolution)

    def card(self) -> ModelCard:
        cfg, s = self.cfg, self.cfg.uce
        return ModelCard(
            base_model=cfg.model.pretrained,
            method=f"UCE (closed form, {s.token_rows} token rows, lambda={s.lam:g})",
            concepts=list(cfg.concepts),
            steps=self.iterations,
            finetune="attn2.to_k, attn2.to_v (closed-form edit)",
            hyperparameters=dataclasses.asdict(s),
            exported="the edited model",
        )

    def export(self, output_dir: str) -> dict[str, str]:
        return common.export_unet(output_dir, self.base, self.export_unet(), self.cfg, self.card())
