"""Stable Diffusion components: loaded from a diffusers folder / hub id / single file, or built tiny in code
(``tiny``: SD-1.x, ``tiny-sd2v``: SD-2.x with v-prediction, ``tiny-sdxl``: SDXL, ``tiny-sd3``: SD3, ``tiny-flux``:
FLUX.1-dev), or built full size with random weights for speed and memory measurements (``sd15-random``: SD-1.5,
``sdxl-random``: SDXL base 1.0).

Only safetensors are ever loaded (``use_safetensors=True``); pickled ``.bin``/``.ckpt`` weights are refused.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdd.errors import UserError
from sdd.single_file import PICKLE_SUFFIXES, load_single_file

TOKENIZER_DIR = str(resources.files("sdd") / "assets" / "clip-tokenizer")
SHAPES_MODEL_DIR = str(resources.files("sdd") / "assets" / "shapes-base")
# names model.pretrained builds or ships
BUILT_IN_MODELS = ("tiny", "tiny-sd2v", "tiny-sdxl", "tiny-sd3", "tiny-flux", "shapes", "sd15-random", "sdxl-random")


@dataclass
class SDComponents:
    unet: UNet2DConditionModel  # the denoiser: SD3's and FLUX's transformer (their pipelines' "transformer")
    text_encoder: CLIPTextModel  # FLUX: CLIP-L, of which its pipeline uses the pooled output only
    tokenizer: CLIPTokenizer
    scheduler: object  # the model's own (kept for export); training samples on a DDIM grid from it (flow: its own grid)
    vae: Optional[AutoencoderKL]
    source: str  # what `model.pretrained` named
    family_name: str = "sd"  # its model family (sdd.families): how to encode, call the denoiser, export
    text_encoder_2: Optional[torch.nn.Module] = None  # SDXL's second CLIP (with projection); FLUX's T5 encoder
    tokenizer_2: Optional[object] = None  # SDXL: a CLIPTokenizer; FLUX: T5's
    force_zeros_for_empty_prompt: bool = True  # SDXL: the empty prompt's conditioning is zeros (model_index.json)
    text_encoder_3: Optional[torch.nn.Module] = None  # SD3's T5 encoder
    tokenizer_3: Optional[object] = None

    @property
    def family(self):
        from sdd.families import family

        return family(self.family_name, self)

    @property
    def prediction(self):
        """What the denoiser's output predicts (epsilon or v) and its conversions (sdd.families.Prediction)."""
        from sdd.families import prediction_of

        return prediction_of(self.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 8
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels: the denoiser's input channels (FLUX: over the 2 x 2 patches it packs)."""
        return self.unet.config.in_channels // self.family.latent_patch**2

    @property
    def default_resolution(self) -> int:
        size = self.unet.config.get("sample_size")
        if size is None:  # FLUX's transformer has none: its VAE's image size (FLUX.1's 1024, FluxPipeline's default)
            return self.vae.config.sample_size if self.vae is not None else 1024
        return size * self.vae_scale_factor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SDComponents":
        for module in (self.unet, *self.text_encoders, self.vae):
            if module is not None:
                module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self

    @property
    def text_encoders(self) -> list:
        """The model's text encoders (one for SD-1.x/2.x, two for SDXL and FLUX, three for SD3)."""
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]


def load_tokenizer(path: str = TOKENIZER_DIR) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(path)


def tiny_unet(sample_size: int = 16, **changes) -> UNet2DConditionModel:
    """The tiny models' UNet (SD-1.x shape), with a family's ``changes`` to its config."""
    config = dict(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                  layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=32)
    return UNet2DConditionModel(**{**config, **changes})


def tiny_vae(image_size: int = 32) -> AutoencoderKL:
    """The tiny models' VAE (two blocks: latents at half the image size), also ShapesWorld's."""
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         layers_per_block=1, norm_num_groups=32, sample_size=image_size)


def tiny_text_config(**changes) -> CLIPTextConfig:
    """The tiny models' CLIP text encoder config over the real vocabulary (pooled output at the real end-of-text
    position), with a family's ``changes``."""
    config = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                  projection_dim=32)
    return CLIPTextConfig(**{**config, **changes})


