"""Frozen CLIP image embeddings for the HFI reward model, computed once per image and cached on disk.

The embedding model is any CLIP vision tower that transformers loads: a ``CLIPModel`` checkpoint (e.g.
``openai/clip-vit-large-patch14``, the model of the authors' annotation prototype), a
``CLIPVisionModelWithProjection`` or a plain ``CLIPVisionModel`` folder or hub id; ``tiny-random`` builds a
randomly initialised CLIP in code (tests and offline smoke runs; ``sdd.clip.tiny_clip``).

Which vector: ``projected`` = visual_projection(pooled output), CLIP's joint image-text space (what
``CLIPModel.get_image_features`` returns); ``pooled`` = the vision tower's pooled output (post-layernorm CLS
token), for checkpoints without a projection; ``auto`` = projected when the checkpoint has a projection.
``normalize`` divides each vector by its L2 norm (as CLIP compares embeddings, and as LAION's aesthetic MLP is
trained).

Without a CLIP (offline, or a world no CLIP has seen): ``unet:MODEL`` (``unet:shapes``, any model ``sdd.models``
loads) embeds an image with a diffusion model's own UNet, ``unet-mid``: the image's latent noised to
t = ``UNET_T`` with one fixed noise (seed ``UNET_NOISE_SEED``, the same for every image, so an embedding is a
function of the image alone), the UNet called with the empty prompt, and its middle block's output pooled over
space (mean and max, concatenated: 2C values). Diffusion features read what the model was trained to draw (a
linear probe separates ShapesWorld's red-or-yellow triangles from the rest of the generated images at 0.96 with
them, 0.80 with the random tiny CLIP, against 0.82 for always answering no).

Cache: one safetensors file per embedding model and setting, ``{sha256 of the image file's bytes: (D,)}``, so a
re-run, another annotator's labels or the inversion step never embed an image twice, and an edited image is
embedded again.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from sdd.errors import UserError
from sdd.files import file_sha256, to_json

TINY_RANDOM = "tiny-random"
DEFAULT_EMBEDDER = "openai/clip-vit-large-patch14"
UNET_PREFIX = "unet:"
UNET_T = 100  # the noise level of unet-mid embeddings (of the model's 1000 training steps)
UNET_NOISE_SEED = 0


@dataclass
class EmbedderConfig:
    model: str = DEFAULT_EMBEDDER  # a CLIPModel / CLIPVisionModel[WithProjection] folder or hub id, tiny-random,
    # or unet:MODEL (a diffusion model's own middle-block features)
    embedding: Literal["auto", "projected", "pooled", "unet-mid"] = "auto"
    normalize: bool = True  # L2-normalise every embedding
    batch_size: int = 32
    cache_dir: Optional[str] = None  # default: chosen by the caller (the reward run: FEEDBACK_DIR/embed-cache)


def _processor_class():
    """transformers' PIL-based CLIP image processor (5.x: ``CLIPImageProcessorPil``; 4.x: the plain one)."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    return cls


