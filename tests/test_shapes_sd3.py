"""The ShapesWorld model of the SD3 kind (``shapes-base`` with ``family: sd3``): the flow-matching math by hand,
the training module's conditioning against ``StableDiffusion3Pipeline.encode_prompt``, the zero T5, and a few
training steps that change the transformer and both text encoders and export a folder the stock pipeline and
``load_components`` load and generate from."""

import numpy as np
import pytest
import torch
from conftest import ROOT
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from sdd import api
from sdd.errors import UserError
from sdd.families import mmdit
from sdd.generation import Request, generate
from sdd.loop import fit, make_accelerator
from sdd.methods import shapes_base
from sdd.methods.shapes_base import flow_matching_loss, flow_noisy, sample_sigmas, shift_sigmas
from sdd.models import SHAPES_MODEL_DIR, load_components
from sdd.shapes import model as shapes_model

TINY = ["flow.num_layers=2", "flow.num_attention_heads=2", "flow.attention_head_dim=8", "flow.text_layers=1",
        "train.batch_size=4", "train.lr=1e-3", "train.lr_warmup_steps=0", "train.checkpoint_every=0",
        "tracking.tracker=none", "tracking.sample_every=0"]


def tiny_config(out, *overrides):
    return api.run_config(str(ROOT / "configs/shapes/base_sd3.yaml"),
                          [f"output_dir={out}", f"vae_path={SHAPES_MODEL_DIR}/vae", *TINY, *overrides])


# --- the math, by hand ---------------------------------------------------------------------------------------


def test_flow_noising_and_loss_by_hand():
    x0 = torch.tensor([[1.0, 2.0]])
    eps = torch.tensor([[3.0, -1.0]])
    # x_s = (1 - s) x0 + s eps at s = 1/4: (0.75 + 0.75, 1.5 - 0.25)
    assert torch.allclose(flow_noisy(x0, eps, torch.tensor([0.25])), torch.tensor([[1.5, 1.25]]))
    # target v = eps - x0 = (2, -3); v = 0 gives (4 + 9) / 2
    assert flow_matching_loss(torch.zeros(1, 2), eps - x0).item() == pytest.approx(6.5)
    assert flow_matching_loss(eps - x0, eps - x0).item() == 0.0
    # at the ends: s = 0 is the data, s = 1 the noise
    assert torch.equal(flow_noisy(x0, eps, torch.tensor([0.0])), x0)
    assert torch.equal(flow_noisy(x0, eps, torch.tensor([1.0])), eps)


def test_shift_by_hand_and_as_the_scheduler_shifts():
    # 3 * 0.5 / (1 + 2 * 0.5) = 0.75; shift 1 is the identity
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    s = torch.linspace(0.01, 1.0, 7)
    assert torch.equal(shift_sigmas(s, 1.0), s)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    assert torch.allclose(shift_sigmas(plain.sigmas, 3.0), scheduler.sigmas, atol=1e-6)


def test_sigma_sampling():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample_sigmas(5, g, "uniform", shift=3.0), shift_sigmas(u, 3.0))
    n = torch.randn(5, generator=torch.Generator().manual_seed(1))
    got = sample_sigmas(5, torch.Generator().manual_seed(1), "logit_normal", mean=0.5, std=2.0)
    assert torch.allclose(got, torch.sigmoid(0.5 + 2.0 * n))
    many = sample_sigmas(20000, torch.Generator().manual_seed(2))
    assert 0 < many.min() and many.max() < 1 and abs(many.median().item() - 0.5) < 0.02


# --- the model ---------------------------------------------------------------------------------------------------