def sd_ddim_scheduler(**changes) -> DDIMScheduler:
    """Stable Diffusion's DDIM scheduler (scaled-linear betas, leading grid), with ``changes``."""
    return DDIMScheduler(**{**dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1), **changes})


def build_tiny_sd(seed: int = 0, sample_size: int = 16) -> SDComponents:
    """A randomly initialised SD-1.x-shaped model (~3 M parameters) with the real CLIP vocabulary.

    Deterministic for a given seed, so every process and every test builds the same weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = tiny_unet(sample_size), tiny_vae(sample_size * 2)
        text_encoder = CLIPTextModel(tiny_text_config())
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDComponents(unet, text_encoder, load_tokenizer(), sd_ddim_scheduler(), vae, source="tiny")


def build_tiny_sd2v(seed: int = 0, sample_size: int = 16) -> SDComponents:
    """A randomly initialised SD-2.x-shaped model with v-prediction (as ``stabilityai/stable-diffusion-2-1``): the
    tiny UNet with linear projections and per-block head counts, a CLIP text encoder with GELU (OpenCLIP's, the
    last layer dropped as in the converted SD-2 checkpoints: nothing to do in code), ``"!"`` as the padding
    token, and a DDIM scheduler with ``prediction_type="v_prediction"``. Deterministic for a given seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # SD-2's config names head counts per block in attention_head_dim
        unet = tiny_unet(sample_size, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
        vae = tiny_vae(sample_size * 2)
        # pad_token_id 0: "!", OpenCLIP's padding
        text_encoder = CLIPTextModel(tiny_text_config(num_hidden_layers=4, hidden_act="gelu", pad_token_id=0))
    for module in (unet, vae, text_encoder):
        module.eval()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")
    return SDComponents(unet, text_encoder, tokenizer, sd_ddim_scheduler(prediction_type="v_prediction"), vae,
                        source="tiny-sd2v")


# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json: the DDIM keys ride along, so the partial DDIM
# sampler built from it (sdd.methods.common.ddim_grid) neither clips x0 nor sets alpha_0 = 1, as SD's
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def build_tiny_sdxl(seed: int = 0, sample_size: int = 16) -> SDComponents:
    """A randomly initialised SDXL-shaped model: the tiny UNet with ``text_time`` added conditioning, two CLIP text
    encoders (the second with a projection, ``"!"`` padding) and SDXL's Euler scheduler. Deterministic for a seed."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_unet(
            sample_size,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 48,  # time ids + the pooled projection
            cross_attention_dim=32 + 48,  # the two encoders' widths, concatenated
        )
        vae = tiny_vae(sample_size * 2)
        text_encoder = CLIPTextModel(tiny_text_config(hidden_act="quick_gelu"))
        # wider than the first, as bigG is than CLIP-L: a single file's converter tells the two apart by width
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(hidden_act="gelu", pad_token_id=0, hidden_size=48, projection_dim=48))
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return SDComponents(unet, text_encoder, load_tokenizer(), scheduler, vae, source="tiny-sdxl", family_name="sdxl",
                        text_encoder_2=text_encoder_2,
                        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"))


def tiny_t5_tokenizer():
    """A T5 tokenizer built in code, offline: transformers' own ``T5Tokenizer`` (a sentencepiece-style Unigram
    model, "▁" for spaces, ``</s>`` appended, pad 0, eos 1, unk 2) over one piece per printable ASCII character,
    so every prompt has its own ids (a word-level table would map most concept words to unk)."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.printable if not ch.isspace()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# stabilityai/stable-diffusion-3-medium-diffusers' scheduler: flow matching with a static shift of 3
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def build_tiny_sd3(seed: int = 0, sample_size: int = 16) -> SDComponents:
    """A randomly initialised SD3-shaped model (diffusers' fast-test sizes, docs/METHODS.md section 10.5, with
    three changes): an ``SD3Transformer2DModel`` of two blocks (the last is ``context_pre_only``, so one block
    also has a text stream that feeds the next), two CLIP text encoders with projections, the second wider (48,
    as G is wider than L), and a T5 encoder 96 wide: the CLIP concat (80) is zero-padded to T5's width rather than
    cut, and the pooled embedding (80) fits one conditioning row. The VAE has SD3's shift and scaling factors and
    two blocks, so latents are half the image size as in the other tiny models (32 px images). SD3-medium's
    scheduler (flow matching, shift 3). Deterministic for a seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
            joint_attention_dim=96,  # = T5's d_model
            pooled_projection_dim=32 + 48,  # the two CLIP projections, concatenated
        )
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 8), latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035, sample_size=sample_size * 2)
        text_encoder = CLIPTextModelWithProjection(tiny_text_config(hidden_act="gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(hidden_act="gelu", pad_token_id=0, hidden_size=48, projection_dim=48))
        text_encoder_3 = T5EncoderModel(T5Config(d_ff=37, d_kv=8, d_model=96, num_layers=2, num_heads=4,
                                                 relative_attention_num_buckets=8, vocab_size=1103))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()
    return SDComponents(transformer, text_encoder, load_tokenizer(), scheduler, vae, source="tiny-sd3",
                        family_name="sd3", text_encoder_2=text_encoder_2,
                        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"),
                        text_encoder_3=text_encoder_3, tokenizer_3=tiny_t5_tokenizer())


# black-forest-labs/FLUX.1-dev's scheduler: flow matching, the shift mu from the image token count
FLUX_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
    "max_shift": 1.15,
}


def build_tiny_flux(seed: int = 0, sample_size: int = 16) -> SDComponents:
    """A randomly initialised FLUX.1-dev-shaped model (diffusers' fast-test sizes, docs/METHODS.md section 10.5,
    with three changes): a ``FluxTransformer2DModel`` with ``guidance_embeds`` (dev's distilled guidance) and two
    double-stream and two single-stream blocks (so a double-stream block's text feeds the next one), CLIP-L's
    pooled output (32 wide, the shipped BPE tables with the real end-of-text id) and T5 32 wide (=
    ``joint_attention_dim``; the offline T5 tokenizer of ``tiny-sd3``). The VAE has FLUX's shift and scaling
    factors, no quant convs, 4 latent channels (the transformer reads 2 x 2 patches: 16 channels) and two blocks,
    so 32 px images have 16 x 16 latents, 64 image tokens, as the other tiny models' latents. FLUX.1-dev's
    scheduler (flow matching, dynamic shift). Deterministic for a seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * 4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),  # sums to the head dim
        )
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 8), latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.1159, scaling_factor=0.3611, sample_size=sample_size * 2)
        text_encoder = CLIPTextModel(tiny_text_config(hidden_act="gelu"))
        text_encoder_2 = T5EncoderModel(T5Config(d_ff=37, d_kv=8, d_model=32, num_layers=2, num_heads=4,
                                                 relative_attention_num_buckets=8, vocab_size=1103))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return SDComponents(transformer, text_encoder, load_tokenizer(), scheduler, vae, source="tiny-flux",
                        family_name="flux", text_encoder_2=text_encoder_2, tokenizer_2=tiny_t5_tokenizer())


