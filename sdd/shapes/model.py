"""The ShapesWorld text-to-image model: Stable Diffusion's architecture, scaled down to 32x32 images.

- AutoencoderKL, 32x32x3 <-> 16x16x4 (one downsampling), trained on ShapesWorld images;
- UNet2DConditionModel on 16x16x4 latents, channels 32/64/64, cross-attention at 8x8, 4x4 and the middle;
- CLIPTextModel (3 layers, width 32) over the real CLIP vocabulary, trained jointly with the UNet;
- the SD-1.x noise schedule (scaled_linear, 0.00085 to 0.012, 1000 steps), sampled with DDIM.

Weights in `StableDiffusionPipeline` format: everything in the framework runs on it unchanged.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdd.models import SDComponents, load_tokenizer, sd_ddim_scheduler, tiny_vae

TEXT_WIDTH = 32


def build_vae() -> AutoencoderKL:
    return tiny_vae(32)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers reads this as the number of heads for this UNet class
        norm_num_groups=32,
    )


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=TEXT_WIDTH,
        )
    )


def build_scheduler() -> DDIMScheduler:
    return sd_ddim_scheduler(num_train_timesteps=1000)


def build_untrained(seed: int = 0, vae: AutoencoderKL | None = None) -> SDComponents:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, text_encoder = build_unet(), build_text_encoder()
        vae = vae if vae is not None else build_vae()
    return SDComponents(unet, text_encoder, load_tokenizer(), build_scheduler(), vae, source="shapes-untrained")


# --- the SD3 kind (model.pretrained: shapes-sd3) -------------------------------------------------------------
#
# SD3's architecture scaled down the same way: an SD3Transformer2DModel (MMDiT, 2x2 patches of the 16x16x4
# latents: 64 image tokens), two CLIPTextModelWithProjection encoders trained jointly with it (an "L" 32 wide and
# a "G" 48 wide, as G is wider than L; 3 layers each, as the UNet model's encoder) and, in the T5 slot, a T5 that
# outputs zeros (no layers, its final norm's weight 0; 8 k parameters, frozen): exactly the pipeline's T5-less
# mode (``text_encoder_3=None`` gives 256 zero rows of ``joint_attention_dim``), which SD3 was trained to support
# (each encoder dropped independently in its training), while the stock ``from_pretrained`` still finds all three
# encoders. Training feeds those zero rows directly (the same numbers, without running the T5). The CLIP
# concatenation is exactly ``joint_attention_dim`` (80) wide, so nothing is padded or cut; the pooled embedding is
# the two projections (80). Flow matching on FlowMatchEulerDiscreteScheduler with shift 1 (32 px images: SD3's
# shift 3 is for 1024 px), the VAE of the UNet model (shift 0).

SD3_CLIP_WIDTHS = (32, 48)
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0}


def build_sd3_transformer(num_layers: int = 4, num_attention_heads: int = 4, attention_head_dim: int = 16,
                          patch_size: int = 2):
    from diffusers import SD3Transformer2DModel

    width = sum(SD3_CLIP_WIDTHS)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        caption_projection_dim=num_attention_heads * attention_head_dim, joint_attention_dim=width,
        pooled_projection_dim=width, pos_embed_max_size=16 // patch_size,
    )


def build_sd3_text_encoders(num_hidden_layers: int = 3, hidden_act_l: str = "gelu"):
    from transformers import CLIPTextModelWithProjection

    return tuple(
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=num_hidden_layers,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407 if i == 0 else 0, projection_dim=width,
                hidden_act=hidden_act_l if i == 0 else "gelu",
            )
        )
        for i, width in enumerate(SD3_CLIP_WIDTHS)
    )


def text_init_config(source: str) -> CLIPTextConfig:
    """The config of the ``CLIPTextModel`` folder ``flow.text_init`` names (one line if it is not one)."""
    from sdd.errors import UserError

    if not os.path.isfile(os.path.join(source, "config.json")):
        raise UserError(f"flow.text_init: not a CLIPTextModel folder (no config.json): {source}")
    return CLIPTextConfig.from_pretrained(source)


def init_clip_l_from(text_encoder, source: str) -> None:
    """Start the SD3 kind's CLIP-L from a trained ``CLIPTextModel`` folder (the UNet model's encoder, as SD3
    starts from a pretrained CLIP): its ``text_model`` weights, and the projection as the identity, so the pooled
    vector is the source's final EOS state. The source must have CLIP-L's shape (width 32, the same layers); CLIP-L
    is built with the source's activation (:func:`build_untrained_sd3`)."""
    from sdd.errors import UserError

    mine, theirs = text_encoder.config, text_init_config(source)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "hidden_act"):
        if getattr(mine, key) != getattr(theirs, key):
            raise UserError(f"flow.text_init: {source} has {key} {getattr(theirs, key)}, CLIP-L needs "
                            f"{getattr(mine, key)} (flow.text_layers sets the layers)")
    src = CLIPTextModel.from_pretrained(source, use_safetensors=True)
    text_encoder.text_model.load_state_dict(getattr(src, "text_model", src).state_dict())
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(mine.hidden_size))


def build_zero_t5():
    """A T5 encoder in the SD3 T5 slot whose output is exactly zero (0 layers, final RMSNorm weight 0)."""
    from transformers import T5Config, T5EncoderModel

    from sdd.models import tiny_t5_tokenizer

    t5 = T5EncoderModel(T5Config(d_model=sum(SD3_CLIP_WIDTHS), d_ff=8, d_kv=8, num_heads=1, num_layers=0,
                                 vocab_size=len(tiny_t5_tokenizer()), relative_attention_num_buckets=8))
    torch.nn.init.zeros_(t5.encoder.final_layer_norm.weight)
    return t5.eval().requires_grad_(False)


def build_sd3_scheduler(shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{**SD3_SCHEDULER_CONFIG, "shift": shift})


def build_untrained_sd3(seed: int = 0, vae: AutoencoderKL | None = None, num_layers: int = 4,
                        num_attention_heads: int = 4, attention_head_dim: int = 16,
                        text_layers: int = 3, shift: float = 1.0, text_init: str | None = None) -> SDComponents:
    from transformers import CLIPTokenizer

    from sdd.models import TOKENIZER_DIR, tiny_t5_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_sd3_transformer(num_layers, num_attention_heads, attention_head_dim)
        act = text_init_config(text_init).hidden_act if text_init else "gelu"
        text_encoder, text_encoder_2 = build_sd3_text_encoders(text_layers, act)
        vae = vae if vae is not None else build_vae()
    if text_init:
        init_clip_l_from(text_encoder, text_init)
    if vae.config.shift_factor is None:  # the SD3 pipeline decodes z / scaling + shift
        vae.register_to_config(shift_factor=0.0)
    return SDComponents(transformer, text_encoder, load_tokenizer(), build_sd3_scheduler(shift), vae,
                        source="shapes-sd3-untrained", family_name="sd3", text_encoder_2=text_encoder_2,
                        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"),
                        text_encoder_3=build_zero_t5(), tokenizer_3=tiny_t5_tokenizer())
