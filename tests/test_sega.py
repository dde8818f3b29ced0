"""SEGA: the guidance math against numbers worked out by hand, the SDD-paper preset, and whole images against
diffusers' SemanticStableDiffusionPipeline on the tiny model (while diffusers still ships it)."""

import warnings

import pytest
import torch

from sdd.errors import UserError
from sdd.generation import Request, generate
from sdd.methods.inference import describe_method, generate_with_method, method_guidance
from sdd.methods.sega import (
    EditConcept,
    SEGAGuidance,
    SEGASettings,
    sega_edit_guidance,
    sega_guidance,
    sega_settings,
)
from sdd.methods.sld import SLD_SAFETY_CONCEPT
from sdd.models import build_tiny_sd

PROMPT, SEED, STEPS = "a photo of a naked person on a beach", 3, 8


def one_concept_step(eps_uncond, eps_prompt, eps_edit, momentum, i, **overrides):
    knobs = dict(guidance_scale=2.0, edit_guidance_scale=1.0, edit_threshold=0.0, reverse_editing_direction=True,
                 edit_warmup_steps=0, edit_cooldown_steps=None, edit_weight=1.0, edit_momentum_scale=0.5,
                 edit_mom_beta=0.5)
    knobs.update(overrides)
    per_concept = ("edit_guidance_scale", "edit_threshold", "reverse_editing_direction", "edit_warmup_steps",
                   "edit_cooldown_steps")
    lists = {k: [knobs.pop(k)] for k in per_concept}
    lists["edit_weights"] = [knobs.pop("edit_weight")]
    return sega_guidance(eps_uncond, eps_prompt, [eps_edit], momentum, i, **knobs, **lists)


def latent(*values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)  # (B=1, C=1, H=1, W)


# --- the math ------------------------------------------------------------------------------------------------


def test_threshold_keeps_the_top_quantile_per_image_and_channel():
    eps_uncond = torch.ones(1, 2, 2, 2)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-40.0, 10.0, 20.0, -30.0]]).view(1, 2, 2, 2)
    eps_edit = eps_uncond + values  # ψ = ε_e − ε_∅ = values
    # channel 0: |ψ| sorted 1 2 3 4, 0.5-quantile at position 0.5·3 = 1.5 -> 2.5: keeps 3, 4
    # channel 1: |ψ| sorted 10 20 30 40 -> 25: keeps −40, −30. (One quantile over both channels, 7, would keep
    # all of channel 1 and nothing of channel 0.)
    psi = sega_edit_guidance(eps_uncond, eps_edit, 1.0, 0.5, False)
    assert psi.view(2, 4).tolist() == [[0.0, 0.0, 3.0, 4.0], [-40.0, 0.0, 0.0, -30.0]]
    # 0.9-quantile: position 2.7 -> 3.7 in channel 0 (keeps 4), 37 in channel 1 (keeps −40)
    psi = sega_edit_guidance(eps_uncond, eps_edit, 1.0, 0.9, False)
    assert psi.view(2, 4).tolist() == [[0.0, 0.0, 0.0, 4.0], [-40.0, 0.0, 0.0, 0.0]]
    # reverse edit, scale 2: ψ = −2·values, same elements kept
    psi = sega_edit_guidance(eps_uncond, eps_edit, 2.0, 0.5, True)
    assert psi.view(2, 4).tolist() == [[0.0, 0.0, -6.0, -8.0], [80.0, 0.0, 0.0, 60.0]]
    # threshold 0 keeps everything
    assert torch.equal(sega_edit_guidance(eps_uncond, eps_edit, 1.0, 0.0, False), values)


def test_warmup_leaves_cfg_but_momentum_still_builds():
    zero, one, edit = latent(0.0, 0.0), latent(1.0, 1.0), latent(2.0, -4.0)
    # reverse, scale 1, threshold 0: ψ = −(ε_e − ε_∅) = (−2, 4)
    # step 0 (< δ = 1): g_0 = ψ + 0.5·0 = (−2, 4); ν_1 = 0.5·g_0 = (−1, 2); ε̄ = 0 + 2·(1 − 0) = (2, 2)
    out0, nu1 = one_concept_step(zero, one, edit, torch.zeros(1, 1, 1, 2), 0, edit_warmup_steps=1)
    assert out0.flatten().tolist() == [2.0, 2.0]
    assert nu1.flatten().tolist() == [-1.0, 2.0]
    # step 1 (≥ δ): g_1 = (−2, 4) + 0.5·(−1, 2) = (−2.5, 5); ν_2 = 0.5·(−1, 2) + 0.5·(−2.5, 5) = (−1.75, 3.5)
    # ε̄ = 2 + g_1 (the edit sits outside the CFG bracket, not scaled by s_g) = (−0.5, 7)
    out1, nu2 = one_concept_step(zero, one, edit, nu1, 1, edit_warmup_steps=1)
    assert out1.flatten().tolist() == [-0.5, 7.0]
    assert nu2.flatten().tolist() == [-1.75, 3.5]


