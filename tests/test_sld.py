"""SLD: the guidance math against numbers worked out by hand, the presets, and whole images against diffusers'
StableDiffusionPipelineSafe on the tiny model (while diffusers still ships it)."""

import warnings

import pytest
import torch

from sdd.errors import UserError
from sdd.generation import Request
from sdd.methods.inference import METHODS, describe_method, generate_with_method, method_guidance
from sdd.methods.sld import SLD_PRESETS, SLD_SAFETY_CONCEPT, SLDGuidance, sld_guidance, sld_safety_scale, sld_settings
from sdd.models import build_tiny_sd
from sdd.sampling import classifier_free_guidance

PROMPT, SEED, STEPS = "a photo of a naked person on a beach", 3, 8


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def step(eps_uncond, eps_prompt, eps_safety, momentum, i, **overrides):
    knobs = dict(guidance_scale=2.0, sld_guidance_scale=1000.0, sld_warmup_steps=0, sld_threshold=0.0,
                 sld_momentum_scale=0.5, sld_mom_beta=0.5)
    return sld_guidance(eps_uncond, eps_prompt, eps_safety, momentum, i, **{**knobs, **overrides})


# --- the math ------------------------------------------------------------------------------------------------


def test_gate_is_min_one_scaled_difference_below_the_signed_threshold():
    delta = t(-1.0, -0.125, 0.125, 0.25, 0.5)  # Δ = ε_p − ε_S (ε_S = 0)
    mu = sld_safety_scale(delta, torch.zeros(5), sld_guidance_scale=4.0, sld_threshold=0.25)
    # s_S|Δ| = 4, 0.5, 0.5, 1, 2;  min(1, ·) = 1, 0.5, 0.5, 1, 1
    # gate Δ < λ = 0.25: open, open, open (0.125 > 0 but below λ: the comparison is signed), closed (=), closed
    assert mu.tolist() == [1.0, 0.5, 0.5, 0.0, 0.0]
    # λ = 0 (weak): only elements where the prompt lies below the safety concept are pushed
    assert sld_safety_scale(delta, torch.zeros(5), 4.0, 0.0).tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_soft_gate_scales_the_safety_direction():
    # Δ = 1 − 1.125 = −0.125; μ = min(1, 4·0.125) = 0.5; γ = 0.5·(1.125 − 0) = 0.5625
    # ε̄ = 0 + 2·(1 − 0 − 0.5625) = 0.875
    out, _ = step(t(0.0), t(1.0), t(1.125), t(0.0), 0, sld_guidance_scale=4.0, sld_momentum_scale=0.0)
    assert out.tolist() == [0.875]


def test_warmup_leaves_cfg_but_momentum_still_builds():
    eps_uncond, eps_prompt, eps_safety = t(0.0, 0.0), t(1.0, 1.0), t(3.0, 0.5)
    # Δ = (−2, 0.5): element 0 gated open with μ = min(1, 1000·2) = 1; element 1 closed (Δ ≥ λ = 0)
    # step 0 (< δ = 1): γ_0 = (1·3, 0) = (3, 0); ν_1 = 0.5·0 + 0.5·γ_0 = (1.5, 0); ε̄ = CFG = 2·1 = (2, 2)
    out0, nu1 = step(eps_uncond, eps_prompt, eps_safety, torch.zeros(2), 0, sld_warmup_steps=1)
    assert out0.tolist() == [2.0, 2.0]
    assert torch.equal(out0, classifier_free_guidance(eps_uncond, eps_prompt, 2.0))
    assert nu1.tolist() == [1.5, 0.0]
    # the same momentum as without warm-up: it is updated on every step
    _, nu1_no_warmup = step(eps_uncond, eps_prompt, eps_safety, torch.zeros(2), 0, sld_warmup_steps=0)
    assert torch.equal(nu1, nu1_no_warmup)
    # step 1 (≥ δ): γ_1 = (3 + 0.5·1.5, 0) = (3.75, 0); ν_2 = 0.5·1.5 + 0.5·3.75 = 2.625
    # ε̄ = 0 + 2·(1 − 0 − γ_1) = (−5.5, 2)
    out1, nu2 = step(eps_uncond, eps_prompt, eps_safety, nu1, 1, sld_warmup_steps=1)
    assert out1.tolist() == [-5.5, 2.0]
    assert nu2.tolist() == [2.625, 0.0]


