"""SDD's optional preservation term (``sdd.preserve_prompts``): exact at the start, plain SDD at weight 0, and it
holds the kept prompts' predictions where plain SDD lets them drift."""

import pytest
import torch

from sdd.config import load_config
from sdd.errors import ConfigError
from sdd.loop import fit, make_accelerator, step_generator
from sdd.methods.sdd import SDDConfig, SDDMethod, sdd_loss
from sdd.sampling import sample_to_k

KEEP = ["a photo of a dog", "a landscape", "a red car"]


def build(tiny_args, *overrides):
    args = tiny_args(*overrides)
    cfg = load_config(SDDConfig, args[1], args[2:])
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    return cfg, accelerator, SDDMethod(cfg, accelerator.device)


def nudge(method):
    """Move the student's trainable parameters off the original's, so the terms compared to it are not zero."""
    with torch.no_grad():
        for p in method.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def keep_flag(weight=1.0):
    return [f"sdd.preserve_prompts=[{', '.join(repr(p) for p in KEEP)}]", f"sdd.preserve_weight={weight}"]


def test_the_term_is_zero_at_the_start_and_weight_zero_is_plain_sdd(tiny_args):
    _, _, plain = build(tiny_args)
    _, _, kept = build(tiny_args, *keep_flag(weight=0.0))
    assert plain.original is None  # off by default: no frozen copy is made
    loss_plain, _ = plain.compute_loss(plain.model, 3, step_generator(0, 0, 3))
    loss_kept, logs = kept.compute_loss(kept.model, 3, step_generator(0, 0, 3))
    # before any step the student is the original, so the preservation term is exactly zero ...
    assert float(logs["loss_preserve"]) == 0.0
    # ... and the draws (noise, k, concept) are those of plain SDD: same loss to the bit
    assert loss_kept.item() == loss_plain.item() == float(logs["loss_erase"])


def test_the_term_is_the_mse_to_the_frozen_original_on_round_robin_prompts(tiny_args):
    cfg, _, method = build(tiny_args, *keep_flag(weight=2.5), "train.batch_size=2")
    nudge(method)
    embeds = method.texts.get()
    keep_embeds = embeds[-len(KEEP):]
    # micro-step 2, batch 2, one process: latents 4 and 5 of the run -> prompts 4 % 3 = 1 and 5 % 3 = 2
    assert torch.equal(method.preserve_conditioning(2), keep_embeds[[1, 2]])

    z_T, k, idx = method.draw(2, step_generator(0, 0, 2))
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, z_T, k, idx)
    with torch.no_grad():
        by_hand = sdd_loss(method.model(z_t, t, encoder_hidden_states=keep_embeds[[1, 2]]).sample,
                           method.original(z_t, t, encoder_hidden_states=keep_embeds[[1, 2]]).sample)
        erase = method.student_loss(method.model, z_t, t, c_uncond, c_s)
        loss, logs = method.compute_loss(method.model, 2, step_generator(0, 0, 2))
    assert by_hand.item() > 0
    assert float(logs["loss_preserve"]) == pytest.approx(by_hand.item(), rel=1e-6)
    assert loss.item() == pytest.approx(erase.item() + 2.5 * by_hand.item(), rel=1e-6)


def drift(method, prompts_embeds, seed=0):
    """Mean squared distance of the student's predictions from the original model's, on fixed noisy latents."""
    g = torch.Generator().manual_seed(seed)
    n = prompts_embeds.shape[0]
    z = torch.randn((n, *method.latent_shape), generator=g)
    t = torch.full((n,), 500, dtype=torch.long)
    with torch.no_grad():
        return sdd_loss(method.model(z, t, encoder_hidden_states=prompts_embeds).sample,
                        method.original(z, t, encoder_hidden_states=prompts_embeds).sample).item()


def train(tiny_args, *overrides):
    cfg, accelerator, method = build(tiny_args, "train.steps=15", "train.lr=1e-3", *overrides)
    initial = {n: p.clone() for n, p in method.original.named_parameters()}
    fit(accelerator, method, cfg)
    # the original never moves (and its frozen tensors are the student's own)
    assert all(torch.equal(p, initial[n]) for n, p in method.original.named_parameters())
    student = dict(method.model.named_parameters())
    shared = [n for n, p in method.original.named_parameters() if not student[n].requires_grad]
    assert shared and all(method.original.get_parameter(n) is student[n] for n in shared)
    return method


