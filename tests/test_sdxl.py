"""SDXL on the seam (``tiny-sdxl``): loading (built in, SDXL folders), SDD's loss and the partial sampler against
numbers computed with diffusers' own ``StableDiffusionXLPipeline`` (its ``encode_prompt`` and time ids, the UNet
called directly), the parameter sets, and training runs whose export loads with ``StableDiffusionXLPipeline``
(``from_pretrained``; LoRA: ``load_lora_weights``; the single file: our loader) and generates. Encoding and CFG
generation equal to the pipeline: tests/test_families.py; the single-file round trip: tests/test_single_file.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_script
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from sdd.config import load_config
from sdd.errors import UserError
from sdd.loop import fit, make_accelerator
from sdd.methods import common
from sdd.methods.sdd import SDDConfig, SDDMethod
from sdd.models import build_tiny_sdxl, load_components
from sdd.sampling import sample_to_k


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


# --- SDD's loss and the partial sampler against diffusers ----------------------------------------------------------


def sdd_method(tmp_path, *overrides):
    cfg = load_config(SDDConfig, str(ROOT / "configs" / "sdd" / "tiny.yaml"),
                      ["model.pretrained=tiny-sdxl", f"output_dir={tmp_path / 'run'}", "train.steps=2",
                       "train.checkpoint_every=0", "sdd.ddim_steps=4", "tracking.num_inference_steps=2", *overrides])
    return cfg, SDDMethod(cfg)


def test_sdd_loss_on_sdxl_is_the_pipelines_unet_compared(sdxl, tmp_path):
    """c_s = the pipeline's encode_prompt("nudity") with its pooled embedding and time ids; the empty prompt is the
    pipeline's unconditional branch (zeros, force_zeros_for_empty_prompt)."""
    m, pipe = sdxl
    _, method = sdd_method(tmp_path)
    c_uncond, _, c_s = method.conditioning(torch.tensor([0, 0]))
    assert c_uncond.abs().max() == 0
    g = torch.Generator().manual_seed(0)
    z_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([801, 101])
    ours = method.student_loss(method.model, z_t, t, c_uncond, c_s)
    cond, uncond, time_ids = reference_conditioning(pipe, "nudity")
    with torch.no_grad():
        ref = F.mse_loss(unet_call(m.unet, z_t, t, cond, time_ids), unet_call(m.unet, z_t, t, uncond, time_ids))
    assert ref > 0
    torch.testing.assert_close(ours.detach(), ref, atol=1e-7, rtol=1e-5)


def test_partial_sampler_on_sdxl_is_cfg_ddim_with_the_pipelines_conditioning(sdxl):
    m, pipe = sdxl
    scheduler = common.ddim_grid(m, 5)
    c = m.family.encode(m, ["a cat", ""])
    g = torch.Generator().manual_seed(1)
    z_T = torch.randn(2, 4, 16, 16, generator=g)
    s_g = 3.0
    z, t_k = sample_to_k(m.unet, scheduler, z_T, c[:1], c[1:], s_g, torch.tensor([2, 4]), denoise=m.family.denoise)
    assert t_k.tolist() == [scheduler.timesteps[2].item(), scheduler.timesteps[4].item()]

    cond, uncond, time_ids = reference_conditioning(pipe, "a cat")
    ref = DDIMScheduler.from_config(pipe.scheduler.config)
    ref.set_timesteps(5)
    for b, k in enumerate([2, 4]):
        x = z_T[b : b + 1]
        for t in ref.timesteps[:k]:
            with torch.no_grad():
                e_u, e_c = unet_call(m.unet, x, t, uncond, time_ids), unet_call(m.unet, x, t, cond, time_ids)
            x = ref.step(e_u + s_g * (e_c - e_u), t, x, eta=0.0).prev_sample
        torch.testing.assert_close(z[b : b + 1], x, atol=1e-4, rtol=1e-4)  # batched vs one at a time
        assert (x - z_T[b : b + 1]).abs().max() > 1e-3


# --- parameter sets ------------------------------------------------------------------------------------------------

EXPECTED = {
    "xattn": lambda n: "attn2" in n,
    # SDXL's noxattn also keeps add_embedding (pooled text and size ids into the time embedding) frozen
    "noxattn": lambda n: not ("attn2" in n or n.startswith(("time_embedding", "add_embedding", "conv_out"))),
    "selfattn": lambda n: "attn1" in n,
    "full": lambda n: True,
}


@pytest.mark.parametrize("finetune", list(EXPECTED))
def test_sdxl_parameter_sets_train_exactly_the_layers_they_name(tmp_path, finetune):
    before = {k: v.clone() for k, v in build_tiny_sdxl().unet.state_dict().items()}
    cfg, method = sdd_method(tmp_path, f"finetune={finetune}", "train.lr=1e-3")
    fit(make_accelerator(cfg.train, cfg.tracking, cfg.output_dir), method, cfg)
    expected = {n for n in before if EXPECTED[finetune](n)}
    assert set(method.trainable_names) == expected
    assert any(n.startswith("add_embedding") for n in before)
    for name, p in method.model.named_parameters():
        if name in expected:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