def test_zero_t5_and_training_conditioning_match_the_pipeline(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    method = shapes_base.ShapesDiffusionMethod(cfg)
    c = method.base
    ids = c.tokenizer_3(["a red circle", ""], padding="max_length", max_length=256, return_tensors="pt").input_ids
    assert torch.equal(c.text_encoder_3(ids)[0], torch.zeros(2, 256, c.unet.config.joint_attention_dim))
    pipe = c.family.pipeline(c)
    prompts = ["a red circle", ""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        ours = c.family.encode(c, prompts)
    assert torch.equal(ours, mmdit.with_pooled(embeds, pooled))
    # the training module's forward = the family's denoiser call on the family's conditioning
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        trained = method.model(x, t, method.tokenize(prompts), method.tokenize(prompts, c.tokenizer_2))
        expected = c.family.denoise(c.unet, x, t, ours)
    assert torch.allclose(trained, expected, atol=1e-6)


def test_dropping_the_pooled_vectors_feeds_the_empty_prompts_and_keeps_the_token_rows(tmp_path):
    """flow.p_drop_pooled: a dropped caption's pooled vectors are the empty prompt's, its token rows its own; at 0
    the loss draws nothing more from the generator (the default run is the run without the option)."""
    method = shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "run"))
    c = method.base
    caption = ["a red circle"]
    with torch.no_grad():
        full, empty = c.family.encode(c, caption), c.family.encode(c, [""])
        tokens, _ = mmdit.split_pooled(full, c.unet.config.pooled_projection_dim)
        _, pooled_empty = mmdit.split_pooled(empty, c.unet.config.pooled_projection_dim)
        x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
        dropped = method.model(x, t, method.tokenize(caption), method.tokenize(caption, c.tokenizer_2),
                               pooled_ids=method.tokenize([""]), pooled_ids_2=method.tokenize([""], c.tokenizer_2))
        expected = c.family.denoise(c.unet, x, t, mmdit.with_pooled(tokens, pooled_empty))
        kept = c.family.denoise(c.unet, x, t, full)
    assert torch.allclose(dropped, expected, atol=1e-6) and not torch.allclose(dropped, kept, atol=1e-4)
    z0 = torch.randn(3, 4, 16, 16)
    for p, draws in ((0.0, 0), (1.0, 1)):
        method.cfg.flow.p_drop_pooled = p
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            method.flow_loss(method.model, z0, ["a red circle"] * 3, g)
        reference = torch.Generator().manual_seed(0)
        torch.randn(z0.shape, generator=reference), torch.randn(3, generator=reference)  # eps, sigmas
        for _ in range(draws):
            torch.rand(3, generator=reference)
        assert torch.equal(g.get_state(), reference.get_state()), p


def test_text_init_starts_clip_l_from_the_unet_models_encoder(tmp_path):
    """flow.text_init: CLIP-L's text model is the given CLIPTextModel's (its final states equal), the projection
    the identity (the pooled vector is the EOS row's final state), CLIP-G stays drawn from the seed; a folder that
    is no CLIPTextModel, or one of another width, is one clear error."""
    from transformers import CLIPTextModel

    source = f"{SHAPES_MODEL_DIR}/text_encoder"
    cfg = tiny_config(tmp_path / "run", "flow.text_layers=3", f"flow.text_init={source}")
    c = shapes_base.ShapesDiffusionMethod(cfg).base
    plain = shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "plain", "flow.text_layers=3")).base
    src = CLIPTextModel.from_pretrained(source)
    ids = c.tokenizer(["a red circle", "a blue square"], padding="max_length", max_length=77,
                      return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = c.text_encoder(ids), src(ids)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(ours.text_embeds, theirs.pooler_output)
    assert not torch.equal(ours.text_embeds[0], ours.text_embeds[1])
    for p, q in zip(c.text_encoder_2.parameters(), plain.text_encoder_2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(UserError, match="flow.text_init: not a CLIPTextModel folder"):
        shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "bad", f"flow.text_init={tmp_path}"))
    with pytest.raises(UserError, match="flow.text_init: .* has num_hidden_layers 3, CLIP-L needs 1"):
        shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "bad", f"flow.text_init={source}"))