def build_sd15_random(seed: int = 0) -> SDComponents:
    """Stable Diffusion 1.5's architecture (UNet 860 M, CLIP ViT-L/14 text encoder 123 M, VAE 84 M) with random
    weights, built from its config: for speed and memory measurements without downloading anything."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDComponents(unet, text_encoder, load_tokenizer(), scheduler, vae, source="sd15-random")


# SDXL base 1.0's published diffusers configs (stabilityai/stable-diffusion-xl-base-1.0: unet/, text_encoder/,
# text_encoder_2/, vae/ config.json), the keys that differ from the classes' defaults; the same numbers as the shipped
# single-file config sdd/assets/single-file/sdxl.json (tests/test_models.py compares them)
SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name for the number of heads here: 64-wide heads
    "cross_attention_dim": 2048,  # CLIP-L's 768 + bigG's 1280, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the pooled 1280
}
SDXL_TEXT_ENCODER_CONFIG = {  # CLIP ViT-L/14's text tower (token ids as that repo's config writes them)
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SDXL_TEXT_ENCODER_2_CONFIG = {  # OpenCLIP ViT-bigG/14's text tower, with its projection
    **SDXL_TEXT_ENCODER_CONFIG, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280,
}
SDXL_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}


def build_sdxl_random(seed: int = 0) -> SDComponents:
    """SDXL base 1.0's architecture (UNet 2.57 B, CLIP ViT-L text encoder 123 M, OpenCLIP bigG text encoder with
    projection 695 M, VAE 84 M) with random weights, built from its configs: for speed and memory measurements
    without downloading anything. Deterministic for a seed; 1024 px by default (128 x 128 latents). Under
    ``with torch.device("meta")`` it builds without memory (the tests)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    with torch.device("cpu"):  # the scheduler's tables are CPU tensors, also when the modules are built on meta
        scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return SDComponents(unet, text_encoder, load_tokenizer(), scheduler, vae, source="sdxl-random",
                        family_name="sdxl", text_encoder_2=text_encoder_2,
                        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"))


def _load_scheduler(pretrained: str, kwargs: dict):
    """The model's own scheduler class (PNDM for SD-1.4), so an export keeps the base model's sampler."""
    import diffusers

    config = DDIMScheduler.load_config(pretrained, subfolder="scheduler", **kwargs)
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"), DDIMScheduler)
    return cls.from_config(config)


def _describe(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def load_components(pretrained: str, revision: Optional[str] = None, *, with_vae: bool = True,
                    single_file_config: Optional[str] = None) -> SDComponents:
    """Components of an SD-1.x/2.x, SDXL, SD3 or FLUX.1 model: ``'tiny'``, ``'tiny-sd2v'``, ``'tiny-sdxl'``,
    ``'tiny-sd3'``, ``'tiny-flux'``, ``'shapes'``, ``'sd15-random'``, ``'sdxl-random'``, a diffusers folder (SDXL:
    with ``text_encoder_2/`` and ``tokenizer_2/``; SD3: ``transformer/``, ``text_encoder_3/`` and ``tokenizer_3/``;
    FLUX: ``transformer/`` and ``model_index.json`` naming ``FluxPipeline``), a hub id (``owner/name``),
    or a single-file ``.safetensors`` checkpoint in the original layout (``sdd.single_file``; its config from
    ``single_file_config``, the file, or the family its keys show)."""
    if pretrained == "tiny":
        return build_tiny_sd()
    if pretrained == "tiny-sd2v":
        return build_tiny_sd2v()
    if pretrained == "tiny-sdxl":
        return build_tiny_sdxl()
    if pretrained == "tiny-sd3":
        return build_tiny_sd3()
    if pretrained == "tiny-flux":
        return build_tiny_flux()
    if pretrained == "sd15-random":
        return build_sd15_random()
    if pretrained == "sdxl-random":
        return build_sdxl_random()
    if pretrained.lower().endswith((".safetensors",) + PICKLE_SUFFIXES) or os.path.isfile(pretrained):
        *parts, extra = load_single_file(pretrained, single_file_config, with_vae=with_vae)
        return SDComponents(*parts, source=pretrained, **extra)
    if pretrained == "shapes":
        if not os.path.isdir(SHAPES_MODEL_DIR):
            raise UserError(f"model.pretrained: the ShapesWorld model is not installed at {SHAPES_MODEL_DIR}")
        pretrained = SHAPES_MODEL_DIR
    is_local = os.path.isdir(pretrained)
    looks_like_path = pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    if not is_local and looks_like_path:
        raise UserError(f"model.pretrained: no such model folder: {pretrained}")
    if not is_local and "/" not in pretrained:
        raise UserError(
            f"model.pretrained: unknown model '{pretrained}' (built in: {', '.join(BUILT_IN_MODELS)}; "
            "or a diffusers model folder or a hub id owner/name)"
        )
    kind = _transformer_family(pretrained, {}) if is_local else None
    if kind is not None:
        label, subs = TRANSFORMER_FOLDERS[kind]
        if kind == "sd3" and not _sd3_has_t5(pretrained, {}):
            subs = tuple(sub for sub in subs if not sub.endswith("_3"))  # saved without T5 (the pipeline allows it)
        for sub in ["scheduler", *subs] + (["vae"] if with_vae else []):
            if not os.path.isdir(os.path.join(pretrained, sub)):
                raise UserError(f"model.pretrained: {pretrained} is {label} folder without '{sub}/'")
        _refuse_pickles(pretrained, [sub for sub in subs if not sub.startswith("tokenizer")]
                        + (["vae"] if with_vae else []))
    elif is_local:
        for sub in ("unet", "text_encoder", "tokenizer", "scheduler") + (("vae",) if with_vae else ()):
            if not os.path.isdir(os.path.join(pretrained, sub)):
                raise UserError(
                    f"model.pretrained: {pretrained} is not a diffusers model folder (no '{sub}/' subfolder)"
                )
        encoders = ["text_encoder"] + (["text_encoder_2"] if _is_sdxl_folder(pretrained) else [])
        for sub in encoders[1:] + ["tokenizer_2"] * (len(encoders) > 1):
            if not os.path.isdir(os.path.join(pretrained, sub)):
                raise UserError(f"model.pretrained: {pretrained} is an SDXL folder without '{sub}/'")
        _refuse_pickles(pretrained, ["unet", *encoders] + (["vae"] if with_vae else []))
    kwargs = dict(revision=revision) if revision else {}
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per component is noise
    with warnings.catch_warnings():  # the hub client warns about deprecated arguments diffusers passes
        warnings.simplefilter("ignore")
        return _load(pretrained, kwargs, is_local, with_vae)


def _model_index(pretrained: str, kwargs: dict) -> dict:
    """The folder's ``model_index.json`` (which pipeline, and its options); {} when there is none."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(pretrained, **kwargs))
    except (OSError, ValueError, EnvironmentError):
        return {}


def _sd3_has_t5(pretrained: str, kwargs: dict) -> bool:
    """False for an SD3 pipeline saved without its T5 encoder (``"text_encoder_3": [null, null]`` in its
    ``model_index.json``, as ``save_pretrained`` writes ``text_encoder_3=None``)."""
    entry = _model_index(pretrained, kwargs).get("text_encoder_3")
    return not (isinstance(entry, (list, tuple)) and entry and entry[0] is None)


def _is_sdxl_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "text_encoder_2"))


# the transformer pipelines' folders: family -> (what messages call one, its subfolders besides scheduler/ and vae/)
TRANSFORMER_FOLDERS = {
    "sd3": ("an SD3", ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                    "tokenizer_3")),
    "flux": ("a FLUX", ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")),
}
_TRANSFORMER_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def _transformer_family(pretrained: str, kwargs: dict, index: Optional[dict] = None) -> Optional[str]:
    """``sd3`` or ``flux`` for a folder or hub id of one of their pipelines (its ``model_index.json``; a local
    folder without one, with ``transformer/`` or ``text_encoder_3/``: SD3), None for a UNet pipeline."""
    index = _model_index(pretrained, kwargs) if index is None else index
    kind = _TRANSFORMER_PIPELINES.get(index.get("_class_name"))
    if kind is None and os.path.isdir(pretrained) and any(
            os.path.isdir(os.path.join(pretrained, sub)) for sub in ("transformer", "text_encoder_3")):
        kind = "sd3"
    return kind


def _load_transformer_pipeline(pretrained: str, kwargs: dict, with_vae: bool, kind: str) -> SDComponents:
    """An SD3 or FLUX folder or hub id, by the components of its pipeline (T5 included)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel, T5TokenizerFast

    def part(cls, sub):
        return cls.from_pretrained(pretrained, subfolder=sub, use_safetensors=True, **kwargs).eval()

    def tokenizer(cls, sub):
        return cls.from_pretrained(pretrained, subfolder=sub, **kwargs)

    shared = dict(scheduler=_load_scheduler(pretrained, kwargs), source=pretrained, family_name=kind,
                  vae=part(AutoencoderKL, "vae") if with_vae else None,
                  tokenizer=tokenizer(CLIPTokenizer, "tokenizer"))
    if kind == "flux":
        return SDComponents(part(FluxTransformer2DModel, "transformer"), part(CLIPTextModel, "text_encoder"),
                            text_encoder_2=part(T5EncoderModel, "text_encoder_2"),
                            tokenizer_2=tokenizer(T5TokenizerFast, "tokenizer_2"), **shared)
    has_t5 = _sd3_has_t5(pretrained, kwargs)
    return SDComponents(
        part(SD3Transformer2DModel, "transformer"), part(CLIPTextModelWithProjection, "text_encoder"),
        text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2"),
        tokenizer_2=tokenizer(CLIPTokenizer, "tokenizer_2"),
        text_encoder_3=part(T5EncoderModel, "text_encoder_3") if has_t5 else None,
        tokenizer_3=tokenizer(T5TokenizerFast, "tokenizer_3") if has_t5 else None,
        **shared)


def _load(pretrained: str, kwargs: dict, is_local: bool, with_vae: bool) -> SDComponents:
    xl = {}
    try:
        index = _model_index(pretrained, kwargs)
        kind = _transformer_family(pretrained, kwargs, index)
        if kind is not None:
            return _load_transformer_pipeline(pretrained, kwargs, with_vae, kind)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", use_safetensors=True, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            pretrained, subfolder="text_encoder", use_safetensors=True, **kwargs
        )
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kwargs)
        if "text_encoder_2" in index or (is_local and _is_sdxl_folder(pretrained)):  # SDXL: two text encoders
            from transformers import CLIPTextModelWithProjection

            xl = dict(
                family_name="sdxl",
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    pretrained, subfolder="text_encoder_2", use_safetensors=True, **kwargs).eval(),
                tokenizer_2=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kwargs),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            )
        scheduler = _load_scheduler(pretrained, kwargs)
        vae = (
            AutoencoderKL.from_pretrained(pretrained, subfolder="vae", use_safetensors=True, **kwargs)
            if with_vae
            else None
        )
    except (OSError, ValueError, EnvironmentError) as err:
        if is_local:
            raise UserError(f"model.pretrained: could not load folder '{pretrained}': {_describe(err)}") from None
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise UserError(
                f"model.pretrained: '{pretrained}' is not a local folder and the hub is offline (HF_HUB_OFFLINE); "
                "download it first or give the path of a diffusers model folder"
            ) from None
        raise UserError(f"model.pretrained: could not load '{pretrained}' from the hub: {_describe(err)}") from None
    for module in (unet, text_encoder, vae):
        if module is not None:
            module.eval()
    components = SDComponents(unet, text_encoder, tokenizer, scheduler, vae, source=pretrained, **xl)
    _ = components.prediction  # a prediction type no family handles is one clear error, here
    return components


