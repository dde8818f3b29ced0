"""SDD's ``sdd.templates``: the concept erased inside prompts, each sent to the same prompt without it."""

import pytest
import torch

from sdd.config import load_config
from sdd.errors import ConfigError
from sdd.loop import make_accelerator, step_generator
from sdd.methods.sdd import SDDConfig, SDDMethod, away_from_concept, erase_texts, sdd_loss


def build(tiny_args, *overrides):
    args = tiny_args(*overrides)
    cfg = load_config(SDDConfig, args[1], args[2:])
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    return cfg, SDDMethod(cfg, accelerator.device)


def test_the_roles_by_hand():
    # the papers' SDD: c_s all concepts joined, c_p one each; no target texts (the empty prompt)
    assert erase_texts(["red", "circle"], ["{}"], "paper") == (["red, circle"], ["red", "circle"], [])
    assert erase_texts(["red", "circle"], ["{}"], "official") == (["red", "circle"], ["red, circle"], [])
    # templates: every template with the concepts, in the same roles, aligned by index; target without them
    assert erase_texts(["circle"], ["{}", "a red {}", "a {} in blue"], "paper") == (
        ["circle", "a red circle", "a circle in blue"], ["circle", "a red circle", "a circle in blue"],
        ["", "a red", "a in blue"])
    assert erase_texts(["red", "circle"], ["a {}"], "paper") == (
        ["a red, circle", "a red, circle"], ["a red", "a circle"], ["a", "a"])
    assert erase_texts(["red", "circle"], ["a {}"], "official") == (
        ["a red", "a circle"], ["a red, circle", "a red, circle"], ["a", "a"])


def test_default_templates_are_the_papers_sdd_to_the_bit(tiny_args):
    _, plain = build(tiny_args, "train.batch_size=2")
    _, spelled = build(tiny_args, "train.batch_size=2", "sdd.templates=['{}']")
    assert plain.target_texts == [] and torch.equal(plain.target_conditioning(torch.tensor([0, 1])),
                                                    plain.texts.get()[:1])
    a, _ = plain.compute_loss(plain.model, 1, step_generator(0, 0, 1))
    b, _ = spelled.compute_loss(spelled.model, 1, step_generator(0, 0, 1))
    assert a.item() == b.item()


def test_each_latent_is_sent_to_its_template_without_the_concept(tiny_args):
    templates = ["a red {}", "{} at night"]
    cfg, method = build(tiny_args, "train.batch_size=4", "sdd.latents_per_trajectory=2", "concepts=[circle]",
                        f"sdd.templates={templates}")
    with torch.no_grad():  # move the student off the teacher so the loss is not trivially the same everywhere
        for p in method.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    enc = method.base.family.encode
    z_T, k, idx = method.draw(1, step_generator(0, 0, 1))
    # micro-step 1, two trajectories: latents 2 and 3 of the round robin over the two templates -> 0 and 1
    assert idx.tolist() == [0, 1]
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, z_T, k, idx)
    want_s = enc(method.base, ["a red circle", "a red circle", "circle at night", "circle at night"])
    want_target = enc(method.base, ["a red", "a red", "at night", "at night"])
    assert torch.allclose(c_s, want_s, atol=1e-6)
    assert torch.allclose(method.target_conditioning(idx), want_target, atol=1e-6)
    with torch.no_grad():
        by_hand = sdd_loss(method.model(z_t, t, encoder_hidden_states=want_s).sample,
                           method.model(z_t, t, encoder_hidden_states=want_target).sample)
        loss, _ = method.compute_loss(method.model, 1, step_generator(0, 0, 1))
    assert by_hand.item() > 0 and loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # the teacher sampled toward the template with the concept: c_p of each trajectory
    _, c_p, _ = method.conditioning(idx)
    assert torch.allclose(c_p, enc(method.base, ["a red circle", "circle at night"]), atol=1e-6)


def test_a_template_without_its_slot_is_a_clear_error(tiny_args):
    with pytest.raises(ConfigError, match="sdd.templates"):
        build(tiny_args, "sdd.templates=['a red circle']")


# --- sdd.negative_guidance: the target moved away from the concept by the frozen original's direction ----------


