"""Model families: the seam (sdd.families), SD-1.x on it unchanged, SD-2.x with v-prediction (``tiny-sd2v``):
the conversions by hand, the SDD loss and the partial sampler on v, CFG generation equal to the stock pipeline,
SLD/SEGA combining epsilon, and training runs whose export loads and generates."""

import math

import pytest
import torch
from conftest import ROOT, load_script
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from sdd.errors import UserError
from sdd.families import Prediction, family, prediction_of
from sdd.generation import Request, generate
from sdd.methods.esd import esd_target
from sdd.methods.sdd import sdd_loss
from sdd.models import build_tiny_sd, build_tiny_sd2v, build_tiny_sdxl, load_components
from sdd.sampling import encode_prompts, sample_to_k


@pytest.fixture(scope="module")
def sd2v():
    return build_tiny_sd2v()


# --- the seam ------------------------------------------------------------------------------------------------


def test_sd1_is_the_sd_family_and_predicts_epsilon():
    tiny = build_tiny_sd()
    assert tiny.family is family("sd") and tiny.prediction.kind == "epsilon"
    assert tiny.family.pipeline_class() is StableDiffusionPipeline
    ids = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a cat", ""])
    assert torch.equal(tiny.family.encode(tiny, ["a cat", ""]), ids)
    x = torch.randn(2, 4, 16, 16)
    out = torch.randn(2, 4, 16, 16)
    assert tiny.prediction.to_epsilon(out, x, 500) is out  # an epsilon model's numbers never pass through it
    assert tiny.prediction.from_epsilon(out, x, 500) is out
    with pytest.raises(UserError, match="unknown model family 'flux2'"):
        family("flux2")


def test_tiny_sd2v_is_sd2_shaped_deterministic_and_predicts_v(sd2v):
    again = build_tiny_sd2v()
    for (name, p), q in zip(sd2v.unet.named_parameters(), again.unet.parameters()):
        assert torch.equal(p, q), name
    assert sd2v.family is family("sd") and sd2v.prediction.kind == "v_prediction"
    assert sd2v.unet.config.use_linear_projection and sd2v.text_encoder.config.hidden_act == "gelu"
    assert sd2v.tokenizer.pad_token == "!" and sd2v.tokenizer("a", padding="max_length").input_ids[-1] == 0
    assert sd2v.default_resolution == 32 and load_components("tiny-sd2v").source == "tiny-sd2v"


@pytest.mark.parametrize("name", ["tiny-flux2", "sd2"])
def test_an_unknown_model_name_is_one_clear_error(name):
    with pytest.raises(UserError) as err:
        load_components(name)
    assert f"unknown model '{name}'" in str(err.value) and "tiny-sd2v" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_prediction_type_no_family_handles_is_refused():
    scheduler = DDIMScheduler(prediction_type="sample")
    with pytest.raises(UserError, match="prediction_type 'sample' is not supported"):
        prediction_of(scheduler)


def test_conversions_by_hand():
    # a_t^2 = 0.36: a = 0.6, s = 0.8; x_t = a x0 + s eps, v = a eps - s x0
    p = Prediction("v_prediction", torch.tensor([0.9, 0.36, 0.1]))
    x0, eps = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 3.0]])
    x_t = 0.6 * x0 + 0.8 * eps
    v = 0.6 * eps - 0.8 * x0
    torch.testing.assert_close(v, torch.tensor([[-0.5, 3.4]]))
    torch.testing.assert_close(p.to_epsilon(v, x_t, 1), eps)
    torch.testing.assert_close(p.to_x0(v, x_t, 1), x0)
    torch.testing.assert_close(p.from_epsilon(eps, x_t, 1), v)
    torch.testing.assert_close(Prediction("epsilon", p.alphas_cumprod).to_x0(eps, x_t, 1), x0)
    # per-latent timesteps; halfway between two grid points, s/a is interpolated linearly (as Euler's sigmas)
    a, s = p.coefficients(torch.tensor([0, 2]), torch.zeros(2, 1))
    torch.testing.assert_close(a.flatten()**2, torch.tensor([0.9, 0.1]))
    a, s = p.coefficients(0.5, torch.zeros(1, 1))
    ratio = (math.sqrt(0.1 / 0.9) + math.sqrt(0.64 / 0.36)) / 2
    torch.testing.assert_close(s.flatten() / a.flatten(), torch.tensor([ratio]))