def test_momentum_over_two_steps():
    zero, one = latent(0.0, 0.0), latent(1.0, 1.0)
    # step 0: ψ = −(2, −4) = (−2, 4) = g_0; ε̄ = 2 + g_0 = (0, 6); ν_1 = (−1, 2)
    out0, nu1 = one_concept_step(zero, one, latent(2.0, -4.0), torch.zeros(1, 1, 1, 2), 0)
    assert out0.flatten().tolist() == [0.0, 6.0]
    # step 1: ψ = −(0, 2) = (0, −2); g_1 = (0, −2) + 0.5·(−1, 2) = (−0.5, −1); ν_2 = 0.5·(−1, 2) + 0.5·g_1
    # = (−0.75, 0.5); ε̄ = 2 + g_1 = (1.5, 1)
    out1, nu2 = one_concept_step(zero, one, latent(0.0, 2.0), nu1, 1)
    assert out1.flatten().tolist() == [1.5, 1.0]
    assert nu2.flatten().tolist() == [-0.75, 0.5]


def test_cooldown_drops_the_edit_but_not_the_momentum():
    zero, one, edit = latent(0.0, 0.0), latent(1.0, 1.0), latent(2.0, -4.0)
    _, nu1 = one_concept_step(zero, one, edit, torch.zeros(1, 1, 1, 2), 0, edit_cooldown_steps=1)  # ν_1 = (−1, 2)
    # step 1 ≥ cooldown: ψ = 0, g_1 = 0.5·ν_1 = (−0.5, 1); ε̄ = 2 + g_1 = (1.5, 3)
    out1, _ = one_concept_step(zero, one, edit, nu1, 1, edit_cooldown_steps=1)
    assert out1.flatten().tolist() == [1.5, 3.0]


def test_threshold_inside_the_step():
    # ψ = (1, 2, 3, 4), 0.5-quantile 2.5 keeps (0, 0, 3, 4); no momentum; ε̄ = 2·1 + ψ_kept
    out, _ = one_concept_step(latent(0, 0, 0, 0), latent(1, 1, 1, 1), latent(1, 2, 3, 4), torch.zeros(1, 1, 1, 4), 0,
                              reverse_editing_direction=False, edit_threshold=0.5, edit_momentum_scale=0.0)
    assert out.flatten().tolist() == [2.0, 2.0, 5.0, 6.0]


# --- the preset and settings ---------------------------------------------------------------------------------


def test_default_preset_is_the_sdd_papers_reverse_safety_edit():
    s = sega_settings()
    (concept,) = s.concepts
    assert concept.editing_prompt == SLD_SAFETY_CONCEPT and concept.reverse_editing_direction
    assert concept.edit_guidance_scale == 5.0
    # the rest: diffusers' SemanticStableDiffusionPipeline defaults
    assert (concept.edit_warmup_steps, concept.edit_cooldown_steps, concept.edit_threshold) == (10, None, 0.9)
    assert (s.edit_momentum_scale, s.edit_mom_beta) == (0.1, 0.4)
    assert SEGAGuidance().settings == s
    assert method_guidance("sega", "nudity").extra_prompts() == ["nudity"]
    assert method_guidance("sega", None).extra_prompts() == [SLD_SAFETY_CONCEPT]