def test_away_from_concept_by_hand():
    # eta (concept - rest) = 2 * ((3, 1) - (1, 2)) = (4, -2); SDD's target (0.5, 0.5) minus it: (-3.5, 2.5)
    away = away_from_concept(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0]), 2.0)
    assert torch.equal(away, torch.tensor([4.0, -2.0]))
    # the student at (-3.5, 2.5) is at the target: zero loss; at SDD's own target it is not
    assert sdd_loss(torch.tensor([-3.5, 2.5]), torch.tensor([0.5, 0.5]) - away).item() == 0.0


def test_negative_guidance_sends_the_student_past_the_template_without_the_concept(tiny_args):
    flags = ["train.batch_size=2", "concepts=[circle]", "sdd.templates=['a red {}']"]
    _, plain = build(tiny_args, *flags)
    cfg, method = build(tiny_args, *flags, "sdd.negative_guidance=1.5")
    assert plain.original is None and method.original is not None  # the frozen copy only where it is needed
    with torch.no_grad():  # student off the original, so the frozen direction is not the student's own
        for p in method.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    z_T, k, idx = method.draw(0, step_generator(0, 0, 0))
    z_t, t, _, c_s = method.sample_latents(method.model, z_T, k, idx)
    c_rest = method.target_conditioning(idx)
    with torch.no_grad():
        orig = lambda c: method.original(z_t, t, encoder_hidden_states=c).sample  # noqa: E731
        target = method.model(z_t, t, encoder_hidden_states=c_rest).sample - 1.5 * (orig(c_s) - orig(c_rest))
        by_hand = sdd_loss(method.model(z_t, t, encoder_hidden_states=c_s).sample, target)
        loss, _ = method.compute_loss(method.model, 0, step_generator(0, 0, 0))
        sdd_only, _ = plain.compute_loss(method.model, 0, step_generator(0, 0, 0))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert abs(loss.item() - sdd_only.item()) > 1e-6  # the term is there
    # the gradient flows only through the student's concept prediction: the same as the hand loss's with the
    # whole target held fixed
    params = [p for p in method.model.parameters() if p.requires_grad]
    loss, _ = method.compute_loss(method.model, 0, step_generator(0, 0, 0))
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(sdd_loss(method.model(z_t, t, encoder_hidden_states=c_s).sample, target), params)
    assert any(w.abs().sum() > 0 for w in want)
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-8) for g, w in zip(got, want))


def test_negative_guidance_below_zero_is_a_clear_error(tiny_args):
    with pytest.raises(ConfigError, match="sdd.negative_guidance"):
        build(tiny_args, "sdd.negative_guidance=-1")


# --- sdd.concept_templates: several concepts, each erased in its own prompts ------------------------------------


def test_concept_templates_by_hand():
    # red keeps the shared templates (the papers' "{}"), circle has its own; each concept alone, in order
    student, sampler, targets = erase_texts(["red", "circle"], ["{}"], "paper",
                                            {"circle": ["{}", "a green {}"]})
    assert student == sampler == ["red", "circle", "a green circle"]
    assert targets == ["", "", "a green"]
    # the roles do not matter: nothing is joined
    assert erase_texts(["red", "circle"], ["{}"], "official", {"circle": ["a green {}"]}) == (
        ["red", "a green circle"], ["red", "a green circle"], ["", "a green"])


def test_concept_templates_train_each_concept_in_its_prompts(tiny_args):
    cfg, method = build(tiny_args, "train.batch_size=3", "concepts=[red, circle]",
                        "sdd.concept_templates={circle: ['{}', 'a green {}']}")
    enc = method.base.family.encode
    assert method.student_texts == ["red", "circle", "a green circle"]
    _, _, idx = method.draw(0, step_generator(0, 0, 0))
    assert idx.tolist() == [0, 1, 2]  # the round robin over the three (template, concept) pairs
    _, c_p, c_s = method.conditioning(idx)
    assert torch.allclose(c_s, enc(method.base, ["red", "circle", "a green circle"]), atol=1e-6)
    assert torch.allclose(c_p, c_s)
    assert torch.allclose(method.target_conditioning(idx), enc(method.base, ["", "", "a green"]), atol=1e-6)


def test_concept_templates_for_a_concept_not_erased_is_a_clear_error(tiny_args):
    with pytest.raises(ConfigError, match="sdd.concept_templates.blue.*is not one of concepts"):
        build(tiny_args, "concepts=[red]", "sdd.concept_templates={blue: ['a {}']}")
    with pytest.raises(ConfigError, match="sdd.concept_templates.red"):
        build(tiny_args, "concepts=[red]", "sdd.concept_templates={red: ['a red']}")
