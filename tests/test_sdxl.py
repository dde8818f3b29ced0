"""SDXL on the seam (``tiny-sdxl``): loading (built in, SDXL folders). Encoding and CFG generation equal to the
pipeline: tests/test_families.py."""

import json

import pytest
import torch

from sdd.errors import UserError
from sdd.methods import common
from sdd.models import build_tiny_sdxl, load_components


@pytest.fixture(scope="module")
def sdxl():
    m = build_tiny_sdxl()
    pipe = m.family.pipeline(m)
    pipe.set_progress_bar_config(disable=True)
    return m, pipe


def reference_conditioning(pipe, prompt, size=32):
    """What StableDiffusionXLPipeline feeds its UNet for ``prompt`` and for the unconditional branch."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompt, do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return (embeds, pooled), (negative, negative_pooled), time_ids


def unet_call(unet, z, t, cond, time_ids):
    hidden, pooled = cond
    n = z.shape[0]
    added = {"text_embeds": pooled.expand(n, -1), "time_ids": time_ids.expand(n, -1)}
    return unet(z, t, encoder_hidden_states=hidden.expand(n, -1, -1), added_cond_kwargs=added).sample


# --- loading -----------------------------------------------------------------------------------------------------


def test_tiny_sdxl_is_a_built_in_name(sdxl):
    m, _ = sdxl
    built = load_components("tiny-sdxl")
    assert built.family.name == "sdxl" and built.source == "tiny-sdxl" and built.default_resolution == 32
    for (name, p), q in zip(m.unet.named_parameters(), built.unet.parameters()):
        assert torch.equal(p, q), name
    # the DDIM grid the teacher samples on reads SDXL's scheduler config: no x0 clipping, alpha_0 from the schedule
    grid = common.ddim_grid(built, 5)
    assert not grid.config.clip_sample and not grid.config.set_alpha_to_one


def test_an_sdxl_folder_loads_with_both_text_encoders(sdxl, tmp_path):
    m, pipe = sdxl
    folder = tmp_path / "xl"
    pipe.save_pretrained(folder, safe_serialization=True)
    loaded = load_components(str(folder))
    assert loaded.family.name == "sdxl" and loaded.tokenizer_2.pad_token == "!"
    for a, b in [(m.unet, loaded.unet), (m.text_encoder_2, loaded.text_encoder_2), (m.vae, loaded.vae)]:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    torch.testing.assert_close(loaded.family.encode(loaded, ["a cat", ""]), m.family.encode(m, ["a cat", ""]))
    # force_zeros_for_empty_prompt comes from model_index.json (the refiner's is false)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    empty = load_components(str(folder)).family.encode(m, [""])
    assert empty.abs().max() > 0
    import shutil

    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(UserError, match="SDXL folder without 'tokenizer_2/'") as err:
        load_components(str(folder))
    assert "\n" not in str(err.value)