def test_a_few_steps_train_transformer_and_both_encoders_and_export_loads(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.steps=2")
    method = shapes_base.ShapesDiffusionMethod(cfg)
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    t5_before = {n: p.detach().clone() for n, p in method.base.text_encoder_3.named_parameters()}
    result = fit(make_accelerator(cfg.train, cfg.tracking, cfg.output_dir), method, cfg)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    changed = {n.split(".")[0] for n, p in method.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"transformer", "text_encoder", "text_encoder_2"}
    for n, p in method.base.text_encoder_3.named_parameters():  # frozen: it outputs zeros
        assert torch.equal(p, t5_before[n]) and not p.requires_grad
    folder = tmp_path / "run" / "pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    loaded = load_components(str(folder))
    assert loaded.family_name == "sd3" and loaded.prediction.kind == "flow"
    assert loaded.vae.config.shift_factor == 0.0 and loaded.scheduler.config.shift == 1.0
    [ours] = generate(loaded, [Request("a red circle", seed=0, guidance_scale=5.0)], num_inference_steps=2)
    assert ours.size == (32, 32)


def test_flow_shift_moves_training_sigmas_and_is_exported_with_the_sampler(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.steps=1", "flow.shift=3.0")
    method = shapes_base.ShapesDiffusionMethod(cfg)
    assert method.base.scheduler.config.shift == 3.0
    seen = []
    forward = method.model.forward
    method.model.forward = lambda z, t, *a, **k: seen.append(t.detach().clone()) or forward(z, t, *a, **k)
    g = torch.Generator().manual_seed(5)
    z0 = torch.zeros(3, 4, 16, 16)
    method.flow_loss(method.model, z0, ["a red circle"] * 3, g)
    reference = torch.Generator().manual_seed(5)
    torch.randn(z0.shape, generator=reference)  # eps, then the logit-normal draw, shifted by 3
    expected = shift_sigmas(torch.sigmoid(torch.randn(3, generator=reference)), 3.0) * 1000
    assert torch.allclose(seen[0], expected)
    method.export(tmp_path / "out")
    assert load_components(str(tmp_path / "out" / "pipeline")).scheduler.config.shift == 3.0
    with pytest.raises(UserError, match="flow.shift"):
        tiny_config(tmp_path / "bad", "flow.shift=0")


def test_shipped_vae_is_reused_unchanged(tmp_path):
    method = shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "run"))
    shipped = shapes_model.build_vae().__class__.from_pretrained(f"{SHAPES_MODEL_DIR}/vae")
    for (n, p), q in zip(method.base.vae.named_parameters(), shipped.parameters()):
        assert torch.equal(p, q), n
    assert not any(p.requires_grad for p in method.base.vae.parameters())


def test_resume_replays_the_straight_run(tmp_path):
    from conftest import load_script
    from safetensors.torch import load_file

    main = load_script("train_shapes_base").main
    config = ["--config", str(ROOT / "configs/shapes/base_sd3.yaml"), f"vae_path={SHAPES_MODEL_DIR}/vae", *TINY]
    main([*config, f"output_dir={tmp_path / 'straight'}", "train.steps=3"])
    main([*config, f"output_dir={tmp_path / 'resumed'}", "train.steps=2", "train.checkpoint_every=1"])
    result = main([*config, f"output_dir={tmp_path / 'resumed'}", "train.steps=3", "train.checkpoint_every=1",
                   "--resume", "--allow-config-change"])
    assert result.steps == 3
    straight, resumed = (load_file(tmp_path / run / "transformer.safetensors") for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for key in straight:  # the exported EMA: its extra state came back with the checkpoint
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key


def test_ship_keeps_an_sd3_model_loadable_with_world_words_only(tmp_path):
    from sdd.shapes.ship import ship, world_token_ids

    cfg = tiny_config(tmp_path / "run", "train.steps=1")
    method = shapes_base.ShapesDiffusionMethod(cfg)
    fit(make_accelerator(cfg.train, cfg.tracking, cfg.output_dir), method, cfg)
    dest = ship(str(tmp_path / "run" / "pipeline"), str(tmp_path / "shipped"))
    shipped = load_components(dest)
    assert shipped.family_name == "sd3" and shipped.unet.dtype == torch.float32
    for encoder, tokenizer in ((shipped.text_encoder, shipped.tokenizer),
                               (shipped.text_encoder_2, shipped.tokenizer_2)):
        table = encoder.get_input_embeddings().weight
        used = sorted(world_token_ids(tokenizer))
        assert table[used].abs().sum() > 0
        assert int((table.abs().sum(dim=1) > 0).sum()) == len(used)
    assert torch.equal(shipped.text_encoder_3(torch.tensor([[5, 6, 1]]))[0], torch.zeros(1, 3, 80))
    [image] = generate(shipped, [Request("a red circle", seed=0, guidance_scale=5.0)], num_inference_steps=2)
    assert image.size == (32, 32)


# --- distillation from the UNet model (flow.teacher) -------------------------------------------------------------


def test_teacher_timesteps_by_hand():
    # noise-to-signal sqrt((1 - a) / a) of a = 0.8, 0.5, 0.2: 0.5, 1, 2; as flow sigmas sig / (1 + sig): 1/3, 1/2, 2/3
    ac = torch.tensor([0.8, 0.5, 0.2])
    t, exact, covered = shapes_base.teacher_timesteps(torch.tensor([0.5, 0.6, 0.35, 0.2, 0.9]), ac)
    # 0.6: ratio 1.5, log-nearer 2 (0.29) than 1 (0.41); 0.35: ratio 0.54, nearer 0.5; 0.2 and 0.9 outside [0.5, 2]
    assert t.tolist() == [1, 2, 0, 0, 2]
    assert torch.allclose(exact, torch.tensor([0.5, 2 / 3, 1 / 3, 1 / 3, 2 / 3]))
    assert covered.tolist() == [True, True, True, False, False]
    # an exact x0 gives the data's velocity: (x_s - x0) / s = eps - x0
    x0, eps, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0.3, 0.8])
    assert torch.allclose(shapes_base.velocity_of_x0(flow_noisy(x0, eps, s), x0, s), eps - x0, atol=1e-6)


