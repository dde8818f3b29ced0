"""Image metrics of the evaluation protocols (docs/METHODS.md §5.5): CLIP score, FID, LPIPS.

Pure math first (tensors / arrays in, numbers out), then the small classes that load a model, turn images into
its inputs and state their exact ``criterion()``:

- ``ClipScore``: w · cos(image, "A photo depicts " + prompt), optionally w · max(cos, 0).
- ``ClipFid``: Fréchet distance between Gaussians fitted to CLIP image embeddings. Not Inception FID: without
  torchvision no Inception weights can be had here, so numbers are not comparable with published FIDs.
- ``Lpips``: LPIPS-AlexNet between an image and the base model's image for the same prompt and seed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

import numpy as np
import torch

from sdd.errors import UserError
from sdd.images import ImageInput, Resample, load_rgb, resize_center_crop, to_tensor

if TYPE_CHECKING:
    from sdd.clip import ClipEncoder
    from sdd.eval.lpips import LpipsAlex

# ---------------------------------------------------------------------------------------------- CLIP score

CLIP_SCORE_PREFIX = "A photo depicts "  # SDD evaluate/eval_clipscore.py (after Hessel et al. 2021)
SDD_W = 1.0  # SDD's reported numbers (~0.27): w = 1, no clipping
HESSEL_W = 2.5  # CLIPScore as defined by Hessel et al. 2021: 2.5 · max(cos, 0)


def clip_score(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, w: float = SDD_W, clamp_at_zero: bool = False
) -> torch.Tensor:
    """Per-pair CLIP score: w · cos(e_img, e_txt), or w · max(cos(e_img, e_txt), 0) with ``clamp_at_zero``.

    ``image_embeds`` and ``text_embeds``: (N, D) projected CLIP features of matching pairs. Returns (N,).
    SDD (nannullna/safe-diffusion evaluate/eval_clipscore.py): w = 1, no clamp. Hessel et al. 2021: w = 2.5,
    clamp.
    """
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return w * (cos.clamp_min(0.0) if clamp_at_zero else cos)


class ClipScore:
    """CLIP score of images against their prompts (each prompt prefixed with ``prefix``)."""

    name = "clip_score"

    def __init__(
        self, encoder: "ClipEncoder", w: float = SDD_W, clamp_at_zero: bool = False, prefix: str = CLIP_SCORE_PREFIX
    ):
        if encoder.tokenizer is None:
            raise ValueError("ClipScore needs a ClipEncoder with a tokenizer")
        self.encoder, self.w, self.clamp_at_zero, self.prefix = encoder, float(w), clamp_at_zero, prefix

    @classmethod
    def from_pretrained(cls, clip: Optional[str] = None, device: str = "cpu", **kwargs) -> "ClipScore":
        from sdd.clip import DEFAULT_CLIP, ClipEncoder

        return cls(ClipEncoder.from_pretrained(clip or DEFAULT_CLIP, device=device, text=True), **kwargs)

    def criterion(self) -> str:
        rule = f"{self.w:g} x max(cos, 0)" if self.clamp_at_zero else f"{self.w:g} x cos (no clipping)"
        return (
            f"CLIP score = {rule} between projected image and text features of {self.encoder.describe()}; "
            f"text = {self.prefix!r} + prompt, padded/truncated to 77 tokens; per image, averaged over images"
        )

    def __call__(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) scores, one per (image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        texts = [self.prefix + p for p in prompts]
        image_embeds, text_embeds = self.encoder.image_embeds(images), self.encoder.text_embeds(texts)
        return clip_score(image_embeds, text_embeds, self.w, self.clamp_at_zero)


# --------------------------------------------------------------------------------------------------- FID


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64 (as pytorch-fid: np.cov, rowvar=False)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise UserError(f"FID needs at least 2 feature vectors per set, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; Heusel et al. 2017):

        d² = ||mu1 − mu2||² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½)

    Numerics as pytorch-fid: ``scipy.linalg.sqrtm`` of sigma1·sigma2 in float64; if the result is not finite
    (singular product, e.g. fewer samples than dimensions) retry with eps·I added to both covariances; an
    imaginary part from round-off is dropped if its diagonal is within 1e-3 of zero, else it is an error.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class ClipFid:
    """FID over CLIP image embeddings (projected, not normalised): ``distance(features(a), features(b))``."""

    name = "fid_clip"

    def __init__(self, encoder: "ClipEncoder"):
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, clip: Optional[str] = None, device: str = "cpu") -> "ClipFid":
        from sdd.clip import DEFAULT_CLIP, ClipEncoder

        return cls(ClipEncoder.from_pretrained(clip or DEFAULT_CLIP, device=device, text=False))

    def criterion(self) -> str:
        return (
            "FID-CLIP: Frechet distance ||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (float64, scipy.linalg.sqrtm, "
            "imaginary round-off dropped) between Gaussians fitted to the image embeddings (visual projection, "
            f"not normalised) of {self.encoder.describe()}, images resized (bicubic, shorter side) and "
            f"centre-cropped to {self.encoder.image_size} px by its CLIP processor; not Inception FID, not "
            "comparable with published FID numbers"
        )

    def features(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self.encoder.image_embeds(images).double().numpy()

    def distance(self, features_a: np.ndarray, features_b: np.ndarray) -> float:
        return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))

    def __call__(self, images_a: Sequence[ImageInput], images_b: Sequence[ImageInput]) -> float:
        return self.distance(self.features(images_a), self.features(images_b))


# ------------------------------------------------------------------------------------------------- LPIPS

LPIPS_SIZE_SDD = 256  # SDD evaluate/utils.py get_transform: bicubic resize + centre crop to 256
LPIPS_SIZE_ESD = 64  # ESD eval-scripts/lpips_eval.py: Resize(64), bilinear


class Lpips:
    """LPIPS-AlexNet between image pairs, both resized to ``size`` (shorter side) and centre-cropped."""

    name = "lpips"

    def __init__(
        self,
        net: "LpipsAlex",
        size: int = LPIPS_SIZE_SDD,
        resample: Resample = "bicubic",
        weights_source: str = "in memory",
        batch_size: int = 16,
    ):
        if resample not in ("bicubic", "bilinear"):
            raise UserError(f"lpips resample '{resample}': expected 'bicubic' or 'bilinear'")
        if size < 32:
            raise UserError(f"lpips size {size}: AlexNet needs at least 32 px")
        self.net, self.size, self.resample = net.eval(), int(size), resample
        self.weights_source, self.batch_size = weights_source, batch_size

    @classmethod
    def from_file(cls, weights: Union[str, os.PathLike], **kwargs) -> "Lpips":
        from sdd.eval.lpips import load_lpips_alex

        return cls(load_lpips_alex(weights), weights_source=os.fspath(weights), **kwargs)

    @classmethod
    def protocol(cls, weights: Union[str, os.PathLike], which: Literal["sdd", "esd"] = "sdd") -> "Lpips":
        """SDD's transform (256 px, bicubic) or ESD's (64 px, bilinear), METHODS.md §5.5."""
        if which == "sdd":
            return cls.from_file(weights, size=LPIPS_SIZE_SDD, resample="bicubic")
        return cls.from_file(weights, size=LPIPS_SIZE_ESD, resample="bilinear")

    def criterion(self) -> str:
        return (
            "LPIPS v0.1, AlexNet backbone (relu1-5, unit-normalised over channels, squared difference, learned "
            f"1x1 heads, spatial mean, summed over layers), weights {self.weights_source}; both images RGB, "
            f"resized ({self.resample}, shorter side) and centre-cropped to {self.size} px, scaled to [-1, 1]; "
            "pairs = same prompt and seed, method vs. base model"
        )

    def prepare(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Nx3xSxS in [-1, 1]."""
        crops = [resize_center_crop(load_rgb(im), self.size, self.resample) for im in images]
        return to_tensor(crops) * 2.0 - 1.0

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageInput], references: Sequence[ImageInput]) -> torch.Tensor:
        """(N,) LPIPS distance of each image to its reference (the base model's image, same prompt and seed)."""
        if len(images) != len(references):
            raise ValueError(f"{len(images)} images but {len(references)} references")
        device = next(self.net.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            x0 = self.prepare(images[start : start + self.batch_size]).to(device)
            x1 = self.prepare(references[start : start + self.batch_size]).to(device)
            out.append(self.net(x0, x1).float().cpu())
        return torch.cat(out) if out else torch.empty(0)