def _refuse_pickles(path: str, subfolders: list[str]) -> None:
    for sub in subfolders:
        folder = os.path.join(path, sub)
        names = os.listdir(folder)
        if not any(n.endswith(".safetensors") for n in names) and not any(
            n.endswith(".safetensors.index.json") for n in names
        ):
            raise UserError(
                f"model.pretrained: {folder} has no .safetensors weights; pickled weights (.bin/.ckpt) "
                "are never loaded - convert them to safetensors first"
            )


def unet_from_single_file(path: str, config_dir: str) -> UNet2DConditionModel:
    """Rebuild a UNet from an exported ``unet.safetensors`` (diffusers keys) and a UNet config folder."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir))
    missing, unexpected = unet.load_state_dict(load_file(path), strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: does not match the UNet in {config_dir} ({len(missing)} missing keys)")
    return unet.eval()


def pipeline_path(model: str) -> str:
    """A training run folder stands for its exported pipeline (``OUT/pipeline``); anything else for itself."""
    model = os.fspath(model)
    pipeline = os.path.join(model, "pipeline")
    return pipeline if os.path.isfile(os.path.join(pipeline, "model_index.json")) else model


def run_base_model(model: str) -> Optional[str]:
    """The model a run started from (``model.pretrained`` of its ``config.yaml``), for a run folder or its
    ``pipeline/``; None for anything else."""
    import yaml

    model = os.path.abspath(os.fspath(model))
    run = os.path.dirname(model) if os.path.basename(model) == "pipeline" else model
    path = os.path.join(run, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return ((yaml.safe_load(f) or {}).get("model") or {}).get("pretrained")