def test_v_is_diffusers_velocity(sd2v):
    ddpm = DDPMScheduler.from_config(sd2v.scheduler.config)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    x_t, v = ddpm.add_noise(x0, eps, t), ddpm.get_velocity(x0, eps, t)
    torch.testing.assert_close(sd2v.prediction.to_epsilon(v, x_t, t), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sd2v.prediction.to_x0(v, x_t, t), x0, atol=1e-5, rtol=1e-5)


# --- SDD and ESD on v ----------------------------------------------------------------------------------------


def test_sdd_loss_by_hand_in_v_and_in_epsilon():
    # v_c - v_u = 1 everywhere, a_t^2 = 0.25: eps_c - eps_u = a_t (v_c - v_u) = 0.5, so the epsilon loss is 0.25
    p = Prediction("v_prediction", torch.tensor([0.25]))
    x_t = torch.randn(1, 4, 2, 2)
    v_c, v_u = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    assert sdd_loss(v_c, v_u).item() == pytest.approx(1.0)
    assert sdd_loss(p.to_epsilon(v_c, x_t, 0), p.to_epsilon(v_u, x_t, 0)).item() == pytest.approx(0.25)


@pytest.mark.parametrize("t", [21, 501, 981])
def test_sdd_loss_in_v_is_the_epsilon_loss_over_alpha_bar(sd2v, t):
    """The loss is taken on the model's own output (v); in epsilon it is alpha_bar_t times that, with the same
    zero and gradients in the same direction (METHODS section 11)."""
    from sdd.params import configure_trainable

    unet = build_tiny_sd2v().unet
    names = configure_trainable(unet, "xattn")
    params = [p for n, p in unet.named_parameters() if n in names]
    g = torch.Generator().manual_seed(t)
    z_t = torch.randn(1, 4, 16, 16, generator=g)
    c_s, c_u = encode_prompts(sd2v.tokenizer, sd2v.text_encoder, ["nudity", ""])[:, None]
    v_c = unet(z_t, t, encoder_hidden_states=c_s).sample
    with torch.no_grad():
        v_u = unet(z_t, t, encoder_hidden_states=c_u).sample
    pred = sd2v.prediction
    loss_v = sdd_loss(v_c, v_u)
    loss_eps = sdd_loss(pred.to_epsilon(v_c, z_t, t), pred.to_epsilon(v_u, z_t, t))
    alpha_bar = float(sd2v.scheduler.alphas_cumprod[t])
    assert loss_eps.item() == pytest.approx(alpha_bar * loss_v.item(), rel=1e-4)
    grad_v = torch.autograd.grad(loss_v, params, retain_graph=True)
    grad_eps = torch.autograd.grad(loss_eps, params)
    for a, b in zip(grad_v, grad_eps):
        torch.testing.assert_close(b, alpha_bar * a, atol=1e-8, rtol=1e-3)
    # the same zero: the concept's prediction at the unconditional one
    same = unet(z_t, t, encoder_hidden_states=c_u).sample
    assert sdd_loss(same, v_u).item() == 0.0
    assert sdd_loss(pred.to_epsilon(same, z_t, t), pred.to_epsilon(v_u, z_t, t)).item() == 0.0


def test_esd_target_in_v_is_the_epsilon_target(sd2v):
    """ESD's target has weights summing to one, so combined in v it is the v of the epsilon target."""
    g = torch.Generator().manual_seed(1)
    x_t, v_u, v_c = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    t, pred = torch.tensor([100, 800]), sd2v.prediction
    in_v = pred.to_epsilon(esd_target(v_u, v_c, 2.0), x_t, t)
    in_eps = esd_target(pred.to_epsilon(v_u, x_t, t), pred.to_epsilon(v_c, x_t, t), 2.0)
    torch.testing.assert_close(in_v, in_eps, atol=1e-5, rtol=1e-5)