# --- training runs: the export loads with StableDiffusionXLPipeline ------------------------------------------------


def image(pipe):
    return pipe("a photo of a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


@pytest.mark.parametrize("script,finetune", [("train_sdd", "xattn"), ("train_esd", "esd-x"), ("train_sdd", "lora")])
def test_training_on_tiny_sdxl_exports_an_sdxl_pipeline_that_loads_and_generates(tmp_path, script, finetune):
    prefix = "sdd" if script == "train_sdd" else "esd"
    out = tmp_path / "run"
    config = "tiny_lora.yaml" if finetune == "lora" else "tiny.yaml"
    args = ["--config", str(ROOT / "configs" / prefix / config), "model.pretrained=tiny-sdxl", f"output_dir={out}",
            "train.steps=2", "train.checkpoint_every=0", f"{prefix}.ddim_steps=3", "tracking.num_inference_steps=2",
            f"finetune={finetune}"]
    if finetune == "lora":
        args += ["train.lr=5e-2", "sdd.ema_decay=0.0"]
    if finetune == "xattn":
        args += ["export.format=both"]
    assert load_script(script).main(args).steps == 2
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "base_model:" not in card
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    assert pipe.config.force_zeros_for_empty_prompt and pipe.tokenizer_2.pad_token == "!"
    pipe.set_progress_bar_config(disable=True)
    erased = image(pipe)
    assert erased.shape == (32, 32, 3) and erased.std() > 0
    m = build_tiny_sdxl()
    base = m.family.pipeline(m)
    base.set_progress_bar_config(disable=True)
    assert abs(erased - image(base)).max() > 1e-6  # training moved the weights
    if finetune == "xattn":  # the API's (and sdd-generate's) pipeline of a run folder is the family's
        from sdd.api import load_pipeline

        assert type(load_pipeline(out)) is StableDiffusionXLPipeline
        # the single file reads back as the same SDXL model
        single = load_components(str(out / "model.safetensors"))
        assert single.family.name == "sdxl"
        for part in ("unet", "text_encoder_2"):
            theirs = getattr(pipe, part).state_dict()
            for name, p in getattr(single, part).state_dict().items():
                assert torch.equal(p, theirs[name]), name
    if finetune == "lora":
        base.load_lora_weights(str(out / "lora"))
        assert abs(image(base) - erased).max() < 1e-4  # the adapters are the merged export


@pytest.mark.parametrize("override", ["sdd.adversarial.every=1", "learned_embeds=token.safetensors"])
def test_one_text_encoder_features_on_sdxl_are_one_clear_error(tmp_path, override):
    with pytest.raises(UserError, match="models with two or three \\(SDXL, SD3, FLUX\\) are not supported yet") as err:
        sdd_method(tmp_path, override)
    assert "\n" not in str(err.value)


def test_the_sdxl_config_runs_its_memory_plan_on_tiny_sdxl(tmp_path):
    """configs/sdd/nudity_sdxl.yaml scaled down to tiny-sdxl (size and steps only) trains and exports with its bf16
    autocast, gradient checkpointing and bf16 teacher passes; the LoRA line its comments give for 24 GB applies."""
    path = ROOT / "configs" / "sdd" / "nudity_sdxl.yaml"
    lora = next(line for line in path.read_text().splitlines() if "finetune=lora" in line).strip("# ").split()
    tiny = ["model.pretrained=tiny-sdxl", "sdd.resolution=32", "train.steps=1", "sdd.ddim_steps=2",
            "tracking.tracker=none", "tracking.num_inference_steps=2", "train.checkpoint_every=0"]
    cfg = load_config(SDDConfig, str(path), [*tiny, f"output_dir={tmp_path / 'run'}"])
    assert cfg.train.mixed_precision == "bf16" and cfg.perf.gradient_checkpointing and cfg.finetune == "xattn"
    method = SDDMethod(cfg)
    fit(make_accelerator(cfg.train, cfg.tracking, cfg.output_dir), method, cfg)
    assert method.model.is_gradient_checkpointing
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    with_lora = SDDMethod(load_config(SDDConfig, str(path), [*tiny, f"output_dir={tmp_path / 'lora'}", *lora]))
    assert with_lora.trainable_names and all("lora_" in n for n in with_lora.trainable_names)


@pytest.mark.parametrize("config, model, message", [
    ("uce/tiny.yaml", "tiny-sdxl", "UCE runs on SD-1.x and SD-2.x models so far, and tiny-sdxl is a sdxl model"),
    ("salun/tiny.yaml", "tiny-sdxl", "SalUn runs on SD-1.x and SD-2.x models so far"),
    ("salun/tiny.yaml", "tiny-sd2v", "SalUn reads the UNet's output as epsilon, and tiny-sd2v predicts v_prediction"),
])
def test_methods_not_ported_to_a_family_refuse_it_in_one_line(tmp_path, config, model, message):
    from sdd import api

    with pytest.raises(UserError, match=message):
        api.train(str(ROOT / "configs" / config), f"model.pretrained={model}", f"output_dir={tmp_path / 'run'}")
    assert not (tmp_path / "run" / "checkpoints").exists()