def test_teacher_velocity_is_the_unet_models_x0_at_the_same_noise(tmp_path):
    """The teacher is run at x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (DDIM's add_noise) and its x0 estimate (DDIM's
    formula) is what the velocity carries back to the flow point: x_s - s v = x0_teacher."""
    method = shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "run", "flow.teacher=shapes"))
    teacher = method.teacher
    assert not any(p.requires_grad for p in teacher.unet.parameters())
    z0, eps = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    t, s, covered = shapes_base.teacher_timesteps(torch.tensor([0.1, 0.5, 0.9]), teacher.prediction.alphas_cumprod)
    assert covered.all()
    captions = ["a red circle", "a blue square", ""]
    v = method.teacher_velocity(flow_noisy(z0, eps, s), s, t, captions)
    x_t = teacher.scheduler.add_noise(z0, eps, t)
    with torch.no_grad():
        ids = teacher.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        eps_hat = teacher.unet(x_t, t, encoder_hidden_states=teacher.text_encoder(ids)[0]).sample
    a = teacher.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0 = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    assert torch.allclose(flow_noisy(z0, eps, s) - s.reshape(-1, 1, 1, 1) * v, x0, atol=1e-4)


def test_teacher_must_be_a_unet_model_with_our_vae(tmp_path):
    with pytest.raises(UserError, match="not a model of the UNet kind"):
        shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "a", "flow.teacher=tiny-sd3"))
    with pytest.raises(UserError, match="another VAE"):
        shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "b", "flow.teacher=tiny"))
    with pytest.raises(UserError, match="no such model folder"):
        shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "c", f"flow.teacher={tmp_path}/none/"))


def test_flow_loss_with_a_teacher_targets_its_velocity_inside_its_schedule_and_the_data_beyond(tmp_path):
    method = shapes_base.ShapesDiffusionMethod(tiny_config(tmp_path / "run", "flow.teacher=shapes",
                                                           "flow.logit_std=3.0"))
    z0, captions = torch.randn(8, 4, 16, 16), ["a red circle", "a green triangle"] * 4
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        loss, _ = method.flow_loss(method.model, z0, captions, g)
    reference = torch.Generator().manual_seed(3)
    eps = torch.randn(z0.shape, generator=reference)
    sigma = sample_sigmas(8, reference, mean=0.0, std=3.0)
    t, exact, covered = shapes_base.teacher_timesteps(sigma, method.teacher.prediction.alphas_cumprod)
    assert 0 < covered.sum() < 8  # logit-normal with std 3 reaches past the teacher's last step
    s = torch.where(covered, exact, sigma)
    teacher_v = method.teacher_velocity(flow_noisy(z0, eps, s), s, t, captions)
    target = torch.where(covered.reshape(-1, 1, 1, 1), teacher_v, eps - z0)
    with torch.no_grad():
        v = method.model(flow_noisy(z0, eps, s), s * 1000, method.tokenize(captions),
                         method.tokenize(captions, method.base.tokenizer_2))
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(v, target).item(), rel=1e-5)
    assert not torch.allclose(teacher_v[covered], (eps - z0)[covered], atol=0.1)