def test_partial_sampler_on_v_is_ddim_by_hand(sd2v):
    """k CFG-DDIM steps of a v model, the DDIM update written out: x0 = a x_t - s v, eps = s x_t + a v,
    x_prev = a_prev x0 + s_prev eps (eta = 0, SD's leading grid, the last step to alphas_cumprod[0])."""
    scheduler = DDIMScheduler.from_config(sd2v.scheduler.config)
    scheduler.set_timesteps(5)
    ac = sd2v.scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(2, 4, 16, 16, generator=g)
    c_cond, c_uncond = encode_prompts(sd2v.tokenizer, sd2v.text_encoder, ["a cat", ""])[:, None]
    s_g = 3.0
    z, t_k = sample_to_k(sd2v.unet, scheduler, z_T, c_cond, c_uncond, s_g, torch.tensor([3, 5 - 1]))
    assert t_k.tolist() == [scheduler.timesteps[3].item(), scheduler.timesteps[4].item()]

    for b, k in enumerate([3, 4]):
        x = z_T[b : b + 1].double()
        for t in [801, 601, 401, 201, 1][:k]:
            with torch.no_grad():
                v_u = sd2v.unet(x.float(), t, encoder_hidden_states=c_uncond).sample.double()
                v_c = sd2v.unet(x.float(), t, encoder_hidden_states=c_cond).sample.double()
            v = v_u + s_g * (v_c - v_u)
            a, s = ac[t].sqrt(), (1 - ac[t]).sqrt()
            x0, eps = a * x - s * v, s * x + a * v
            prev = ac[t - 200] if t - 200 >= 0 else ac[0]
            x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
        torch.testing.assert_close(z[b : b + 1], x.float(), atol=1e-4, rtol=1e-4)


# --- generation ----------------------------------------------------------------------------------------------


def stock_pipeline(m):
    return StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.mark.parametrize("build", [build_tiny_sd, build_tiny_sd2v], ids=["sd1", "sd2v"])
def test_cfg_generation_equals_the_stock_pipeline(build):
    m = build()
    pipe = stock_pipeline(m)
    pipe.set_progress_bar_config(disable=True)
    for prompt, seed, scale in [("a photo of a cat", 0, 7.5), ("a dog", 3, 4.0)]:
        ref = pipe(prompt, num_inference_steps=4, guidance_scale=scale, generator=torch.Generator().manual_seed(seed),
                   output_type="pt").images[0]
        ours = generate(m, [Request(prompt, seed=seed, guidance_scale=scale)], num_inference_steps=4,
                        output_type="pt")[0]
        assert ((ours.clamp(-1, 1) + 1) / 2 - ref).abs().max().item() < 1e-5


class EpsilonOf(torch.nn.Module):
    """A v model seen as the epsilon model it is: eps = s_t x_t + a_t v."""

    def __init__(self, m):
        super().__init__()
        self.unet, self.prediction, self.config = m.unet, m.prediction, m.unet.config

    def forward(self, z, t, encoder_hidden_states):
        from types import SimpleNamespace

        v = self.unet(z, t, encoder_hidden_states=encoder_hidden_states).sample
        return SimpleNamespace(sample=self.prediction.to_epsilon(v, z, t))


@pytest.mark.parametrize("method,settings",
                         [("sld-max", None), ("sega", {"edit_guidance_scale": 7.0, "edit_warmup_steps": 0})])
def test_sld_and_sega_on_v_combine_epsilon(sd2v, method, settings):
    """SLD's and SEGA's thresholds are defined on epsilon: a v model gives the image its epsilon twin gives (and
    not the one of combining v, which differs)."""
    import dataclasses

    from sdd.methods.inference import generate_with_method, method_guidance

    twin = dataclasses.replace(sd2v, unet=EpsilonOf(sd2v),
                               scheduler=DDIMScheduler.from_config(sd2v.scheduler.config, prediction_type="epsilon"))
    request = [Request("a photo of a person", seed=1)]

    def run(m):
        return generate_with_method(m, request, method, "nudity", settings=settings, num_inference_steps=4,
                                    output_type="latent")[0]

    v_image, eps_image = run(sd2v), run(twin)
    assert (v_image - eps_image).abs().max().item() < 1e-3  # float round-off (through the gates' thresholds)
    plain = generate(sd2v, request, num_inference_steps=4, output_type="latent")[0]
    assert (v_image - plain).abs().max() > 1e-2  # the guidance did something
    combining_v = method_guidance(method, "nudity", settings)
    combining_v.affine = True  # what diffusers' safe and semantic pipelines do with a v model
    in_v = generate(sd2v, request, guidance=combining_v, num_inference_steps=4, output_type="latent")[0]
    assert (in_v - eps_image).abs().max() > 1e-2


# --- training on SD-2.x v --------------------------------------------------------------------------------------


@pytest.mark.parametrize("script,finetune", [("train_sdd", "xattn"), ("train_esd", "esd-x"),
                                             ("train_sdd", "lora")])
