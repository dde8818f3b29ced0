"""SAFREE: each equation against numbers worked out by hand, then whole images on the tiny model (a prompt without a
trigger token is plain CFG, exactly), sdd-generate --method safree and an sdd-eval entry, and bad knobs."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from sdd.cli.eval import main as eval_main
from sdd.cli.generate import main as generate_main
from sdd.errors import UserError
from sdd.generation import Request
from sdd.methods.common import load_base
from sdd.methods.inference import METHODS, describe_method, generate_with_method, method_guidance
from sdd.methods.safree import (
    SAFREE_NUDITY_KEYWORDS,
    SAFREEGuidance,
    concept_distances,
    concept_keywords,
    filter_prompt,
    filter_strength,
    filtered_embedding,
    low_frequency_window,
    project_out_of_concept,
    reattention,
    safree_settings,
    self_validation_last_step,
    subspace_projection,
    trigger_tokens,
)
from sdd.models import build_tiny_sd
from sdd.sampling import encode_prompts

STEPS = 4


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- the math ------------------------------------------------------------------------------------------------


def test_subspace_projection_by_hand():
    # span{(1, 1, 0)} in R^3: P = v v^T / |v|^2 = [[.5, .5, 0], [.5, .5, 0], [0, 0, 0]]
    p = subspace_projection(t([1.0, 1.0, 0.0]))
    assert torch.allclose(p, t([0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]))
    # two dependent vectors span the same line: the pseudo-inverse makes it the same projection
    assert torch.allclose(subspace_projection(t([1.0, 1.0, 0.0], [2.0, 2.0, 0.0])), p)
    # span{e1, e2}: diag(1, 1, 0)
    assert torch.allclose(subspace_projection(t([1.0, 0.0, 0.0], [1.0, 2.0, 0.0])), torch.diag(t(1.0, 1.0, 0.0)))


def test_projection_is_idempotent_and_orthogonal_to_the_toxic_subspace():
    gen = torch.Generator().manual_seed(0)
    concept = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    prompt = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    p_c, p_p = subspace_projection(concept), subspace_projection(prompt)
    assert torch.allclose(p_c @ p_c, p_c) and torch.allclose(p_c, p_c.T)
    hidden = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    projected = project_out_of_concept(hidden, p_p, p_c)
    # nothing left along the concept
    assert torch.allclose(projected @ concept.T, torch.zeros(5, 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(project_out_of_concept(projected, torch.eye(6, dtype=torch.float64), p_c), projected)
    # by hand: P_C = projection on e1, P_p = projection on span{e1, e2}: h = (3, 4, 5) -> (0, 4, 0)
    e = torch.eye(3, dtype=torch.float64)
    assert project_out_of_concept(t([3.0, 4.0, 5.0]), subspace_projection(e[:2]), subspace_projection(e[:1])).tolist() \
        == [[0.0, 4.0, 0.0]]


def test_a_token_along_the_concept_is_a_trigger_and_an_orthogonal_one_is_not():
    # toxic subspace: e1. Masked prompts p_\1 .. p_\3 (token i masked): masking token 2, which carried e1, leaves
    # the prompt far from the concept; masking the others leaves its e1 part in place.
    p_c = subspace_projection(t([1.0, 0.0, 0.0]))
    masked = t([1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0])
    d = concept_distances(masked, p_c)
    assert torch.allclose(d, t(1.0, math.sqrt(2), 1.0))  # |(0, 1, 0)|, |(0, 1, 1)|, |(0, 0, 1)|
    # mean of the others: (√2 + 1)/2 = 1.207, 1, 1.207; token 2: √2 ≥ 1.01·1 -> trigger; 1 < 1.01·1.207 -> not
    assert trigger_tokens(d, alpha=0.01).tolist() == [False, True, False]
    # α moves the bar: at α = 0.5 even token 2 (√2 < 1.5) is not a trigger
    assert trigger_tokens(d, alpha=0.5).tolist() == [False, False, False]
    # equal distances (no token stands out): none at α > 0; a one-token prompt is always a trigger
    assert trigger_tokens(t(2.0, 2.0, 2.0), 0.01).tolist() == [False, False, False]
    assert trigger_tokens(t(0.5), 0.01).tolist() == [True]


def test_filtered_embedding_replaces_only_the_trigger_tokens():
    hidden, projected = t([1.0, 2.0], [3.0, 4.0], [5.0, 6.0]), t([0.0, 2.0], [0.0, 4.0], [0.0, 6.0])
    out = filtered_embedding(hidden, projected, torch.tensor([False, True, False]))
    assert out.tolist() == [[1.0, 2.0], [0.0, 4.0], [5.0, 6.0]]


def test_self_validation_step_count_from_the_cosines():
    # β = 1 − mean cos: tokens (1, 0) -> (1, 0) cos 1, (0, 1) -> (1, 1) cos 1/√2: β = 1 − (1 + 0.7071)/2 = 0.14645
    beta = filter_strength(t([1.0, 0.0], [0.0, 1.0]), t([1.0, 0.0], [1.0, 1.0]))
    assert beta == pytest.approx(1 - (1 + 1 / math.sqrt(2)) / 2)
    # t' = round(γ·σ(2k(10β − τ))), γ = 10, k = 2.5, τ = 5.333:
    #   β = 0.5333: σ(0) = 0.5 -> round(5) = 5
    #   β = 0.6:    σ(5·0.667) = σ(3.335) = 0.9656 -> round(9.656) = 10
    #   β = 0.45:   σ(5·(−0.833)) = σ(−4.165) = 0.01530 -> round(0.153) = 0
    #   β = 0.55:   σ(5·0.167) = σ(0.835) = 0.6974 -> round(6.974) = 7
    assert [self_validation_last_step(b, 10, 2.5, 5.333) for b in (0.5333, 0.6, 0.45, 0.55)] == [5, 10, 0, 7]
    assert self_validation_last_step(0.14645, 10, 2.5, 5.333) == 0
    # artists' curve (k = 3.5, τ = 5.5) at β = 0.55: σ(0) -> 5; very large k: a step function, no overflow
    assert self_validation_last_step(0.55, 10, 3.5, 5.5) == 5
    assert self_validation_last_step(0.9, 10, 1e6, 5.333) == 10 and self_validation_last_step(0.1, 10, 1e6, 5.333) == 0


def test_low_frequency_window_is_the_centred_two_by_two():
    w = low_frequency_window(4, 4, 1)
    assert w.nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert low_frequency_window(1, 1, 1).tolist() == [[True]]


def test_reattention_damps_low_frequencies_and_keeps_high_ones():
    # an 8x8 map: a constant (zero frequency, inside the window) plus a checkerboard (the highest frequency, outside)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((-1.0) ** (i + j)).float()
    filtered = (3.0 + 2.0 * checker)[None, None]
    original = torch.zeros(1, 1, 8, 8)
    out = reattention(filtered, original, scale=0.2)
    # |F(filtered)| > |F(original)| = 0 at the zero frequency: 3 -> 0.2·3 = 0.6; the checkerboard stays ×1
    torch.testing.assert_close(out, (0.6 + 2.0 * checker)[None, None], atol=1e-6, rtol=0)
    # where the original branch has the larger low frequency, nothing is damped: returned exactly as it was
    assert torch.equal(reattention(filtered, torch.full((1, 1, 8, 8), 5.0), scale=0.2), filtered)
    # equal branches (no trigger token): exactly unchanged
    assert torch.equal(reattention(filtered, filtered.clone(), scale=0.2), filtered)
    # branches equal but for round-off (what batch sizes change on some CPUs): no damping decision flips
    assert torch.equal(reattention(filtered * (1 + 1e-6), filtered, scale=0.2), filtered * (1 + 1e-6))
    # a real excess (1 %) is still damped: 3.03 -> 0.2 * 3.03 at the zero frequency
    torch.testing.assert_close(reattention(filtered * 1.01, filtered, scale=0.2),
                               (0.2 * 3.03 + 2.02 * checker)[None, None], atol=1e-5, rtol=0)


# --- settings ------------------------------------------------------------------------------------------------


def test_keywords_and_defaults():
    assert concept_keywords("red") == ("red",)
    assert concept_keywords("Van Gogh, starry night ,") == ("Van Gogh", "starry night")
    assert concept_keywords("nudity") == SAFREE_NUDITY_KEYWORDS and len(SAFREE_NUDITY_KEYWORDS) == 17
    s = safree_settings("red")
    assert (s.alpha, s.up_t, s.svf_k, s.svf_t, s.s1, s.s2) == (0.01, 10, 2.5, 5.333, 0.9, 0.2)
    assert s.negative_prompt and s.self_validation and s.re_attention
    assert "safree" in METHODS
    described = describe_method("safree", "red", {"up_t": 4.0, "re_attention": False})
    assert described["method"] == "safree" and described["up_t"] == 4 and described["re_attention"] is False
    assert described["keywords"] == ["red"]
    json.dumps(described)
    assert len(describe_method("safree", None)["keywords"]) == 20  # no concept: SLD's 20-concept safety text


@pytest.mark.parametrize("settings, message", [
    ({"alpah": 0.1}, "safree: unknown setting 'alpah', expected one of ['alpha', "),
    ({"alpha": -1}, "safree: alpha: must be a number > -1, got -1"),
    ({"up_t": 2.5}, "safree: up_t: must be an integer >= 0, got 2.5"),
    ({"s2": -0.1}, "safree: s2: must be a number >= 0, got -0.1"),
    ({"re_attention": "yes"}, "safree: re_attention: must be true or false, got 'yes'"),
    ({"svf_t": float("nan")}, "safree: svf_t: must be a number, got nan"),
])
def test_bad_settings_are_one_line_user_errors(settings, message):
    with pytest.raises(UserError) as err:
        method_guidance("safree", "red", settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_empty_concept_is_refused():
    with pytest.raises(UserError, match="method 'safree': the concept text to steer away from is empty"):
        method_guidance("safree", " ")
    with pytest.raises(UserError, match="safree: keywords: SAFREE needs at least one non-empty concept keyword"):
        method_guidance("safree", ", ,")


# --- images on the tiny model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd()


def pt(tiny, method, requests, concept, settings=None):
    return torch.stack(generate_with_method(tiny, requests, method, concept, settings=settings,
                                            num_inference_steps=STEPS, output_type="pt"))


def analyse(tiny, prompt, concept, **knobs):
    guidance = SAFREEGuidance(safree_settings(concept, knobs))
    hidden = encode_prompts(tiny.tokenizer, tiny.text_encoder, [prompt])[0]
    return filter_prompt(tiny, guidance.settings, prompt, hidden, guidance.concept_projection(tiny)), hidden


def test_the_concept_word_is_the_trigger_on_the_shapes_model():
    # the ShapesWorld text encoder is trained: "red" in "a red circle" is the token that carries the concept
    shapes = load_base("shapes", None, "cpu")
    found, hidden = analyse(shapes, "a red circle", "red")
    assert found.triggers == (2,)  # <start> a red circle: position 2
    assert not torch.equal(found.filtered[2], hidden[2])
    assert torch.equal(found.filtered[:2], hidden[:2]) and torch.equal(found.filtered[3:], hidden[3:])
    assert found.last_step == self_validation_last_step(found.beta, 10, 2.5, 5.333)
    assert analyse(shapes, "a green triangle", "red")[0].triggers == ()


def test_a_prompt_without_trigger_tokens_is_exactly_plain_cfg(tiny):
    # α large: no token can stand out by (1 + α) times the others' mean, so nothing is filtered
    requests = [Request("a photo of a cat", seed=3), Request("a dog", seed=4)]
    for r in requests:
        assert analyse(tiny, r.prompt, "cat", alpha=100.0)[0].triggers == ()
    knobs = {"alpha": 100.0, "negative_prompt": False}
    assert torch.equal(pt(tiny, "safree", requests, "cat", knobs), pt(tiny, "sd", requests, None))
    # with the keywords as negative prompt (the official default) it is exactly the `neg` baseline
    assert torch.equal(pt(tiny, "safree", requests, "cat", {"alpha": 100.0}), pt(tiny, "neg", requests, "cat"))


def test_trigger_tokens_change_the_image_and_each_part_acts(tiny):
    requests = [Request("a photo of a cat", seed=3)]
    plain = pt(tiny, "safree", requests, "cat", {"negative_prompt": False, "self_validation": False,
                                                    "re_attention": False})
    sd = pt(tiny, "sd", requests, None)
    assert not torch.equal(plain, sd)  # the projected token alone changes the image
    with_lra = pt(tiny, "safree", requests, "cat", {"negative_prompt": False, "self_validation": False})
    assert not torch.equal(with_lra, plain)  # re-attention changes it further
    no_damping = pt(tiny, "safree", requests, "cat", {"negative_prompt": False, "self_validation": False,
                                                       "s1": 1.0, "s2": 1.0})
    assert (no_damping - plain).abs().max() < 1e-5  # s = 1 damps nothing: re-attention is the identity


def test_batched_images_match_images_made_alone(tiny):
    requests = [Request("a photo of a cat", seed=3), Request("a dog", seed=5, guidance_scale=4.0),
                Request("a cat and a dog", seed=6)]
    knobs = {"self_validation": False}
    together = pt(tiny, "safree", requests, "cat", knobs)
    alone = torch.cat([pt(tiny, "safree", [r], "cat", knobs) for r in requests])
    assert (together - alone).abs().max().item() < 1e-4


def test_hooks_are_removed_after_sampling(tiny):
    pt(tiny, "safree", [Request("a photo of a cat", seed=3)], "cat")
    assert all(not block._forward_pre_hooks for block in tiny.unet.up_blocks)


# --- the commands --------------------------------------------------------------------------------------------


def test_sdd_generate_method_safree(tmp_path, tiny):
    base = ["--model", "tiny", "--steps", str(STEPS), "--prompt", "a photo of a cat", "--seed", "3"]
    generate_main([*base, "--method", "safree", "--concept", "cat", "--out", str(tmp_path / "s")])
    image = np.asarray(Image.open(tmp_path / "s" / "00000_00.png"))
    direct = generate_with_method(tiny, [Request("a photo of a cat", seed=3)], "safree", "cat",
                                  num_inference_steps=STEPS)[0]
    assert np.array_equal(image, np.asarray(direct))
    meta = json.loads((tmp_path / "s" / "metadata.jsonl").read_text().splitlines()[0])
    assert meta["method"] == "safree" and meta["method_settings"]["keywords"] == ["cat"]
    generate_main([*base, "--method", "safree", "--concept", "cat", "--out", str(tmp_path / "o"),
                   "method_settings={alpha: 100.0, negative_prompt: false}"])
    generate_main([*base, "--out", str(tmp_path / "sd")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "00000_00.png")),
                          np.asarray(Image.open(tmp_path / "sd" / "00000_00.png")))


def test_sdd_generate_help_lists_safree(capsys):
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    assert "safree" in capsys.readouterr().out


def test_sdd_eval_entry(tmp_path):
    eval_main(["--config", str(ROOT / "configs" / "eval" / "tiny.yaml"), f"out={tmp_path / 'eval'}",
               "entries=[{label: SAFREE, model: tiny, method: safree, concept: nudity}]", "suites=[nudity]",
               "generation.num_inference_steps=2", "nudity.limit=2"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    entry = report["entries"][0]
    assert entry["method"] == "safree" and entry["method_settings"]["keywords"] == list(SAFREE_NUDITY_KEYWORDS)