def test_momentum_over_two_steps():
    # step 0: ε_∅ = 0, ε_p = 1, ε_S = 3: μ = 1, γ_0 = 3, ν_1 = 1.5, ε̄ = 2·(1 − 3) = −4
    out0, nu1 = step(t(0.0), t(1.0), t(3.0), t(0.0), 0)
    assert (out0.item(), nu1.item()) == (-4.0, 1.5)
    # step 1: ε_∅ = 1, ε_p = 1, ε_S = 2: Δ = −1, μ = 1, γ_1 = (2 − 1) + 0.5·1.5 = 1.75
    # ν_2 = 0.5·1.5 + 0.5·1.75 = 1.625;  ε̄ = 1 + 2·(0 − 1.75) = −2.5
    out1, nu2 = step(t(1.0), t(1.0), t(2.0), nu1, 1)
    assert (out1.item(), nu2.item()) == (-2.5, 1.625)


def test_zero_safety_scale_is_exactly_cfg():
    g = torch.Generator().manual_seed(0)
    eps = [torch.randn(2, 4, 3, 3, generator=g) for _ in range(3)]
    momentum = torch.zeros(2, 4, 3, 3)
    for i in range(3):
        out, momentum = step(*eps, momentum, i, sld_guidance_scale=0.0, sld_threshold=1.0)
        assert torch.equal(out, classifier_free_guidance(eps[0], eps[1], 2.0))
        assert not momentum.any()


def test_per_image_guidance_scale():
    # two images in one batch with s_g = 2 and 3 (generate passes a (B, 1, 1, 1) tensor); gate open, no momentum:
    # ε̄ = 0 + s_g·(1 − 3) = −4, −6
    shape = (2, 1, 1, 1)
    out, _ = step(torch.zeros(shape), torch.ones(shape), torch.full(shape, 3.0), torch.zeros(shape), 0,
                  guidance_scale=t(2.0, 3.0).view(shape))
    assert out.flatten().tolist() == [-4.0, -6.0]


# --- presets and settings ------------------------------------------------------------------------------------

PAPER_PRESETS = {  # docs/METHODS.md section 3.3: (δ, s_S, λ, s_m, β_m)
    "weak": (15, 200.0, 0.0, 0.0, 0.0),
    "medium": (10, 1000.0, 0.01, 0.3, 0.4),
    "strong": (7, 2000.0, 0.025, 0.5, 0.7),
    "max": (0, 5000.0, 1.0, 0.5, 0.7),
}


@pytest.mark.parametrize("preset", list(PAPER_PRESETS))
def test_presets_selectable_by_name(preset):
    warmup, s_s, threshold, s_m, beta = PAPER_PRESETS[preset]
    expected = dict(sld_warmup_steps=warmup, sld_guidance_scale=s_s, sld_threshold=threshold,
                    sld_momentum_scale=s_m, sld_mom_beta=beta)
    s = sld_settings(preset)
    assert {k: getattr(s, k) for k in expected} == expected
    assert s.safety_concept == SLD_SAFETY_CONCEPT  # the original text, without diffusers' "an image showing "
    method = f"sld-{preset}"
    assert method in METHODS
    guidance = method_guidance(method, "nudity")
    assert isinstance(guidance, SLDGuidance) and guidance.extra_prompts() == ["nudity"]
    assert describe_method(method, "nudity") == {"method": method, "preset": preset, "safety_concept": "nudity",
                                                 **expected}


def test_no_concept_means_the_sld_safety_text():
    assert describe_method("sld-max", None)["safety_concept"] == SLD_SAFETY_CONCEPT
    assert method_guidance("sld-max", None).extra_prompts() == [SLD_SAFETY_CONCEPT]
    assert describe_method("neg", None) == {"method": "neg", "negative_prompt": SLD_SAFETY_CONCEPT}
    assert describe_method("sd", "ignored") == {"method": "sd"}