def test_training_on_tiny_sd2v_exports_a_v_pipeline_that_loads_and_generates(tmp_path, script, finetune):
    prefix = "sdd" if script == "train_sdd" else "esd"
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / prefix / "tiny.yaml"), "model.pretrained=tiny-sd2v",
            f"output_dir={out}", "train.steps=2", "train.checkpoint_every=0", f"{prefix}.ddim_steps=3",
            "tracking.num_inference_steps=2", f"finetune={finetune}"]
    if finetune == "lora":
        args += ["train.lr=5e-2", "sdd.ema_decay=0.0"]
    if finetune == "xattn":
        args += ["export.format=both"]
    assert load_script(script).main(args).steps == 2
    assert "base_model:" not in (out / "README.md").read_text()  # a model built in code is no hub id
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.tokenizer.pad_token == "!"
    pipe.set_progress_bar_config(disable=True)

    def image(p):
        return p("a photo of a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]

    erased = image(pipe)
    assert erased.shape == (32, 32, 3) and erased.std() > 0
    base = stock_pipeline(build_tiny_sd2v())
    base.set_progress_bar_config(disable=True)
    before = image(base)
    assert abs(erased - before).max() > 1e-6  # training moved the weights
    if finetune == "xattn":  # the single file reads back as the same v model
        single, folder = load_components(str(out / "model.safetensors")), load_components(str(out / "pipeline"))
        assert single.prediction.kind == "v_prediction" and single.tokenizer.pad_token == "!"
        for (name, p), q in zip(single.unet.state_dict().items(), folder.unet.state_dict().values()):
            assert torch.equal(p, q), name
    if finetune == "lora":
        base.load_lora_weights(str(out / "lora"))
        assert abs(image(base) - erased).max() < 1e-4  # the adapters are the merged export


# --- SDXL (started: encoding and generation) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl():
    m = build_tiny_sdxl()
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                                     tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet,
                                     scheduler=m.scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return m, pipe


def test_sdxl_conditioning_is_the_pipelines(sdxl):
    m, pipe = sdxl
    assert m.family.name == "sdxl" and m.family.pipeline_class() is type(pipe)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a cat", do_classifier_free_guidance=True)
    c = m.family.encode(m, ["a cat", "", "a dog"])
    assert c.shape == (3, 78, 80)  # 77 token rows of both encoders' penultimate states, one row for the pooled
    torch.testing.assert_close(c[0, :-1], embeds[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c[0, -1, :48], pooled[0], atol=1e-6, rtol=1e-6)
    assert c[0, -1, 48:].abs().max() == 0
    # force_zeros_for_empty_prompt: the unconditional branch is zeros, not the encoding of ""
    assert negative.abs().max() == 0 and negative_pooled.abs().max() == 0 and c[1].abs().max() == 0


@pytest.mark.parametrize("size", [None, (48, 32)])
def test_sdxl_cfg_generation_equals_the_stock_pipeline(sdxl, size):
    m, pipe = sdxl
    height, width = size or (None, None)
    ref = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, height=height, width=width,
               generator=torch.Generator().manual_seed(0), output_type="pt").images[0]
    ours = generate(m, [Request("a cat", seed=0, guidance_scale=5.0, height=height, width=width)],
                    num_inference_steps=4, output_type="pt")[0]
    assert ref.shape[-2:] == ((height, width) if size else (32, 32))  # the time ids follow the image size
    assert ((ours.clamp(-1, 1) + 1) / 2 - ref).abs().max().item() < 1e-5


def test_sdxl_sld_with_zero_safety_scale_is_cfg(sdxl):
    from sdd.methods.inference import generate_with_method

    m, _ = sdxl
    request = [Request("a photo of a person", seed=2)]
    cfg = generate(m, request, num_inference_steps=3, output_type="latent")[0]
    sld = generate_with_method(m, request, "sld-max", "nudity", settings={"sld_guidance_scale": 0},
                               num_inference_steps=3, output_type="latent")[0]
    assert (sld - cfg).abs().max().item() < 1e-5
    moved = generate_with_method(m, request, "sld-max", "nudity", num_inference_steps=3, output_type="latent")[0]
    assert (moved - cfg).abs().max().item() > 1e-3


def test_the_evaluation_runs_on_tiny_sd2v(tmp_path):
    from sdd.cli.eval import main

    out = tmp_path / "eval"
    main(["--config", str(ROOT / "configs" / "eval" / "tiny.yaml"), f"out={out}",
          "entries=[{label: SD2, model: tiny-sd2v, method: sd}, "
          "{label: SLD2, model: tiny-sd2v, method: sld-max, concept: nudity}]",
          "suites=[nudity]", "generation.num_inference_steps=2", "generation.batch_size=2", "nudity.limit=2",
          "stats.n_resamples=50", "report.grid_prompts=2"])
    report = (out / "report.md").read_text()
    assert "SD2" in report and "SLD2" in report and "tiny-sd2v" in report