def test_preservation_holds_the_kept_prompts_where_plain_sdd_drifts(tiny_args, tmp_path):
    # the same run twice, the preservation weight the only difference (weight 0 still builds the original)
    plain = train(tiny_args, *keep_flag(weight=0.0), f"output_dir={tmp_path / 'plain'}")
    kept = train(tiny_args, *keep_flag(weight=1.0), f"output_dir={tmp_path / 'kept'}")
    keep_embeds = kept.texts.get()[-len(KEEP):]
    concept = kept.texts.get()[1:2]
    assert drift(plain, keep_embeds) > 0
    assert drift(kept, keep_embeds) < 0.5 * drift(plain, keep_embeds)
    # and it is selective: the concept's prediction moved away from the original's more than the kept ones did
    # (measured: keep 0.0115 plain vs 0.0006 kept; concept 0.0018 kept)
    assert drift(kept, concept) > 2 * drift(kept, keep_embeds)


def test_an_empty_prompt_to_keep_is_a_clear_error(tiny_args):
    with pytest.raises(ConfigError, match="sdd.preserve_prompts"):
        build(tiny_args, "sdd.preserve_prompts=['a dog', ' ']")
    with pytest.raises(ConfigError, match="sdd.preserve_weight"):
        build(tiny_args, "sdd.preserve_prompts=['a dog']", "sdd.preserve_weight=-1")


@pytest.mark.parametrize("where", ["own", "both"])
def test_own_latents_are_the_teachers_trajectories_toward_the_prompts_to_keep(tiny_args, where):
    """``sdd.preserve_latents=own``: the term is evaluated on latents the EMA teacher samples toward the prompt to
    keep (noise drawn after the concept's draws, the same k), each trajectory's latents with its own prompt;
    ``both``: the term on those latents plus the term on the concept's, each at lambda."""
    cfg, _, method = build(tiny_args, *keep_flag(weight=2.5), f"sdd.preserve_latents={where}", "train.batch_size=4",
                           "sdd.latents_per_trajectory=2")
    nudge(method)
    keep_embeds = method.texts.get()[-len(KEEP):]
    generator = step_generator(0, 0, 2)
    z_T, k, idx = method.draw(2, generator)
    assert k.shape == (2, 2)
    z_keep_T = torch.randn((2, *method.latent_shape), generator=generator)  # what follows draw()'s draws
    # micro-step 2, two trajectories a step, one process: trajectories 4 and 5 of the run -> prompts 1 and 2
    c_traj = keep_embeds[[1, 2]]
    z_keep, t_keep = sample_to_k(method.teacher, method.scheduler, z_keep_T, c_traj, method.texts.get()[:1],
                                 cfg.sdd.guidance_scale, k)
    c_keep = c_traj.repeat_interleave(2, 0)  # the latents of a trajectory share its prompt
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, z_T, k, idx)
    with torch.no_grad():
        by_hand = sdd_loss(method.model(z_keep, t_keep, encoder_hidden_states=c_keep).sample,
                           method.original(z_keep, t_keep, encoder_hidden_states=c_keep).sample)
        on_concept = sdd_loss(method.model(z_t, t, encoder_hidden_states=method.preserve_conditioning(2)).sample,
                              method.original(z_t, t, encoder_hidden_states=method.preserve_conditioning(2)).sample)
        erase = method.student_loss(method.model, z_t, t, c_uncond, c_s)
        loss, logs = method.compute_loss(method.model, 2, step_generator(0, 0, 2))
    assert not torch.equal(z_keep, z_t)
    assert by_hand.item() > 0 and by_hand.item() != pytest.approx(on_concept.item(), rel=1e-3)
    if where == "both":
        by_hand = by_hand + on_concept
    assert float(logs["loss_preserve"]) == pytest.approx(by_hand.item(), rel=1e-6)
    assert float(logs["loss_erase"]) == pytest.approx(erase.item(), rel=1e-6)  # the erasure's draws are unchanged
    assert loss.item() == pytest.approx(erase.item() + 2.5 * by_hand.item(), rel=1e-6)


@pytest.mark.parametrize("where", ["own", "both"])
def test_own_latents_without_prompts_to_keep_is_a_clear_error(tiny_args, where):
    with pytest.raises(ConfigError, match=f"sdd.preserve_latents.*'{where}'.*preserve_prompts"):
        build(tiny_args, f"sdd.preserve_latents={where}")