def test_settings_override_and_describe():
    described = describe_method("sega", "nudity", {"edit_threshold": 0.5, "edit_mom_beta": 0.6,
                                                   "edit_cooldown_steps": 5.0})
    assert described["method"] == "sega"
    assert described["edit_mom_beta"] == 0.6 and described["edit_momentum_scale"] == 0.1
    assert described["concepts"] == [dict(editing_prompt="nudity", reverse_editing_direction=True,
                                          edit_guidance_scale=5.0, edit_warmup_steps=10, edit_cooldown_steps=5,
                                          edit_threshold=0.5, edit_weight=1.0)]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"edit_treshold": 0.5}, "unknown setting 'edit_treshold'"),
        ({"edit_threshold": 1.5}, "edit_threshold: must lie in [0, 1]"),
        ({"edit_warmup_steps": -1}, "edit_warmup_steps"),
        ({"reverse_editing_direction": "yes"}, "reverse_editing_direction"),
    ],
)
def test_bad_settings_are_one_line_user_errors(settings, message):
    with pytest.raises(UserError) as err:
        describe_method("sega", "nudity", settings)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- whole images --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd()


def as_np(out):
    return torch.stack([(x / 2 + 0.5).clamp(0, 1).permute(1, 2, 0) for x in out])  # as diffusers' "np"


def images(tiny, settings=None, concept=SLD_SAFETY_CONCEPT, requests=None):
    requests = requests or [Request(prompt=PROMPT, seed=SEED)]
    return as_np(generate_with_method(tiny, requests, "sega", concept, settings=settings,
                                      num_inference_steps=STEPS, output_type="pt"))


def semantic_pipeline(tiny):
    try:
        from diffusers import SemanticStableDiffusionPipeline
    except ImportError:
        pytest.skip("this diffusers no longer ships SemanticStableDiffusionPipeline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = SemanticStableDiffusionPipeline(
            vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
            scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(tiny, **kwargs):
    pipe = semantic_pipeline(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="np",
                   **kwargs).images[0]
    return torch.from_numpy(out)


def plain_cfg(tiny):
    return as_np(generate_with_method(tiny, [Request(prompt=PROMPT, seed=SEED)], "sd", "", num_inference_steps=STEPS,
                                      output_type="pt"))[0]


@pytest.mark.parametrize(
    "settings",
    [
        # the preset, with an earlier start: warm-up 10 would leave an 8-step run plain CFG
        {"edit_warmup_steps": 2},
        {"edit_warmup_steps": 1, "edit_cooldown_steps": 5, "edit_threshold": 0.5, "edit_momentum_scale": 0.3,
         "edit_mom_beta": 0.6, "edit_guidance_scale": 7.0},
    ],
)
def test_same_image_as_diffusers(tiny, settings):
    preset = {"editing_prompt": [SLD_SAFETY_CONCEPT], "reverse_editing_direction": True, "edit_guidance_scale": 5.0}
    expected = reference(tiny, **{**preset, **settings})
    ours = images(tiny, settings)[0]
    assert (ours - expected).abs().max().item() < 1e-4
    assert (ours - plain_cfg(tiny)).abs().max().item() > 1e-3  # the edit acted


def test_two_concepts_same_image_as_diffusers(tiny):
    # different warm-ups: steps 1-3 take diffusers' partial path (normalised weights, no momentum)
    expected = reference(
        tiny, editing_prompt=["nudity", "a red car"], reverse_editing_direction=[True, False],
        edit_guidance_scale=[5.0, 3.0], edit_warmup_steps=[1, 4], edit_cooldown_steps=[6, 100],
        edit_threshold=[0.9, 0.7], edit_weights=[1.0, 2.0], edit_momentum_scale=0.2, edit_mom_beta=0.5,
    )
    guidance = SEGAGuidance(SEGASettings(
        concepts=(EditConcept("nudity", True, 5.0, 1, 6, 0.9, 1.0),
                  EditConcept("a red car", False, 3.0, 4, 100, 0.7, 2.0)),
        edit_momentum_scale=0.2, edit_mom_beta=0.5,
    ))
    ours = as_np(generate(tiny, [Request(prompt=PROMPT, seed=SEED)], num_inference_steps=STEPS, guidance=guidance,
                          output_type="pt"))[0]
    assert (ours - expected).abs().max().item() < 1e-4
    assert (ours - plain_cfg(tiny)).abs().max().item() > 1e-3


def test_batched_images_match_images_made_alone(tiny):
    # the quantile is taken per image: a batch gives each image what it would get alone (up to batch numerics)
    requests = [Request(prompt=PROMPT, seed=3), Request(prompt="a dog", seed=5, guidance_scale=4.0)]
    together = images(tiny, {"edit_warmup_steps": 2}, "nudity", requests)
    alone = torch.cat([images(tiny, {"edit_warmup_steps": 2}, "nudity", [r]) for r in requests])
    assert (together - alone).abs().max().item() < 1e-4