class CachedEmbedder:
    """What every embedder shares: ``describe()`` names its vectors, ``embed(images)`` computes them, and
    ``embed_files`` goes through the on-disk cache."""

    model: str
    embedding: str

    def describe(self) -> dict:
        """What identifies these embeddings (written into the reward model's config and the cache name)."""
        return {"model": self.model, "embedding": self.embedding, "normalize": self.normalize}

    def cache_file(self, cache_dir: str) -> str:
        key = to_json(self.describe(), sort_keys=True)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model.strip("/").split("/")[-1])[:40]
        return os.path.join(cache_dir, f"{slug}-{self.embedding}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
                                       ".safetensors")

    def embed_files(self, paths: Sequence[str], cache_dir: Optional[str] = None) -> torch.Tensor:
        """(N, D) embeddings of image files; with ``cache_dir``, only images not in the cache are embedded."""
        if cache_dir is None:
            return self.embed(list(paths))
        from safetensors.torch import load_file, save_file

        from sdd.files import atomic_path

        digests = [file_sha256(p) for p in paths]
        path = self.cache_file(cache_dir)
        cache = load_file(path) if os.path.isfile(path) else {}
        missing = sorted({d: p for d, p in zip(digests, paths) if d not in cache}.items())
        if missing:
            new = self.embed([p for _, p in missing])
            cache.update({d: e.contiguous() for (d, _), e in zip(missing, new)})
            os.makedirs(cache_dir, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(cache, tmp, metadata={"embedder": to_json(self.describe())})
        return torch.stack([cache[d] for d in digests]) if digests else torch.empty(0, self.dim)


class ImageEmbedder(CachedEmbedder):
    """A frozen CLIP vision tower and its image processor: ``embed(images) -> (N, D)`` float32 on CPU."""

    def __init__(self, vision, projection, processor, model: str, embedding: str, normalize: bool,
                 batch_size: int = 32):
        self.vision = vision.eval().requires_grad_(False)
        self.projection = projection.eval().requires_grad_(False) if projection is not None else None
        self.processor = processor
        self.model = model
        self.embedding = embedding  # resolved: projected | pooled
        self.normalize = normalize
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg: EmbedderConfig, device="cpu") -> CachedEmbedder:
        """The embedder ``cfg`` names: a CLIP vision tower, or (``unet:MODEL``) a diffusion model's UNet."""
        if cfg.model.startswith(UNET_PREFIX):
            return UNetEmbedder.from_config(cfg, device)
        if cfg.embedding == "unet-mid":
            raise UserError(f"embedder.embedding unet-mid: takes embedder.model=unet:MODEL, not {cfg.model}")
        vision, projection, processor = load_clip_vision(cfg.model)
        embedding = cfg.embedding
        if embedding == "auto":
            embedding = "projected" if projection is not None else "pooled"
        if embedding == "projected" and projection is None:
            raise UserError(f"embedder.model {cfg.model}: has no visual projection; use embedder.embedding=pooled")
        vision.to(device)
        if projection is not None:
            projection.to(device)
        return cls(vision, projection if embedding == "projected" else None, processor, cfg.model, embedding,
                   cfg.normalize, cfg.batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @property
    def dim(self) -> int:
        if self.projection is not None:
            return int(self.projection.out_features)
        return int(self.vision.config.hidden_size)

    @torch.no_grad()
    def embed(self, images: Sequence) -> torch.Tensor:
        """(N, D) embeddings of PIL images, arrays or file paths (``sdd.images.load_rgb`` formats)."""
        from sdd.images import load_rgb_many

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = load_rgb_many(images[start : start + self.batch_size])
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            e = self.vision(pixel_values=pixels.to(next(self.vision.parameters()).dtype)).pooler_output
            if self.projection is not None:
                e = self.projection(e)
            e = e.float()
            if self.normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            out.append(e.cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)


class UNetEmbedder(CachedEmbedder):
    """``unet:MODEL``: a diffusion model's middle-block features of a lightly noised image (module docstring)."""

    def __init__(self, components, model: str, normalize: bool, batch_size: int = 32):
        self.components = components
        self.model = model
        self.embedding = "unet-mid"
        self.normalize = normalize
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg: EmbedderConfig, device="cpu") -> "UNetEmbedder":
        from sdd.models import load_components

        if cfg.embedding not in ("auto", "unet-mid"):
            raise UserError(f"embedder.embedding {cfg.embedding}: a UNet embeds as unet-mid (or auto), "
                            f"not as a CLIP does")
        components = load_components(cfg.model[len(UNET_PREFIX):])
        if getattr(components.unet, "mid_block", None) is None or components.family.name == "sd3":
            raise UserError(f"embedder.model {cfg.model}: unet-mid reads a UNet's middle block, and this "
                            f"{components.family.name} model has none (a CLIP embedder serves every model)")
        if components.vae is None:
            raise UserError(f"embedder.model {cfg.model}: the model has no VAE to encode images with")
        for part in (components.unet, components.vae, *components.text_encoders):
            part.eval().requires_grad_(False)
        return cls(components.to(device), cfg.model, cfg.normalize, cfg.batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.components.unet.parameters()).device

    @property
    def dim(self) -> int:
        return 2 * int(self.components.unet.config.block_out_channels[-1])

    @torch.no_grad()
    def embed(self, images: Sequence) -> torch.Tensor:
        import numpy as np

        from sdd.images import load_rgb_many

        c = self.components
        size = c.unet.config.sample_size * (2 ** (len(c.vae.config.block_out_channels) - 1))
        conditioning = c.family.encode(c, [""], self.device)
        features: list[torch.Tensor] = []
        hook = c.unet.mid_block.register_forward_hook(lambda module, args, output: features.append(output))
        out = []
        try:
            for start in range(0, len(images), self.batch_size):
                batch = [im.resize((size, size)) if im.size != (size, size) else im
                         for im in load_rgb_many(images[start : start + self.batch_size])]
                pixels = torch.tensor(np.stack([np.asarray(im) for im in batch]), dtype=torch.float32)
                pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1).to(self.device, c.vae.dtype)
                z = c.vae.encode(pixels).latent_dist.mean * c.vae.config.scaling_factor
                noise = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(UNET_NOISE_SEED))
                t = torch.full((len(z),), UNET_T, dtype=torch.long, device=self.device)
                z_t = c.scheduler.add_noise(z, noise.to(z).expand_as(z), t)
                features.clear()
                c.family.denoise(c.unet, z_t, t, conditioning.expand(len(z), *conditioning.shape[1:]))
                mid = features[-1].float()
                e = torch.cat([mid.mean(dim=(2, 3)), mid.amax(dim=(2, 3))], dim=1)
                if self.normalize:
                    e = torch.nn.functional.normalize(e, dim=-1)
                out.append(e.cpu())
        finally:
            hook.remove()
        return torch.cat(out) if out else torch.empty(0, self.dim)


def load_clip_vision(model: str):
    """(vision tower, visual projection or None, image processor) of a CLIP checkpoint or ``tiny-random``."""
    if model == TINY_RANDOM:
        from sdd.clip import tiny_clip

        enc = tiny_clip(image_size=32, projection_dim=16, seed=0)
        return enc.model.vision_model, enc.model.visual_projection, enc.image_processor
    from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as transformers_logging

    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
    path = os.path.expanduser(model)
    if looks_local and not os.path.isdir(path):
        raise UserError(f"embedder.model: no such model folder: {model}")
    transformers_logging.disable_progress_bar()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # loading a vision tower out of a CLIPModel lists the text keys
    try:
        config = AutoConfig.from_pretrained(path)
        if isinstance(config, CLIPConfig):  # the vision tower and projection of a full CLIP checkpoint
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
        elif isinstance(config, CLIPVisionConfig):
            vision_config = config
        else:
            raise UserError(f"embedder.model {model}: a {type(config).__name__}, expected a CLIP checkpoint")
        net, info = CLIPVisionModelWithProjection.from_pretrained(
            path, config=vision_config, use_safetensors=True, output_loading_info=True
        )
        processor = _processor_class().from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"embedder.model {model}: cannot load it ({first})") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    has_projection = "visual_projection.weight" not in set(info.get("missing_keys", ()))
    return net.vision_model, (net.visual_projection if has_projection else None), processor