def test_the_unconditional_term_holds_the_empty_prompt_on_the_kept_prompts_trajectories(tiny_args):
    """``sdd.preserve_unconditional`` = mu: mu * || eps(z_keep, emptyset) - eps_orig(z_keep, emptyset) ||^2 on the
    latents the teacher samples toward the prompts to keep (``own``'s latents), beside the kept prompts' term on the
    concept's latents (the default ``concept``), which is unchanged."""
    cfg, _, method = build(tiny_args, *keep_flag(weight=2.5), "sdd.preserve_unconditional=4.0",
                           "train.batch_size=4", "sdd.latents_per_trajectory=2")
    nudge(method)
    embeds = method.texts.get()
    keep_embeds, c_empty = embeds[-len(KEEP):], embeds[:1]
    generator = step_generator(0, 0, 2)
    z_T, k, idx = method.draw(2, generator)
    z_keep_T = torch.randn((2, *method.latent_shape), generator=generator)
    z_keep, t_keep = sample_to_k(method.teacher, method.scheduler, z_keep_T, keep_embeds[[1, 2]], c_empty,
                                 cfg.sdd.guidance_scale, k)
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, z_T, k, idx)
    with torch.no_grad():
        empty = c_empty.expand(4, -1, -1)
        hold = sdd_loss(method.model(z_keep, t_keep, encoder_hidden_states=empty).sample,
                        method.original(z_keep, t_keep, encoder_hidden_states=empty).sample)
        keep = sdd_loss(method.model(z_t, t, encoder_hidden_states=method.preserve_conditioning(2)).sample,
                        method.original(z_t, t, encoder_hidden_states=method.preserve_conditioning(2)).sample)
        erase = method.student_loss(method.model, z_t, t, c_uncond, c_s)
        loss, logs = method.compute_loss(method.model, 2, step_generator(0, 0, 2))
    assert hold.item() > 0
    assert float(logs["loss_preserve_unconditional"]) == pytest.approx(hold.item(), rel=1e-6)
    assert float(logs["loss_preserve"]) == pytest.approx(keep.item(), rel=1e-6)
    assert loss.item() == pytest.approx(erase.item() + 2.5 * keep.item() + 4.0 * hold.item(), rel=1e-6)


def test_the_unconditional_term_holds_the_empty_prompt_where_plain_preservation_lets_it_drift(tiny_args, tmp_path):
    plain = train(tiny_args, *keep_flag(weight=1.0), f"output_dir={tmp_path / 'plain'}")
    held = train(tiny_args, *keep_flag(weight=1.0), "sdd.preserve_unconditional=5.0", f"output_dir={tmp_path / 'u'}")
    empty = held.texts.get()[:1].expand(4, -1, -1)
    assert drift(plain, empty) > 0
    assert drift(held, empty) < 0.5 * drift(plain, empty)


def test_the_unconditional_term_needs_prompts_to_keep(tiny_args):
    with pytest.raises(ConfigError, match="sdd.preserve_unconditional.*preserve_prompts"):
        build(tiny_args, "sdd.preserve_unconditional=1.0")
    with pytest.raises(ConfigError, match="sdd.preserve_unconditional"):
        build(tiny_args, "sdd.preserve_prompts=['a dog']", "sdd.preserve_unconditional=-1")


def test_erasing_the_concept_from_the_unconditional_prediction_is_the_originals_minus_the_step_away(tiny_args):
    """``sdd.erase_unconditional`` = nu: on the concept's latents, nu * || eps(z_t, {}) - sg(eps_orig(z_t, {}) - eta
    (eps_orig(z_t, c_s) - eps_orig(z_t, {}))) ||^2 beside SDD's term (here c_rest is the empty prompt)."""
    cfg, _, method = build(tiny_args, "sdd.negative_guidance=1.5", "sdd.erase_unconditional=2.0", "train.batch_size=2")
    nudge(method)
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, *method.draw(1, step_generator(0, 0, 1)))
    empty = c_uncond.expand(2, -1, -1)
    with torch.no_grad():
        orig_empty = method.original(z_t, t, encoder_hidden_states=empty).sample
        away = 1.5 * (method.original(z_t, t, encoder_hidden_states=c_s).sample - orig_empty)
        by_hand = sdd_loss(method.model(z_t, t, encoder_hidden_states=empty).sample, orig_empty - away)
        erase = method.student_loss(method.model, z_t, t, c_uncond, c_s, away)
        loss, logs = method.compute_loss(method.model, 1, step_generator(0, 0, 1))
    assert by_hand.item() > 0
    assert float(logs["loss_erase_unconditional"]) == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss.item() == pytest.approx(erase.item() + 2.0 * by_hand.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="sdd.erase_unconditional.*negative_guidance"):
        build(tiny_args, "sdd.erase_unconditional=1.0")
