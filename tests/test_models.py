"""Model components: the tiny model, folders in diffusers layout, and refusing pickled weights."""

import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

from sdd.errors import UserError
from sdd.models import build_tiny_sd, load_components, load_tokenizer, unet_from_single_file


def save_tiny(path, safe=True, scheduler=None):
    tiny = build_tiny_sd()
    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=scheduler or tiny.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=safe)
    return tiny


def test_the_bundled_tokenizer_is_clips():
    tok = load_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


def test_tiny_model_is_deterministic_and_sd_shaped():
    a, b = build_tiny_sd(), build_tiny_sd()
    for (name, p), q in zip(a.unet.named_parameters(), b.unet.parameters()):
        assert torch.equal(p, q), name
    assert a.unet.config.cross_attention_dim == a.text_encoder.config.hidden_size
    assert a.vae_scale_factor == 2 and a.default_resolution == 32
    assert any("attn2" in n for n, _ in a.unet.named_parameters())


def test_folder_round_trip_keeps_weights_and_the_scheduler_class(tmp_path):
    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1)
    tiny = save_tiny(tmp_path / "m", scheduler=pndm)
    loaded = load_components(str(tmp_path / "m"))
    assert isinstance(loaded.scheduler, PNDMScheduler)  # the export keeps the base model's sampler
    for (name, p), q in zip(tiny.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(p, q), name
    assert loaded.tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids


def test_pickled_weights_are_refused(tmp_path):
    save_tiny(tmp_path / "m", safe=False)
    with pytest.raises(UserError, match="no .safetensors weights; pickled weights"):
        load_components(str(tmp_path / "m"))


def test_not_a_model_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load_components(str(tmp_path / "x"))


def test_hub_id_offline_is_one_clear_error():
    with pytest.raises(UserError, match="not a local folder and the hub is offline"):
        load_components("CompVis/stable-diffusion-v1-4")


def test_single_file_unet_reloads(tmp_path):
    from safetensors.torch import save_file

    tiny = save_tiny(tmp_path / "m")
    save_file(tiny.unet.state_dict(), tmp_path / "unet.safetensors")
    unet = unet_from_single_file(str(tmp_path / "unet.safetensors"), str(tmp_path / "m" / "unet"))
    z = torch.randn(1, 4, 16, 16)
    c = torch.randn(1, 77, 32)
    torch.testing.assert_close(unet(z, 10, c).sample, tiny.unet(z, 10, c).sample)


# --- sdxl-random: SDXL base 1.0's architecture with random weights (built on the meta device here: no memory) ------

# Parameter counts of SDXL base 1.0's released diffusers components (stabilityai/stable-diffusion-xl-base-1.0),
# as `sum(p.numel() for p in module.parameters())` reports them on the released weights: UNet 2,567,463,684 (1680
# tensors: the released single file's `model.diffusion_model.*` keys, see tests/test_single_file.py); text_encoder
# (CLIP ViT-L/14's text tower) 123,060,480, the same module as SD-1.5's; text_encoder_2 (OpenCLIP ViT-bigG/14's text
# tower with its 1280 x 1280 projection) 694,659,840, OpenCLIP's 694.66 M for ViT-bigG-14's text tower; the two
# encoders together 817,720,320; VAE 83,653,863, SD-1.5's. Not re-counted on downloaded weights here (no hub).
SDXL_BASE_PARAMETERS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                        "vae": 83_653_863}


def sdxl_random_on_meta():
    from sdd.models import build_sdxl_random

    with torch.device("meta"):
        return build_sdxl_random()


def test_sdxl_random_has_sdxl_base_parameter_counts():
    c = sdxl_random_on_meta()
    counts = {name: sum(p.numel() for p in getattr(c, name).parameters()) for name in SDXL_BASE_PARAMETERS}
    assert counts == SDXL_BASE_PARAMETERS
    assert len(c.unet.state_dict()) == 1680
    # bigG's projection is the only difference between the text tower and the module with projection
    assert counts["text_encoder_2"] - sum(p.numel() for p in c.text_encoder_2.text_model.parameters()) == 1280 * 1280
    assert c.unet.device.type == "meta"


def test_sdxl_random_is_the_sdxl_family_at_1024_px():
    c = sdxl_random_on_meta()
    assert (c.source, c.family_name, c.family.name) == ("sdxl-random", "sdxl", "sdxl")
    assert c.vae_scale_factor == 8 and c.default_resolution == 1024  # 128 x 128 latents: what SDD/ESD train at
    u = c.unet.config
    assert u.cross_attention_dim == c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    assert u.projection_class_embeddings_input_dim == 6 * u.addition_time_embed_dim + \
        c.text_encoder_2.config.projection_dim
    assert c.tokenizer_2.pad_token == "!" and c.tokenizer.pad_token == "<|endoftext|>"
    assert c.vae.config.scaling_factor == 0.13025 and type(c.scheduler).__name__ == "EulerDiscreteScheduler"


def test_sdxl_random_configs_are_the_shipped_sdxl_single_file_configs():
    """Two hand-written copies of SDXL base 1.0's configs (models.py and the single-file asset) agree, value for
    value, and StableDiffusionXLPipeline takes the components."""
    import json

    from diffusers import StableDiffusionXLPipeline

    from sdd import single_file as sf

    with open(f"{sf.CONFIG_DIR}/sdxl.json") as f:
        shipped = json.load(f)
    c = sdxl_random_on_meta()
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    for name in ("unet", "vae", "scheduler"):
        ours = {k: plain(v) for k, v in getattr(c, name).config.items()}
        assert {k: ours.get(k) for k in shipped[name] if not k.startswith("_")} == \
            {k: v for k, v in shipped[name].items() if not k.startswith("_")}, name
    for name in ("text_encoder", "text_encoder_2"):
        ours = getattr(c, name).config.to_dict()
        skip = {"architectures", "dropout"}  # metadata, and a key this transformers version's CLIPTextConfig lacks
        assert {k: ours.get(k) for k in shipped[name] if k not in skip} == \
            {k: v for k, v in shipped[name].items() if k not in skip}, name
    assert type(c.text_encoder_2).__name__ == shipped["model_index"]["text_encoder_2"][1]
    pipe = c.family.pipeline(c)
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.unet is c.unet and pipe.text_encoder_2 is \
        c.text_encoder_2


def test_sdxl_random_is_loaded_by_name_and_deterministic_for_a_seed(narrow_sdxl_random):
    from sdd import models

    with torch.device("meta"):
        assert load_components("sdxl-random").source == "sdxl-random"
    assert "sdxl-random" in models.BUILT_IN_MODELS
    # the same build at a small width (the full one is 13 GB of fp32 weights): a seed fixes every weight
    a, b, other = narrow_sdxl_random(), narrow_sdxl_random(), narrow_sdxl_random(seed=1)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        sa, sb, so = (getattr(x, name).state_dict() for x in (a, b, other))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], so[k]) for k in sa), name
