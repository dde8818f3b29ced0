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
