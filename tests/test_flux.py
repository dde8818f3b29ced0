"""FLUX.1 on the seam (``tiny-flux``, FLUX.1-dev's shape: guidance embedding): loading (built in, FLUX folders),
the conditioning against ``FluxPipeline.encode_prompt``, the packing and the shifted grid by hand, generation
(distilled guidance, one forward per step) equal to the pipeline, SDD's loss and the partial sampler against the
transformer called as the pipeline calls it with the scheduler's Euler step, the parameter sets, SDD and ESD runs
whose export loads with ``FluxPipeline`` (and ``DiffusionPipeline``; LoRA: ``load_lora_weights``) and generates,
and what refuses a FLUX model."""

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_script
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file

from sdd.config import load_config
from sdd.errors import UserError
from sdd.families.flux import dynamic_shift, image_ids, pack, unpack
from sdd.generation import Request, generate
from sdd.loop import fit, make_accelerator
from sdd.methods import common
from sdd.methods.sdd import SDDConfig, SDDMethod
from sdd.models import build_tiny_flux, load_components
from sdd.sampling import sample_to_k


@pytest.fixture(scope="module")
def flux():
    m = build_tiny_flux()
    pipe = m.family.pipeline(m)
    pipe.set_progress_bar_config(disable=True)
    return m, pipe


def reference_conditioning(pipe, prompt):
    """What FluxPipeline feeds its transformer for ``prompt``: T5's 512 rows and CLIP's pooled output."""
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, None)
    assert text_ids.abs().max() == 0
    return embeds, pooled


def transformer_call(pipe, z, t, cond, guidance):
    """The pipeline's call on (B, C, H, W) latents: packed with its ``_pack_latents``, its image ids, timestep =
    the scheduler's timestep / 1000, the guidance value embedded; unpacked with its ``_unpack_latents``."""
    embeds, pooled = cond
    n, c, h, w = z.shape
    f = pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=pipe._pack_latents(z, n, c, h, w), timestep=torch.as_tensor(t).reshape(-1).expand(n) / 1000,
            guidance=torch.full([1], guidance, dtype=torch.float32).expand(n),
            pooled_projections=pooled.expand(n, -1), encoder_hidden_states=embeds.expand(n, -1, -1),
            txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=pipe._prepare_latent_image_ids(n, h // 2, w // 2, "cpu",
                                                                                            torch.float32),
            return_dict=False)[0]
    return pipe._unpack_latents(out, h * f, w * f, f)


# --- loading, packing and the grid -------------------------------------------------------------------------------


def test_tiny_flux_is_a_built_in_guidance_distilled_flow_model(flux):
    m, pipe = flux
    built = load_components("tiny-flux")
    assert built.family.name == "flux" and built.source == "tiny-flux" and built.prediction.kind == "flow"
    assert built.family.pipeline_class() is FluxPipeline and built.family.guidance_distilled
    assert built.unet.config.guidance_embeds and built.unet.config.in_channels == 16
    assert built.latent_channels == 4 and built.default_resolution == 32 and pipe.vae_scale_factor == 2
    for (name, p), q in zip(m.unet.named_parameters(), built.unet.parameters()):
        assert torch.equal(p, q), name
    # the T5 tokenizer is tiny-sd3's, built in code; the CLIP one pools at the real end-of-text id
    assert m.tokenizer_2("a cat").input_ids[-1] == m.tokenizer_2.eos_token_id == 1
    assert m.tokenizer("a cat").input_ids[-1] == m.text_encoder.config.eos_token_id == 49407


def test_packing_and_image_ids_by_hand():
    z = torch.arange(8.0).view(1, 1, 2, 4)  # one channel, 2 x 4: two 2 x 2 patches side by side
    tokens = pack(z)
    assert tokens.tolist() == [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]
    assert torch.equal(unpack(tokens, 2, 4), z)
    assert image_ids(4, 6).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack(z), FluxPipeline._pack_latents(z, 2, 4, 16, 16))
    assert torch.equal(image_ids(16, 16), FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32))


