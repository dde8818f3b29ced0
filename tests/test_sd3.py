"""SD3 on the seam (``tiny-sd3``): loading (built in, SD3 folders), the conditioning against
``StableDiffusion3Pipeline.encode_prompt``, flow matching's conversions by hand, CFG generation equal to the
pipeline, SDD's loss and the partial sampler against the transformer called as the pipeline calls it with the
scheduler's Euler step, the parameter sets, training runs whose export loads with ``StableDiffusion3Pipeline``
(``from_pretrained``; LoRA: ``load_lora_weights``) and generates, and what refuses an SD3 model."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_script
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from sdd.config import load_config
from sdd.errors import UserError
from sdd.families import Prediction
from sdd.generation import Request, generate
from sdd.loop import fit, make_accelerator
from sdd.methods import common
from sdd.methods.esd import esd_target
from sdd.methods.sdd import SDDConfig, SDDMethod
from sdd.models import build_tiny_sd3, load_components
from sdd.sampling import sample_to_k


@pytest.fixture(scope="module")
def sd3():
    m = build_tiny_sd3()
    pipe = m.family.pipeline(m)
    pipe.set_progress_bar_config(disable=True)
    return m, pipe


def reference_conditioning(pipe, prompt):
    """What StableDiffusion3Pipeline feeds its transformer for ``prompt`` and for the unconditional branch ("")."""
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompt, None, None,
                                                                       do_classifier_free_guidance=True)
    return (embeds, pooled), (negative, negative_pooled)


def transformer_call(transformer, z, t, cond):
    """The pipeline's call: timestep = the scheduler's timestep (sigma * 1000) expanded to the batch."""
    hidden, pooled = cond
    n = z.shape[0]
    with torch.no_grad():
        return transformer(hidden_states=z, timestep=torch.as_tensor(t).reshape(-1).expand(n),
                           encoder_hidden_states=hidden.expand(n, -1, -1), pooled_projections=pooled.expand(n, -1),
                           return_dict=False)[0]


# --- loading -----------------------------------------------------------------------------------------------------


def test_tiny_sd3_is_a_built_in_flow_model(sd3):
    m, pipe = sd3
    built = load_components("tiny-sd3")
    assert built.family.name == "sd3" and built.source == "tiny-sd3" and built.default_resolution == 32
    assert built.prediction.kind == "flow" and built.family.pipeline_class() is StableDiffusion3Pipeline
    for (name, p), q in zip(m.unet.named_parameters(), built.unet.parameters()):
        assert torch.equal(p, q), name
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.vae_scale_factor == 2
    # the grid SDD's teacher samples on is the model's flow-matching one: sigma = t / 1000, shift 3
    grid = common.ddim_grid(built, 4)
    assert isinstance(grid, FlowMatchEulerDiscreteScheduler) and grid.config.shift == 3.0

    def shift(s):  # the static shift: s' = shift s / (1 + (shift - 1) s)
        return 3 * s / (1 + 2 * s)

    # from the training grid's extremes (1 and shift(1 / 1000)) in 4 even steps, shifted again: diffusers' grid
    shifted = shift(torch.linspace(1, shift(1e-3), 4, dtype=torch.float64))
    torch.testing.assert_close(grid.sigmas[:-1].double(), shifted, atol=1e-6, rtol=0)
    torch.testing.assert_close(grid.timesteps.double(), shifted * 1000, atol=1e-3, rtol=0)
    # the T5 tokenizer is built in code: one piece per character, "</s>" appended, pad 0
    ids = m.tokenizer_3("a cat").input_ids
    assert len(ids) == 7 and ids[-1]  # "▁", "a", "▁", "c", "a", "t", "</s>"
    assert ids[-1] == m.tokenizer_3.eos_token_id == 1 and m.tokenizer_3.pad_token_id == 0
    assert m.tokenizer_3.batch_decode([ids]) == ["a cat</s>"]


def test_an_sd3_folder_loads_as_a_real_one(sd3, tmp_path):
    m, pipe = sd3
    folder = tmp_path / "sd3"
    pipe.save_pretrained(folder, safe_serialization=True)
    assert {"transformer", "text_encoder_3", "tokenizer_3"} <= {p.name for p in folder.iterdir()}
    loaded = load_components(str(folder))
    assert loaded.family.name == "sd3" and loaded.prediction.kind == "flow" and loaded.tokenizer_2.pad_token == "!"
    for a, b in [(m.unet, loaded.unet), (m.text_encoder_3, loaded.text_encoder_3), (m.vae, loaded.vae)]:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    torch.testing.assert_close(loaded.family.encode(loaded, ["a cat", ""]), m.family.encode(m, ["a cat", ""]))
    import shutil

    shutil.rmtree(folder / "tokenizer_3")
    with pytest.raises(UserError, match="an SD3 folder without 'tokenizer_3/'") as err:
        load_components(str(folder))
    assert "\n" not in str(err.value)


# --- the conditioning and the flow conversions -------------------------------------------------------------------


def test_sd3_conditioning_is_the_pipelines(sd3):
    """77 CLIP rows (CLIP-L 32 + CLIP-G 48 penultimate states, zero-padded to T5's 96), 256 T5 rows, one row
    carrying the pooled 32 + 48 projections; the empty prompt is encoded, not zeros."""
    m, pipe = sd3
    (embeds, pooled), (negative, negative_pooled) = reference_conditioning(pipe, "a cat")
    c = m.family.encode(m, ["a cat", "", "a dog"])
    assert c.shape == (3, 77 + 256 + 1, 96) and embeds.shape == (1, 333, 96) and pooled.shape == (1, 80)
    torch.testing.assert_close(c[0, :-1], embeds[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[1, :-1], negative[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[0, -1, :80], pooled[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c[1, -1, :80], negative_pooled[0], atol=1e-6, rtol=1e-6)
    assert c[:, -1, 80:].abs().max() == 0 and c[:, :77, 80:].abs().max() == 0  # the padding
    assert c[1].abs().max() > 0  # SD3 has no force_zeros_for_empty_prompt
    # the pooled rows are what the transformer's pooled_projections receive: one call, two ways
    z, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([750.0])
    with torch.no_grad():
        ours = m.family.denoise(m.unet, z, t, c[:1])
    torch.testing.assert_close(ours, transformer_call(m.unet, z, t, (embeds, pooled)), atol=1e-5, rtol=1e-5)


def test_flow_conversions_by_hand():
    """x_s = (1 - s) x0 + s eps, v = eps - x0, t = 1000 s: eps = x_s + (1 - s) v, x0 = x_s - s v."""
    x0 = torch.tensor([[1.0, -2.0]])
    eps = torch.tensor([[0.5, 4.0]])
    s, t = 0.25, 250
    x_s = torch.tensor([[0.75 * 1.0 + 0.25 * 0.5, 0.75 * -2.0 + 0.25 * 4.0]])  # [0.875, -0.5]
    v = torch.tensor([[-0.5, 6.0]])
    p = Prediction("flow", None, 1000)
    torch.testing.assert_close(p.to_epsilon(v, x_s, t), eps)  # [0.875 + 0.75 (-0.5), -0.5 + 0.75 * 6]
    torch.testing.assert_close(p.to_x0(v, x_s, t), x0)  # [0.875 + 0.125, -0.5 - 1.5]
    torch.testing.assert_close(p.from_epsilon(eps, x_s, t), v)
    assert x_s.tolist() == [[0.875, -0.5]] and s * 1000 == t


def test_the_esd_and_sdd_targets_carry_over_to_flow_v():
    """At fixed (x_s, s) eps = x_s + (1 - s) v is affine in v, and the ESD target's weights (1 + eta, -eta) sum to
    one: the target taken in v is the v of the target taken in epsilon (SDD's target, eta = 0, trivially)."""
    g = torch.Generator().manual_seed(3)
    x_s, v_u, v_c = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t, p = torch.tensor([900.0, 120.0]), Prediction("flow", None, 1000)
    for eta in (0.0, 1.0, 3.0):
        in_v = esd_target(v_u, v_c, eta)
        in_eps = esd_target(p.to_epsilon(v_u, x_s, t), p.to_epsilon(v_c, x_s, t), eta)
        torch.testing.assert_close(p.to_epsilon(in_v, x_s, t), in_eps, atol=1e-5, rtol=1e-5)


# --- generation equals the stock pipeline ------------------------------------------------------------------------


def test_sd3_cfg_generation_equals_the_stock_pipeline(sd3):
    m, pipe = sd3
    for prompt, seed, scale in [("a photo of a cat", 0, 7.0), ("a dog", 3, 4.0)]:
        ref = pipe(prompt, num_inference_steps=4, guidance_scale=scale, generator=torch.Generator().manual_seed(seed),
                   output_type="pt").images[0]
        ours = generate(m, [Request(prompt, seed=seed, guidance_scale=scale)], num_inference_steps=4,
                        output_type="pt")[0]
        assert ref.shape == (3, 32, 32) and ref.std() > 0
        assert ((ours.clamp(-1, 1) + 1) / 2 - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", ["sld-max", "sega", "safree"])
def test_epsilon_space_guidance_refuses_a_flow_model(sd3, method):
    from sdd.methods.inference import generate_with_method

    m, _ = sd3
    with pytest.raises(UserError, match="flow-matching model \\(SD3\\)") as err:
        generate_with_method(m, [Request("a person", seed=0)], method, "nudity", num_inference_steps=2)
    assert "\n" not in str(err.value)
    neg = generate_with_method(m, [Request("a person", seed=0)], "neg", "nudity", num_inference_steps=2,
                               output_type="latent")[0]
    assert neg.shape == (4, 16, 16)  # plain CFG with a negative prompt runs


# --- SDD's loss and the partial sampler against the pipeline's calls ----------------------------------------------


def sdd_method(tmp_path, *overrides):
    cfg = load_config(SDDConfig, str(ROOT / "configs" / "sdd" / "tiny.yaml"),
                      ["model.pretrained=tiny-sd3", f"output_dir={tmp_path / 'run'}", "train.steps=2",
                       "train.checkpoint_every=0", "sdd.ddim_steps=4", "tracking.num_inference_steps=2", *overrides])
    return cfg, SDDMethod(cfg)


def test_sdd_loss_on_sd3_is_the_pipelines_transformer_compared(sd3, tmp_path):
    """c_s = the pipeline's encode_prompt("nudity"), the unconditional its negative branch; the loss is the mean
    squared difference of the two v outputs at the grid's timesteps (sigma * 1000)."""
    m, pipe = sd3
    _, method = sdd_method(tmp_path)
    c_uncond, _, c_s = method.conditioning(torch.tensor([0, 0]))
    z_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = method.scheduler.timesteps[torch.tensor([1, 3])]
    assert torch.allclose(t / 1000, method.scheduler.sigmas[torch.tensor([1, 3])])
    ours = method.student_loss(method.model, z_t, t, c_uncond, c_s)
    cond, uncond = reference_conditioning(pipe, "nudity")
    ref = F.mse_loss(transformer_call(m.unet, z_t, t, cond), transformer_call(m.unet, z_t, t, uncond))
    assert ref > 0
    torch.testing.assert_close(ours.detach(), ref, atol=1e-8, rtol=1e-4)


def test_partial_sampler_on_sd3_is_cfg_with_the_schedulers_euler_step(sd3):
    m, pipe = sd3
    scheduler = common.ddim_grid(m, 5)
    c = m.family.encode(m, ["a cat", ""])
    z_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    s_g = 3.0
    for _ in range(2):  # twice on the same grid: no step counter carries over from the first call
        z, t_k = sample_to_k(m.unet, scheduler, z_T, c[:1], c[1:], s_g, torch.tensor([2, 4]),
                             denoise=m.family.denoise)
        assert t_k.tolist() == [scheduler.timesteps[2].item(), scheduler.timesteps[4].item()]

        cond, uncond = reference_conditioning(pipe, "a cat")
        for b, k in enumerate([2, 4]):
            ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # as the pipeline: fresh
            ref.set_timesteps(5)
            x = z_T[b : b + 1]
            for t in ref.timesteps[:k]:
                v_u, v_c = transformer_call(m.unet, x, t, uncond), transformer_call(m.unet, x, t, cond)
                x = ref.step(v_u + s_g * (v_c - v_u), t, x).prev_sample
            torch.testing.assert_close(z[b : b + 1], x, atol=1e-4, rtol=1e-4)  # batched vs one at a time
            assert (x - z_T[b : b + 1]).abs().max() > 1e-3
            assert abs(t_k[b].item() / 1000 - ref.sigmas[k].item()) < 1e-6  # the latent sits at sigma_k


# --- parameter sets ------------------------------------------------------------------------------------------------

# tiny-sd3 has two blocks; the last is context_pre_only (no text output, no ff_context, no to_add_out)
XATTN = {f"transformer_blocks.{i}.attn.{proj}.{kind}" for i in (0, 1) for proj in ("add_k_proj", "add_v_proj")
         for kind in ("weight", "bias")}
XATTN |= {f"transformer_blocks.0.attn.add_q_proj.{kind}" for kind in ("weight", "bias")}
TEXT_PATHWAY = ("context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
EXPECTED = {
    "xattn": lambda n: n in XATTN,
    "noxattn": lambda n: not (n.startswith(TEXT_PATHWAY) or "_context" in n or ".add_" in n or "to_add_out" in n),
    "selfattn": lambda n: any(f".attn.{p}." in n for p in ("to_q", "to_k", "to_v", "to_out")),
    "full": lambda n: True,
}
DEAD = "transformer_blocks.1.attn.add_q_proj."  # the last block's text queries reach no output


@pytest.mark.parametrize("finetune", list(EXPECTED))
def test_sd3_parameter_sets_train_exactly_the_layers_they_name(tmp_path, finetune):
    before = {k: v.detach().clone() for k, v in build_tiny_sd3().unet.named_parameters()}
    cfg, method = sdd_method(tmp_path, f"finetune={finetune}", "train.lr=1e-3", "train.weight_decay=0")
    fit(make_accelerator(cfg.train, cfg.tracking, cfg.output_dir), method, cfg)
    expected = {n for n in before if EXPECTED[finetune](n)}
    assert set(method.trainable_names) == expected
    if finetune == "xattn":
        assert len(expected) == 10
    if finetune == "noxattn":  # the image stream: patch embedding, image norms, attention and feed-forward
        assert "pos_embed.proj.weight" in expected and "transformer_blocks.1.ff.net.2.bias" in expected
        assert not any("norm1_context" in n or "add_k_proj" in n for n in expected)
    if finetune == "selfattn":
        assert len(expected) == 2 * 4 * 2 and not any("to_add_out" in n for n in expected)
    for name, p in method.model.named_parameters():
        if name in expected and not name.startswith(DEAD):
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:  # full: the last block's add_q_proj gets no gradient, which is why xattn leaves it out
            assert torch.equal(p, before[name]), f"{name} changed"


def test_sd3_lora_puts_adapters_on_the_xattn_layers(tmp_path):
    cfg = load_config(SDDConfig, str(ROOT / "configs" / "sdd" / "tiny_lora.yaml"),
                      ["model.pretrained=tiny-sd3", f"output_dir={tmp_path / 'run'}"])
    method = SDDMethod(cfg)
    layers = {n.rsplit(".", 1)[0] for n in XATTN}
    assert set(method.trainable_names) == {f"{layer}.lora_{ab}.default.weight" for layer in layers for ab in "AB"}
    with pytest.raises(UserError, match="lora.target_modules \\['attn2.to_q'\\] names no module of this model"):
        sdd_method(tmp_path, "finetune=lora", "lora.target_modules=[attn2.to_q]")


# --- training runs: the export loads with StableDiffusion3Pipeline ------------------------------------------------


def image(pipe):
    return pipe("a photo of a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


@pytest.mark.parametrize("script,finetune", [("train_sdd", "xattn"), ("train_esd", "esd-x"), ("train_sdd", "lora")])
def test_training_on_tiny_sd3_exports_an_sd3_pipeline_that_loads_and_generates(tmp_path, script, finetune):
    prefix = "sdd" if script == "train_sdd" else "esd"
    out = tmp_path / "run"
    config = "tiny_lora.yaml" if finetune == "lora" else "tiny.yaml"
    args = ["--config", str(ROOT / "configs" / prefix / config), "model.pretrained=tiny-sd3", f"output_dir={out}",
            "train.steps=2", "train.checkpoint_every=0", f"{prefix}.ddim_steps=3", "tracking.num_inference_steps=2",
            f"finetune={finetune}", "train.lr=5e-2"]
    if finetune == "lora":
        args += ["sdd.ema_decay=0.0"]
    run = load_script(script).main(args)
    assert run.steps == 2 and set(run.exports) >= {"pipeline", "transformer"} and "unet" not in run.exports
    assert (out / "transformer.safetensors").is_file() and not (out / "unet.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "base_model:" not in card
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    erased = image(pipe)
    assert erased.shape == (32, 32, 3) and erased.std() > 0
    m = build_tiny_sd3()
    base = m.family.pipeline(m)
    base.set_progress_bar_config(disable=True)
    assert abs(erased - image(base)).max() > 1e-6  # training moved the weights
    if finetune == "xattn":  # the API's (and sdd-generate's) pipeline of a run folder is the family's
        from sdd.api import load_pipeline

        assert type(load_pipeline(out)) is StableDiffusion3Pipeline
        # our own generation on the export: the same image as the pipeline's
        request = Request("a photo of a cat", seed=0, guidance_scale=7.0)  # the pipeline's default scale
        ours = generate(load_components(str(out / "pipeline")), [request], num_inference_steps=3, output_type="pt")[0]
        assert abs((ours.clamp(-1, 1) + 1) / 2 - torch.from_numpy(erased).permute(2, 0, 1)).max() < 1e-5
    if finetune == "lora":
        base.load_lora_weights(str(out / "lora"))
        assert abs(image(base) - erased).max() < 1e-4  # the adapters are the merged export


# --- what refuses an SD3 model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ("uce/tiny.yaml", "UCE runs on SD-1.x and SD-2.x models so far, and tiny-sd3 is a sd3 model"),
    ("rece/tiny.yaml", "UCE runs on SD-1.x and SD-2.x models so far, and tiny-sd3 is a sd3 model"),
    ("salun/tiny.yaml", "SalUn runs on SD-1.x and SD-2.x models so far, and tiny-sd3 is a sd3 model"),
])
def test_methods_not_ported_refuse_sd3_in_one_line(tmp_path, config, message):
    from sdd import api

    with pytest.raises(UserError, match=message) as err:
        api.train(str(ROOT / "configs" / config), "model.pretrained=tiny-sd3", f"output_dir={tmp_path / 'run'}")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("method", ["HFI token inversion", "fine-tuning on images"])
def test_the_image_methods_refuse_sd3(sd3, method):
    """HFI's inversion and image fine-tuning call this check first thing (sdd/methods/hfi.py, finetune.py)."""
    with pytest.raises(UserError, match=f"{method} runs on SD-1.x and SD-2.x models so far"):
        common.require_family(sd3[0], method, epsilon_only=True)


@pytest.mark.parametrize("overrides, message", [
    (["sdd.adversarial.every=1"], "models with two or three \\(SDXL, SD3, FLUX\\) are not supported yet"),
    (["learned_embeds=token.safetensors"], "models with two or three \\(SDXL, SD3, FLUX\\) are not supported yet"),
    (["perf.attention=eager"], "perf.attention=eager: the classic attention processor is a UNet's"),
])
def test_sd3_features_not_ported_are_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as err:
        sdd_method(tmp_path, *overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config", ["sdd/tiny.yaml", "esd/tiny.yaml"])
def test_a_single_file_export_refuses_sd3_before_training(tmp_path, config):
    from sdd import api

    with pytest.raises(UserError, match="single files are written for SD-1.x, SD-2.x and SDXL models") as err:
        api.train(str(ROOT / "configs" / config), "model.pretrained=tiny-sd3", f"output_dir={tmp_path / 'run'}",
                  "export.format=both")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sdd_export_of_an_sd3_run_refuses_a_single_file(tmp_path):
    from sdd import api

    out = tmp_path / "run"
    api.train(str(ROOT / "configs" / "sdd" / "tiny.yaml"), "model.pretrained=tiny-sd3", f"output_dir={out}",
              "train.steps=1", "sdd.ddim_steps=2", "train.checkpoint_every=0", "tracking.num_inference_steps=1")
    with pytest.raises(UserError, match="tiny-sd3 is a sd3 model: use export.format=diffusers"):
        api.export(str(out), "export.format=single-file", out=str(tmp_path / "single"))
    assert not (tmp_path / "single" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_train_sd3_with_identical_parameters(tmp_path):
    """The README's command under `accelerate launch` with two CPU processes: DDP wraps the transformer (the family
    reads nothing from its config at call time) and both processes end with the same weights."""
    import json
    import os
    import socket
    import sys

    from conftest import run_command

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "train/train_sdd.py"), "--config", str(ROOT / "configs/sdd/tiny.yaml"),
           "model.pretrained=tiny-sd3", f"output_dir={out}", "train.steps=2", "train.checkpoint_every=0",
           "sdd.ddim_steps=4", "tracking.num_inference_steps=2"]
    code, stdout, stderr = run_command(cmd, env=env, timeout=300)
    assert code == 0, stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["param_checksums"][0] == summary["param_checksums"][1]
    assert set(summary["exports"]) == {"pipeline", "transformer", "config", "card"}


def test_the_evaluation_runs_on_tiny_sd3(tmp_path):
    """sdd-eval's smoke run (plain CFG); an SLD entry on an SD3 model stops with generation's one line."""
    from sdd.cli.eval import main

    out = tmp_path / "eval"
    common_args = ["--config", str(ROOT / "configs" / "eval" / "tiny.yaml"), "suites=[nudity]",
                   "generation.num_inference_steps=2", "generation.batch_size=2", "nudity.limit=2",
                   "stats.n_resamples=50", "report.grid_prompts=2"]
    main([*common_args, f"out={out}", "entries=[{label: SD3, model: tiny-sd3, method: sd}, "
                                      "{label: NEG3, model: tiny-sd3, method: neg, concept: nudity}]"])
    report = (out / "report.md").read_text()
    assert "SD3" in report and "NEG3" in report and "tiny-sd3" in report
    with pytest.raises(UserError, match="flow-matching model \\(SD3\\)"):
        main([*common_args, f"out={tmp_path / 'sld'}",
              "entries=[{label: SLD3, model: tiny-sd3, method: sld-max, concept: nudity}]"])


@pytest.mark.parametrize("attack, name", [
    ("concept-inversion", "HFI token inversion"), ("relearn", "fine-tuning on images"),
    ("prompt-search", "prompt search"), ("ring-a-bell", "Ring-a-Bell"),
])
def test_the_attacks_refuse_sd3_in_one_line(tmp_path, attack, name):
    """Each learns or searches one text encoder's tokens, or fine-tunes on images with an epsilon loss."""
    from sdd import api

    with pytest.raises(UserError, match=f"{name} runs on SD-1.x and SD-2.x models so far, and tiny-sd3") as err:
        api.attack("tiny-sd3", "red", attack, "detector=shapes:red", budget=2, out=tmp_path / "attack")
    assert "\n" not in str(err.value)
