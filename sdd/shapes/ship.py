"""Install a trained ShapesWorld pipeline as the packaged ``shapes`` model (``sdd/assets/shapes-base``), or one of
the SD3 kind (``family: sd3``) wherever ``dest`` says.

UNet (SD3: transformer) and VAE are stored in fp16 (diffusers loads them back as fp32), the text encoders in fp32
(transformers would keep fp16, which the fp32 denoiser cannot take). Rows of each CLIP token-embedding table for
words that never occur in ShapesWorld captions are set to zero: such words carry no meaning in this world, and the
file compresses. The SD3 kind's zero T5 is kept as it is.
"""

from __future__ import annotations

import os

import torch

from sdd.files import atomic_path
from sdd.models import SHAPES_MODEL_DIR, load_components
from sdd.shapes import world


def world_token_ids(tokenizer) -> set[int]:
    texts = [t.format(colour=c, shape=s) for t in (*world.BOTH_TEMPLATES, *world.COLOUR_TEMPLATES,
                                                   *world.SHAPE_TEMPLATES)
             for c in world.COLOURS for s in world.SHAPES]
    ids = set()
    for text in ["", *texts]:
        ids.update(tokenizer(text).input_ids)
    return ids


def zero_unused_rows_(text_encoder, tokenizer) -> None:
    keep = torch.tensor(sorted(world_token_ids(tokenizer)))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        mask = torch.ones(table.shape[0], dtype=torch.bool)
        mask[keep] = False
        table[mask] = 0.0


def ship(pipeline_dir: str, dest: str | None = None) -> str:
    import dataclasses

    from diffusers import StableDiffusionPipeline

    dest = dest or SHAPES_MODEL_DIR
    parts = load_components(pipeline_dir)
    zero_unused_rows_(parts.text_encoder, parts.tokenizer)
    if parts.family_name == "sd3":
        zero_unused_rows_(parts.text_encoder_2, parts.tokenizer_2)
        pipe = parts.family.pipeline(dataclasses.replace(parts, vae=parts.vae.half(), unet=parts.unet.half()))
    else:
        pipe = StableDiffusionPipeline(
            vae=parts.vae.half(), text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
            unet=parts.unet.half(), scheduler=parts.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    with atomic_path(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        readme = os.path.join(pipeline_dir, "..", "README.md")
        if os.path.isfile(readme):
            with open(readme) as src, open(os.path.join(tmp, "README.md"), "w") as dst:
                dst.write(src.read())
    return dest
