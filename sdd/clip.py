"""One CLIP model for Q16, the CLIP score and CLIP-feature FID: projected image and text embeddings.

Embeddings are what ``CLIPModel.get_image_features`` / ``get_text_features`` return (the pooled output through
the visual / text projection, not normalised), computed from the sub-modules directly so the result does not
depend on the transformers version (4.x returns a tensor, 5.x an output object). Images go through the model's
own ``CLIPImageProcessor`` (bicubic resize of the shorter side, centre crop, CLIP mean/std), as the reference
evaluation scripts do.

Weights are never downloaded by this package's tests: a user passes a local folder or a hub id
(``openai/clip-vit-large-patch14``), and tests build ``CLIPModel(CLIPConfig(...))`` with random weights.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from sdd.errors import UserError
from sdd.images import ImageInput, load_rgb_many

if TYPE_CHECKING:
    from transformers import CLIPModel

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # SDD's CLIP score and I2P's Q16 both use ViT-L/14
TEXT_MAX_LENGTH = 77


def _processor_class():
    """transformers' PIL-based CLIP image processor: 5.x names it ``CLIPImageProcessorPil`` (its plain
    ``CLIPImageProcessor`` wants torchvision, which this project cannot install); in 4.x the plain one is it."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    return cls


def clip_image_processor(**kwargs: Any):
    return _processor_class()(**kwargs)


class ClipEncoder:
    """A ``CLIPModel`` with its image processor (and tokenizer, for text): embeddings as float32 CPU tensors."""

    def __init__(
        self,
        model: "CLIPModel",
        image_processor: Any,
        tokenizer: Any = None,
        source: str = "in-memory CLIPModel",
        batch_size: int = 16,
    ):
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.source = source
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str = DEFAULT_CLIP,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        text: bool = True,
        batch_size: int = 16,
    ) -> "ClipEncoder":
        """Load model, image processor and (``text=True``) tokenizer from a folder or hub id."""
        from transformers import CLIPModel, CLIPTokenizer

        looks_local = os.path.isabs(path_or_id) or path_or_id.startswith((".", "~"))
        if looks_local and not os.path.isdir(os.path.expanduser(path_or_id)):
            raise UserError(f"CLIP model '{path_or_id}': no such model folder")
        try:
            # weights only from safetensors, as everywhere in this package (no pickled .bin)
            model = CLIPModel.from_pretrained(os.path.expanduser(path_or_id), dtype=dtype, use_safetensors=True)
            processor = _processor_class().from_pretrained(os.path.expanduser(path_or_id))
            tokenizer = CLIPTokenizer.from_pretrained(os.path.expanduser(path_or_id)) if text else None
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"CLIP model '{path_or_id}': cannot load it ({first})") from None
        return cls(model.to(device), processor, tokenizer, source=path_or_id, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def describe(self) -> str:
        return f"CLIP '{self.source}' (projection {self.projection_dim}-d, images {self.image_size} px)"

    @torch.no_grad()
    def image_embeds(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(N, projection_dim): visual_projection(vision_model(pixels).pooler_output), not normalised."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = load_rgb_many(images[start : start + self.batch_size])
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.projection_dim)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, projection_dim): text_projection(text_model(tokens).pooler_output), not normalised.

        Tokens padded to and truncated at 77, as SDD's ``eval_clipscore.py`` does.
        """
        if self.tokenizer is None:
            raise ValueError("this ClipEncoder has no tokenizer; build it with text=True")
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=TEXT_MAX_LENGTH,
                return_tensors="pt",
            )
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            ).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.projection_dim)


def tiny_clip(
    image_size: int = 32, projection_dim: int = 16, seed: int = 0, tokenizer: Optional[Any] = None
) -> ClipEncoder:
    """A randomly initialised CLIP of the same classes (tests and smoke runs; no download)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            vocab_size=49408, max_position_embeddings=TEXT_MAX_LENGTH, eos_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    processor = clip_image_processor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return ClipEncoder(CLIPModel(config), processor, tokenizer, source=f"tiny random CLIP (seed {seed})")