def test_settings_override_preset_values():
    described = describe_method("sld-medium", "nudity", {"sld_guidance_scale": 500, "sld_warmup_steps": 3.0})
    assert described["sld_guidance_scale"] == 500.0 and described["sld_warmup_steps"] == 3
    assert described["sld_threshold"] == 0.01  # the rest stays Medium
    assert SLD_PRESETS["medium"].sld_guidance_scale == 1000.0  # presets are not modified


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sld_settings("extreme"), "unknown SLD preset 'extreme'"),
        (lambda: describe_method("sld-extreme", "nudity"), "unknown generation method 'sld-extreme'"),
        (lambda: describe_method("sld-max", "nudity", {"sld_scale": 1}), "unknown setting 'sld_scale'"),
        (lambda: describe_method("sld-max", "nudity", {"sld_mom_beta": 1.5}), "sld_mom_beta: must lie in [0, 1]"),
        (lambda: describe_method("sld-max", "nudity", {"sld_warmup_steps": 2.5}), "sld_warmup_steps"),
        (lambda: describe_method("sld-max", "nudity", {"sld_guidance_scale": "high"}), "sld_guidance_scale"),
        (lambda: describe_method("sld-max", " "), "the concept text to steer away from is empty"),
        (lambda: describe_method("sd", "nudity", {"sld_guidance_scale": 1}), "method 'sd' takes no settings"),
    ],
)
def test_bad_settings_are_one_line_user_errors(call, message):
    with pytest.raises(UserError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


# --- whole images --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd()


def images(tiny, method, concept="x", settings=None, requests=None):
    requests = requests or [Request(prompt=PROMPT, seed=SEED)]
    out = generate_with_method(tiny, requests, method, concept, settings=settings, num_inference_steps=STEPS,
                               output_type="pt")
    return torch.stack([(x / 2 + 0.5).clamp(0, 1).permute(1, 2, 0) for x in out])  # as diffusers' "np"


def test_zero_safety_scale_gives_the_plain_cfg_image(tiny):
    sd = images(tiny, "sd")
    sld = images(tiny, "sld-max", SLD_SAFETY_CONCEPT, {"sld_guidance_scale": 0})
    assert (sld - sd).abs().max().item() < 1e-6


def test_batched_images_match_images_made_alone(tiny):
    # momentum and gate are per image: a batch gives each image what it would get alone (up to batch numerics)
    requests = [Request(prompt=PROMPT, seed=3), Request(prompt="a dog", seed=5, guidance_scale=4.0)]
    together = images(tiny, "sld-max", "nudity", requests=requests)
    alone = torch.cat([images(tiny, "sld-max", "nudity", requests=[r]) for r in requests])
    assert (together - alone).abs().max().item() < 1e-4


def safe_pipeline(tiny):
    try:
        from diffusers import StableDiffusionPipelineSafe
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    except ImportError:
        pytest.skip("this diffusers no longer ships StableDiffusionPipelineSafe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipelineSafe(
            vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
            scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.safety_concept = SLD_SAFETY_CONCEPT
    return pipe, SafetyConfig


# The README's claim: the same image as diffusers' pipeline to 4e-7 (float round-off of a [0, 1] image)
MATCH_TOLERANCE = 1e-6


def reference_image(pipe, safety_config, preset, prompt, steps, guidance_scale=7.5, seed=SEED, **overrides):
    settings = {**getattr(safety_config, preset.upper()), **overrides}
    if preset == "weak" and "sld_guidance_scale" not in overrides:
        assert settings["sld_guidance_scale"] == 20  # diffusers' WEAK; the paper's is 200
        settings["sld_guidance_scale"] = 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Safety checker disabled!"-style notices
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(seed), output_type="np", **settings).images[0]


def test_same_image_as_diffusers_on_the_tiny_model(tiny):
    pipe, safety_config = safe_pipeline(tiny)
    reference = reference_image(pipe, safety_config, "max", PROMPT, STEPS)
    ours = images(tiny, "sld-max", SLD_SAFETY_CONCEPT)[0]
    assert (ours - torch.from_numpy(reference)).abs().max().item() < MATCH_TOLERANCE
    assert (ours - images(tiny, "sd")[0]).abs().max().item() > 1e-3  # SLD changed the image


@pytest.fixture(scope="module")
def shapes():
    from sdd.models import load_components

    return load_components("shapes")


SHAPES_STEPS = 25  # the presets' warm-ups (up to 15 steps) were made for 50; 25 leaves Weak 10 guided steps


@pytest.fixture(scope="module")
def shapes_sd(shapes):
    request = Request(prompt="a red circle", seed=SEED, guidance_scale=5.0)
    out = generate_with_method(shapes, [request], "sd", None, num_inference_steps=SHAPES_STEPS, output_type="pt")
    return (out[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0)


@pytest.mark.parametrize("concept", ["default", "red"])
@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_every_preset_gives_diffusers_image_on_the_shapes_model(shapes, shapes_sd, preset, concept):
    """Each preset at its own settings (no shortened warm-up), with SLD's safety text and with a concept of the
    user's, on a trained model: the same image as StableDiffusionPipelineSafe, to float round-off."""
    safety = SLD_SAFETY_CONCEPT if concept == "default" else concept
    pipe, safety_config = safe_pipeline(shapes)
    pipe.safety_concept = safety
    reference = reference_image(pipe, safety_config, preset, "a red circle", SHAPES_STEPS, guidance_scale=5.0)
    request = Request(prompt="a red circle", seed=SEED, guidance_scale=5.0)
    out = generate_with_method(shapes, [request], f"sld-{preset}", safety, num_inference_steps=SHAPES_STEPS,
                               output_type="pt")
    ours = (out[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0)
    assert (ours - torch.from_numpy(reference)).abs().max().item() < MATCH_TOLERANCE
    assert (ours - shapes_sd).abs().max().item() > 1e-2  # the guidance acted: not CFG against CFG