def test_the_grid_is_the_pipelines_shifted_by_the_image_token_count(flux):
    m, _ = flux
    # 32 px: 16 x 16 latents, 64 tokens; mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256) = 0.4675
    assert dynamic_shift(64) == pytest.approx(0.4675, abs=1e-12) == calculate_shift(64)
    assert dynamic_shift(4096) == pytest.approx(1.15) and dynamic_shift(1024) == pytest.approx(calculate_shift(1024))
    grid = common.ddim_grid(m, 4, 32)
    assert isinstance(grid, FlowMatchEulerDiscreteScheduler) and grid.config.use_dynamic_shifting
    s = np.array([1.0, 0.75, 0.5, 0.25])  # the pipeline's linspace(1, 1/N, N)
    shifted = math.exp(0.4675) / (math.exp(0.4675) + 1 / s - 1)
    torch.testing.assert_close(grid.sigmas.double(), torch.tensor([*shifted, 0.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(grid.timesteps.double(), torch.from_numpy(shifted) * 1000, atol=1e-3, rtol=0)
    assert common.ddim_grid(m, 4, 64).sigmas[1] > grid.sigmas[1]  # more tokens, more shift toward noise


def test_a_flux_folder_loads_as_a_real_one(flux, tmp_path):
    m, pipe = flux
    folder = tmp_path / "flux"
    pipe.save_pretrained(folder, safe_serialization=True)
    assert type(DiffusionPipeline.from_pretrained(folder)) is FluxPipeline
    loaded = load_components(str(folder))
    assert loaded.family.name == "flux" and loaded.prediction.kind == "flow" and loaded.text_encoder_3 is None
    for a, b in [(m.unet, loaded.unet), (m.text_encoder_2, loaded.text_encoder_2), (m.vae, loaded.vae)]:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    torch.testing.assert_close(loaded.family.encode(loaded, ["a cat", ""]), m.family.encode(m, ["a cat", ""]))
    import shutil

    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(UserError, match="a FLUX folder without 'tokenizer_2/'") as err:
        load_components(str(folder))
    assert "\n" not in str(err.value)


# --- the conditioning and the denoiser call ----------------------------------------------------------------------


def test_flux_conditioning_and_call_are_the_pipelines(flux):
    """512 T5 rows (32 wide) and one row carrying CLIP's pooled 32; the empty prompt is encoded, not zeros; the
    family's call (packing, ids, t / 1000, the guidance embedded) is the pipeline's."""
    m, pipe = flux
    embeds, pooled = reference_conditioning(pipe, "a cat")
    empty, empty_pooled = reference_conditioning(pipe, "")
    c = m.family.encode(m, ["a cat", "", "a dog"])
    assert c.shape == (3, 512 + 1, 32) and embeds.shape == (1, 512, 32) and pooled.shape == (1, 32)
    torch.testing.assert_close(c[0, :-1], embeds[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c[1, :-1], empty[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c[0, -1], pooled[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c[1, -1], empty_pooled[0], atol=1e-6, rtol=1e-6)
    assert c[1].abs().max() > 0 and not torch.equal(c[0, -1], c[2, -1])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([750.0, 300.0])
    with torch.no_grad():
        ours = m.family.denoise(m.unet, z, t, c[:1].expand(2, -1, -1))  # the default guidance: 3.5
        at_5 = m.family.denoise(m.unet, z, t, c[:1].expand(2, -1, -1), guidance=5.0)
    torch.testing.assert_close(ours, transformer_call(pipe, z, t, (embeds, pooled), 3.5), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(at_5, transformer_call(pipe, z, t, (embeds, pooled), 5.0), atol=1e-6, rtol=1e-5)
    assert (at_5 - ours).abs().max() > 1e-4  # the guidance value reaches the network


# --- generation equals the stock pipeline ------------------------------------------------------------------------


def test_flux_generation_equals_the_stock_pipeline(flux):
    """One forward per step with the request's guidance embedded, on the pipeline's grid; two requests with their
    own seeds and guidance values in one batch."""
    m, pipe = flux
    cases = [("a photo of a cat", 0, 3.5), ("a dog", 3, 5.0)]
    ours = generate(m, [Request(p, seed=s, guidance_scale=g) for p, s, g in cases], num_inference_steps=4,
                    output_type="pt", batch_size=2)
    for (prompt, seed, scale), image in zip(cases, ours):
        ref = pipe(prompt, height=32, width=32, num_inference_steps=4, guidance_scale=scale,
                   generator=torch.Generator().manual_seed(seed), output_type="pt").images[0]
        assert ref.shape == (3, 32, 32) and ref.std() > 0
        assert ((image.clamp(-1, 1) + 1) / 2 - ref).abs().max().item() < 1e-5
    other = generate(m, [Request(cases[1][0], seed=3, guidance_scale=1.0)], num_inference_steps=4, output_type="pt")
    assert (other[0] - ours[1]).abs().max() > 1e-3  # the guidance value changes the image


@pytest.mark.parametrize("method, message", [
    ("sld-max", "flow-matching model \\(FLUX\\)"), ("sega", "flow-matching model \\(FLUX\\)"),
    ("safree", "flow-matching model \\(FLUX\\)"), ("neg", "guidance-distilled FLUX model"),
])
def test_guidance_that_needs_another_branch_refuses_flux(flux, method, message):
    from sdd.methods.inference import generate_with_method

    m, _ = flux
    with pytest.raises(UserError, match=message) as err:
        generate_with_method(m, [Request("a person", seed=0)], method, "nudity", num_inference_steps=2)
    assert "\n" not in str(err.value)


# --- SDD's loss and the partial sampler against the pipeline's calls ---------------------------------------------


def sdd_method(tmp_path, *overrides):
    cfg = load_config(SDDConfig, str(ROOT / "configs" / "sdd" / "tiny.yaml"),
                      ["model.pretrained=tiny-flux", f"output_dir={tmp_path / 'run'}", "train.steps=1",
                       "train.checkpoint_every=0", "sdd.ddim_steps=4", "tracking.num_inference_steps=2", *overrides])
    return cfg, SDDMethod(cfg)


def test_sdd_loss_on_flux_is_the_concept_sent_to_the_empty_prompt_at_the_same_guidance(flux, tmp_path):
    """c_s = the pipeline's encode_prompt("nudity"), the target the same call on "", both at guidance 3.5 (the
    pipeline's default): the mean squared difference of the two v outputs at the grid's timesteps."""
    m, pipe = flux
    _, method = sdd_method(tmp_path)
    c_uncond, _, c_s = method.conditioning(torch.tensor([0, 0]))
    z_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = method.scheduler.timesteps[torch.tensor([1, 3])]
    ours = method.student_loss(method.model, z_t, t, c_uncond, c_s)
    ref = F.mse_loss(transformer_call(pipe, z_t, t, reference_conditioning(pipe, "nudity"), 3.5),
                     transformer_call(pipe, z_t, t, reference_conditioning(pipe, ""), 3.5))
    assert ref > 0
    torch.testing.assert_close(ours.detach(), ref, atol=1e-8, rtol=1e-4)


def test_partial_sampler_on_flux_is_the_pipelines_loop(flux):
    """k steps of the teacher's sampler = the pipeline's loop (its grid for 32 px, one call per step with s_g
    embedded, FlowMatchEulerDiscreteScheduler.step); the unconditional conditioning is never read (NaN here)."""
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    m, pipe = flux
    scheduler = common.ddim_grid(m, 5, 32)
    c = m.family.encode(m, ["a cat"])
    z_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    s_g = 3.0
    z, t_k = sample_to_k(m.unet, scheduler, z_T, c, torch.full_like(c, float("nan")), s_g, torch.tensor([2, 4]),
                         denoise=m.family.denoise, distilled=True)
    assert t_k.tolist() == [scheduler.timesteps[2].item(), scheduler.timesteps[4].item()]
    cond = reference_conditioning(pipe, "a cat")
    for b, k in enumerate([2, 4]):
        ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # as the pipeline: fresh
        timesteps, _ = retrieve_timesteps(ref, 5, sigmas=np.linspace(1.0, 1 / 5, 5), mu=calculate_shift(64))
        x = z_T[b : b + 1]
        for t in timesteps[:k]:
            x = ref.step(transformer_call(pipe, x, t, cond, s_g), t, x).prev_sample
        torch.testing.assert_close(z[b : b + 1], x, atol=1e-4, rtol=1e-4)  # batched vs one at a time
        assert (x - z_T[b : b + 1]).abs().max() > 1e-3
        assert abs(t_k[b].item() / 1000 - ref.sigmas[k].item()) < 1e-6  # the latent sits at sigma_k


# --- parameter sets ----------------------------------------------------------------------------------------------

# tiny-flux: two double-stream blocks (neither context_pre_only: each one's text feeds on) and two single-stream
# blocks (one to_q/k/v for text and image tokens together: no text projections of their own)
XATTN = {f"transformer_blocks.{i}.attn.{proj}.{kind}" for i in (0, 1) for proj in ("add_q_proj", "add_k_proj",
                                                                                    "add_v_proj")
         for kind in ("weight", "bias")}
TEXT_PATHWAY = ("context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
EXPECTED = {
    "xattn": lambda n: n in XATTN,
    "noxattn": lambda n: not (n.startswith(TEXT_PATHWAY) or "_context" in n or ".add_" in n or "to_add_out" in n
                              or "norm_added" in n),
    "selfattn": lambda n: any(f".attn.{p}." in n for p in ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k")),
    "full": lambda n: True,
}


@pytest.mark.parametrize("finetune", list(EXPECTED))
def test_flux_parameter_sets_train_exactly_the_layers_they_name(tmp_path, finetune):
    before = {k: v.detach().clone() for k, v in build_tiny_flux().unet.named_parameters()}
    cfg, method = sdd_method(tmp_path, f"finetune={finetune}", "train.lr=1e-3", "train.weight_decay=0")
    fit(make_accelerator(cfg.train, cfg.tracking, cfg.output_dir), method, cfg)
    expected = {n for n in before if EXPECTED[finetune](n)}
    assert set(method.trainable_names) == expected
    if finetune == "xattn":
        assert len(expected) == 12 and not any(n.startswith("single_") for n in expected)
    if finetune == "noxattn":  # the image stream, the single-stream blocks in it; no time, guidance or text embedding
        assert "x_embedder.weight" in expected and "single_transformer_blocks.1.proj_out.weight" in expected
        assert not any("guidance_embedder" in n or "add_k_proj" in n for n in expected)
    for name, p in method.model.named_parameters():
        if name in expected:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"


def test_flux_lora_puts_adapters_on_the_xattn_layers(tmp_path):
    cfg = load_config(SDDConfig, str(ROOT / "configs" / "sdd" / "tiny_lora.yaml"),
                      ["model.pretrained=tiny-flux", f"output_dir={tmp_path / 'run'}"])
    method = SDDMethod(cfg)
    layers = {n.rsplit(".", 1)[0] for n in XATTN}
    assert set(method.trainable_names) == {f"{layer}.lora_{ab}.default.weight" for layer in layers for ab in "AB"}


# --- training runs: the export loads with FluxPipeline -----------------------------------------------------------


def image(pipe):
    return pipe("a photo of a cat", height=32, width=32, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.mark.parametrize("script,finetune", [("train_sdd", "xattn"), ("train_esd", "esd-x"), ("train_sdd", "lora")])
def test_training_on_tiny_flux_exports_a_flux_pipeline_that_loads_and_generates(tmp_path, script, finetune):
    prefix = "sdd" if script == "train_sdd" else "esd"
    out = tmp_path / "run"
    config = "tiny_lora.yaml" if finetune == "lora" else "tiny.yaml"
    args = ["--config", str(ROOT / "configs" / prefix / config), "model.pretrained=tiny-flux", f"output_dir={out}",
            "train.steps=2", "train.checkpoint_every=0", f"{prefix}.ddim_steps=3", "tracking.num_inference_steps=2",
            f"finetune={finetune}", "train.lr=5e-2"]
    if finetune == "lora":
        args += ["sdd.ema_decay=0.0"]
    start = time.perf_counter()
    run = load_script(script).main(args)
    print(f"\n{script} {finetune} on tiny-flux: {time.perf_counter() - start:.1f} s (2 steps, with the export)")
    assert run.steps == 2 and set(run.exports) >= {"pipeline", "transformer"} and "unet" not in run.exports
    card = (out / "README.md").read_text()
    assert "FluxPipeline.from_pretrained" in card and "base_model:" not in card
    # the trained parameters changed, the frozen ones did not (the export against the base model)
    base_state = build_tiny_flux().unet.state_dict()
    exported = load_file(out / "transformer.safetensors")
    assert exported.keys() == base_state.keys()
    changed = {k for k in exported if not torch.equal(exported[k], base_state[k])}
    if finetune == "lora":  # merged adapters: only the xattn layers' weights move
        assert changed and changed <= {n for n in XATTN if n.endswith(".weight")}
    else:
        assert changed == XATTN
    pipe = FluxPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    erased = image(pipe)
    assert erased.shape == (32, 32, 3) and erased.std() > 0
    m = build_tiny_flux()
    base = m.family.pipeline(m)
    base.set_progress_bar_config(disable=True)
    assert abs(erased - image(base)).max() > 1e-6  # training moved the weights
    if finetune == "xattn":
        from sdd import api
        from sdd.api import load_pipeline

        assert type(DiffusionPipeline.from_pretrained(out / "pipeline")) is FluxPipeline
        assert type(load_pipeline(out)) is FluxPipeline
        # our own generation on the export: the same image as the pipeline's (its default guidance, 3.5)
        request = Request("a photo of a cat", seed=0, guidance_scale=3.5)
        ours = generate(load_components(str(out / "pipeline")), [request], num_inference_steps=3, output_type="pt")[0]
        assert abs((ours.clamp(-1, 1) + 1) / 2 - torch.from_numpy(erased).permute(2, 0, 1)).max() < 1e-5
        with pytest.raises(UserError, match="tiny-flux is a flux model: use export.format=diffusers"):
            api.export(str(out), "export.format=single-file", out=str(tmp_path / "single"))
        assert not (tmp_path / "single" / "model.safetensors").exists()
    if finetune == "lora":
        base.load_lora_weights(str(out / "lora"))
        assert abs(image(base) - erased).max() < 1e-4  # the adapters are the merged export


# --- what refuses a FLUX model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config, overrides, message", [
    ("uce/tiny.yaml", [], "UCE runs on SD-1.x and SD-2.x models so far, and tiny-flux is a flux model"),
    ("rece/tiny.yaml", [], "UCE runs on SD-1.x and SD-2.x models so far, and tiny-flux is a flux model"),
    ("salun/tiny.yaml", [], "SalUn runs on SD-1.x and SD-2.x models so far, and tiny-flux is a flux model"),
    ("sdd/tiny.yaml", ["export.format=both"], "single files are written for SD-1.x, SD-2.x and SDXL models"),
    ("esd/tiny.yaml", ["export.format=single-file"], "single files are written for SD-1.x, SD-2.x and SDXL models"),
    ("sdd/tiny.yaml", ["sdd.adversarial.every=1"], "models with two or three \\(SDXL, SD3, FLUX\\) are not supported"),
    ("sdd/tiny.yaml", ["learned_embeds=token.safetensors"], "models with two or three \\(SDXL, SD3, FLUX\\)"),
    ("sdd/tiny.yaml", ["perf.attention=eager"], "perf.attention=eager: the classic attention processor is a UNet's"),
])
def test_what_is_not_ported_refuses_flux_in_one_line_before_training(tmp_path, config, overrides, message):
    from sdd import api

    with pytest.raises(UserError, match=message) as err:
        api.train(str(ROOT / "configs" / config), "model.pretrained=tiny-flux", f"output_dir={tmp_path / 'run'}",
                  *overrides)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("method", ["HFI token inversion", "fine-tuning on images"])
def test_the_image_methods_refuse_flux(flux, method):
    """HFI's inversion and image fine-tuning call this check first thing (sdd/methods/hfi.py, finetune.py)."""
    with pytest.raises(UserError, match=f"{method} runs on SD-1.x and SD-2.x models so far, and tiny-flux"):
        common.require_family(flux[0], method, epsilon_only=True)


@pytest.mark.parametrize("attack, name", [
    ("concept-inversion", "HFI token inversion"), ("relearn", "fine-tuning on images"),
    ("prompt-search", "prompt search"), ("ring-a-bell", "Ring-a-Bell"),
])
def test_the_attacks_refuse_flux_in_one_line(tmp_path, attack, name):
    from sdd import api

    with pytest.raises(UserError, match=f"{name} runs on SD-1.x and SD-2.x models so far, and tiny-flux") as err:
        api.attack("tiny-flux", "red", attack, "detector=shapes:red", budget=2, out=tmp_path / "attack")
    assert "\n" not in str(err.value)


def test_the_evaluation_runs_on_tiny_flux(tmp_path):
    """sdd-eval's smoke run (the request's guidance scale is the embedded value); a negative-prompt entry stops
    with generation's one line."""
    from sdd.cli.eval import main

    common_args = ["--config", str(ROOT / "configs" / "eval" / "tiny.yaml"), "suites=[nudity]",
                   "generation.num_inference_steps=2", "generation.batch_size=2", "nudity.limit=2",
                   "stats.n_resamples=50", "report.grid_prompts=2"]
    main([*common_args, f"out={tmp_path / 'eval'}", "entries=[{label: FLUX, model: tiny-flux, method: sd}]"])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "FLUX" in report and "tiny-flux" in report
    with pytest.raises(UserError, match="guidance-distilled FLUX model"):
        main([*common_args, f"out={tmp_path / 'neg'}",
              "entries=[{label: NEG, model: tiny-flux, method: neg, concept: nudity}]"])
