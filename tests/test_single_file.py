"""Single-file checkpoints (the original CompVis/A1111/ComfyUI layout): export -> one .safetensors -> read back by
our loader and by diffusers' own ``from_single_file`` with a local config (offline: the tests run with
HF_HUB_OFFLINE=1, so any hub call would fail them), equal tensors; family detection from key shapes; one-line
refusals; the atomic write."""

import errno
import os
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from conftest import ROOT
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdd import api
from sdd import single_file as sf
from sdd.cli.export import main as export_main
from sdd.errors import UserError
from sdd.export import ModelCard, export_model
from sdd.models import build_tiny_sd, build_tiny_sdxl, load_components

CARD = ModelCard(base_model="tiny", method="SDD (test)", concepts=["red"], steps=1, finetune="xattn")
TINY_SDD = ["train.steps=2", "train.checkpoint_every=0", "sdd.ddim_steps=4", "tracking.num_inference_steps=2"]


def assert_same(a, b, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        expected = sa[k] if dtype is None else sa[k].to(dtype)
        assert torch.equal(expected, sb[k].to(expected.dtype)), k


def tiny_sd2():
    """An SD-2.x-shaped tiny model: OpenCLIP-style text encoder (GELU), linear projections, v-prediction."""
    tiny = build_tiny_sd()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
            use_linear_projection=True, norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
            projection_dim=32,
        ))
    tiny.tokenizer.pad_token = "!"
    scheduler = DDIMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction")
    return unet.eval(), tiny.vae, text_encoder.eval(), tiny.tokenizer, scheduler


# --- round trips ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd1")
    tiny = build_tiny_sd()
    written = export_model(str(out), tiny, tiny.unet, config_yaml="a: 1\n", card=CARD, format="single-file")
    return tiny, out, written


def test_single_file_export_writes_the_original_layout_only(sd1_export):
    tiny, out, written = sd1_export
    assert sorted(os.listdir(out)) == ["README.md", "config.yaml", "model-config", "model.safetensors"]
    assert set(written) == {"single-file", "single-file-config", "config", "card"}
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    prefixes = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."}
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)
    assert len(keys) == sum(len(m.state_dict()) for m in (tiny.unet, tiny.vae, tiny.text_encoder))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # conv_in
    assert "model.diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight" in keys
    # the VAE's attention is 1x1 convolutions in the original
    assert load_file(out / "model.safetensors")["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert 'from_single_file("model.safetensors", config="model-config"' in (out / "README.md").read_text()


def test_single_file_reads_back_equal_in_ours_and_in_diffusers(sd1_export):
    tiny, out, _ = sd1_export
    path = str(out / "model.safetensors")
    ours = load_components(path)
    assert ours.source == path
    for a, b in ((tiny.unet, ours.unet), (tiny.vae, ours.vae), (tiny.text_encoder, ours.text_encoder)):
        assert_same(a, b)
    assert type(ours.scheduler).__name__ == "DDIMScheduler"
    assert ours.tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids
    pipe = StableDiffusionPipeline.from_single_file(path, config=str(out / "model-config"), local_files_only=True,
                                                    safety_checker=None)
    for a, b in ((tiny.unet, pipe.unet), (tiny.vae, pipe.vae), (tiny.text_encoder, pipe.text_encoder)):
        assert_same(a, b)
    assert_same(tiny.unet, api.load_pipeline(path).unet)  # sdd-generate / sdd-eval take the file as a model


def test_sd2_text_encoder_is_written_in_the_open_clip_layout(tmp_path):
    unet, vae, text_encoder, tokenizer, scheduler = tiny_sd2()
    path, config = str(tmp_path / "sd2.safetensors"), str(tmp_path / "sd2-config")
    sf.write_single_file(path, unet, vae, text_encoder, tokenizer, scheduler, dtype=torch.float32,
                         config_folder=config)
    state = load_file(path)
    fused = state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert fused.shape == (3 * 32, 32)
    q = text_encoder.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(fused[:32], q)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True, safety_checker=None)
    ours = load_components(path)
    for loaded in (pipe, ours):
        for a, b in ((unet, loaded.unet), (vae, loaded.vae), (text_encoder, loaded.text_encoder)):
            assert_same(a, b)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    assert ours.tokenizer.pad_token == "!"
    bare = tmp_path / "bare-config"  # a config folder without a tokenizer: the family's padding
    shutil.copytree(config, bare, ignore=shutil.ignore_patterns("tokenizer"))
    assert load_components(path, single_file_config=str(bare)).tokenizer.pad_token == "!"


def test_export_dtype_reaches_the_single_file(tmp_path):
    tiny = build_tiny_sd()
    export_model(str(tmp_path), tiny, tiny.unet, config_yaml="", card=CARD, dtype="fp16", format="both")
    assert {"pipeline", "unet.safetensors", "model.safetensors", "model-config"} <= set(os.listdir(tmp_path))
    state = load_file(tmp_path / "model.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float16}
    ours = load_components(str(tmp_path / "model.safetensors"))  # read as fp32, values those of the fp16 export
    assert ours.unet.dtype == torch.float32
    assert_same(tiny.unet, ours.unet, dtype=torch.float16)


# --- training from a single file, and sdd-export --format single-file -------------------------------------------


def test_train_from_a_single_file_and_export_it_back_as_one(sd1_export, tmp_path):
    _, out, _ = sd1_export
    run = tmp_path / "run"
    result = api.train(str(ROOT / "configs/sdd/tiny.yaml"), f"output_dir={run}",
                       f"model.pretrained={out / 'model.safetensors'}", *TINY_SDD)
    assert result.steps == 2
    assert "base_model:" not in (run / "README.md").read_text()  # the card's base_model is for hub ids only
    exported = UNet2DConditionModel.from_pretrained(run / "pipeline", subfolder="unet")
    written = export_main([str(run), "--format", "single-file", "--out", str(tmp_path / "again")])
    assert set(written) == {"single-file", "single-file-config", "config", "card"}
    again = load_components(written["single-file"])
    assert_same(exported, again.unet)


# --- which config describes a file ------------------------------------------------------------------------------


def shipped(name: str):
    """A shipped config's model in the original layout, built on the meta device (no weights)."""
    import json

    with open(os.path.join(sf.CONFIG_DIR, name + ".json")) as f:
        configs = json.load(f)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        encoders = [CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))]
        if "text_encoder_2" in configs:  # SDXL
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
    state = sf.unet_to_original(unet.state_dict(), unet.config)
    state.update(sf.vae_to_original(vae.state_dict(), vae.config))
    state.update(sf.family_of(*encoders).text_to_original(*[e.state_dict() for e in encoders]))
    assert {k: tuple(v.shape) for k, v in state.items()} == sf.original_shapes(configs)
    return sf.original_shapes(configs), (unet, vae, *encoders), state


@pytest.mark.parametrize("name, family, prediction",
                         [("sd15", "SD-1.x", "epsilon"), ("sd21", "SD-2.x", "v_prediction"),
                          ("sdxl", "SDXL", "epsilon")])
def test_the_shipped_config_is_chosen_by_key_shapes(name, family, prediction):
    shapes, _, _ = shipped(name)
    found, config = sf.detect(shapes)
    assert (found.name, config) == (family, name)
    configs, folder = sf._configs_for("x.safetensors", shapes, {}, None)
    assert folder is None and configs["scheduler"]["prediction_type"] == prediction
    base, _ = sf._configs_for("x.safetensors", shapes, {}, "sd21-base")  # the override wins
    assert base["scheduler"]["prediction_type"] == "epsilon"


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_the_key_map_of_the_real_architectures_inverts_diffusers_converter(name):
    """At full SD-1.5 / SD-2.1 / SDXL size (meta tensors): our diffusers -> original map, then diffusers' own
    converter, gives back every diffusers key with its shape."""
    from diffusers.loaders import single_file_utils as su

    shapes, (unet, vae, text_encoder, *second), state = shipped(name)
    unet_back = su.convert_ldm_unet_checkpoint(state, unet.config)
    assert {k: v.shape for k, v in unet_back.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    vae_back = su.convert_ldm_vae_checkpoint(state, vae.config)
    assert {k: v.shape for k, v in vae_back.items()} == {k: v.shape for k, v in vae.state_dict().items()}
    if name == "sd15":
        text_back = su.convert_ldm_clip_checkpoint(state)
    elif name == "sd21":
        text_back = su.convert_open_clip_checkpoint(text_encoder, state)
    else:
        text_back = su.convert_ldm_clip_checkpoint(state, sf.XL_CLIP_PREFIX)
        text_2_back = su.convert_open_clip_checkpoint(second[0], state, prefix=sf.XL_OPEN_CLIP_PREFIX)
        assert {k: v.shape for k, v in text_2_back.items()} == {k: v.shape for k, v in second[0].state_dict().items()}
        assert state[sf.XL_OPEN_CLIP_PREFIX + "text_projection"].shape == (1280, 1280)
    text_back = {k.removeprefix("text_model."): v.shape for k, v in text_back.items()}
    assert text_back == {k.removeprefix("text_model."): v.shape for k, v in text_encoder.state_dict().items()}
    counts = {p: sum(k.startswith(p) for k in shapes) for p in ("model.diffusion_model.", "first_stage_model.")}
    unet_keys = {"sdxl": 1680}.get(name, 686)
    assert counts == {"model.diffusion_model.": unet_keys, "first_stage_model.": 248}  # the released files' UNet, VAE


def test_the_unet_map_covers_conditioning_embeddings():
    """UNets with a class or micro-conditioning embedding (``label_emb`` in the original; SDXL has one)."""
    from diffusers.loaders import single_file_utils as su

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, class_embed_type="projection", projection_class_embeddings_input_dim=8,
    )
    state = unet.state_dict()
    original = sf.unet_to_original(state, unet.config)
    assert "model.diffusion_model.label_emb.0.0.weight" in original
    back = su.convert_ldm_unet_checkpoint(original, unet.config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_detection_refuses_what_it_cannot_describe():
    shapes, _, _ = shipped("sd15")
    unet_only = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(UserError, match="an SDXL refiner is not read"):  # OpenCLIP bigG alone, as embedder 0
        sf.detect({**unet_only, "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)})
    with pytest.raises(UserError, match="no text encoder"):
        sf.detect(unet_only)
    narrow = {**shapes, sf.FAMILIES[0].text_key: (49408, 32)}
    with pytest.raises(UserError, match="model.single_file_config"):
        sf._configs_for("x.safetensors", narrow, {}, None)
    with pytest.raises(UserError, match="sd15"):
        sf._configs_for("x.safetensors", shapes, {}, "sd9")


def test_single_file_config_is_a_setting_of_single_files_only(sd1_export, tmp_path):
    from sdd.config import load_config
    from sdd.errors import ConfigError
    from sdd.methods.sdd import SDDConfig

    with pytest.raises(ConfigError, match="model.single_file_config: describes a single .safetensors file"):
        load_config(SDDConfig, None, ["model.single_file_config=sd15"])
    tiny, out, _ = sd1_export
    path = str(out / "model.safetensors")
    folder = load_components(path, single_file_config=str(out / "model-config"))  # a diffusers folder as config
    assert_same(tiny.unet, folder.unet)
    with pytest.raises(UserError, match="lacks 808 weights needed by the shipped sd15"):  # it wins over the file's
        load_components(path, single_file_config="sd15")
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load_components(path, single_file_config=str(tmp_path))


# --- refusals: one line each ------------------------------------------------------------------------------------


def one_line_error(pretrained: str) -> str:
    with pytest.raises(UserError) as info:
        load_components(pretrained)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_pickles_missing_files_and_non_checkpoints_are_refused_in_one_line(tmp_path):
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    assert "pickled checkpoint" in one_line_error(str(pickle))
    assert "no such file" in one_line_error(str(tmp_path / "absent.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07not a safetensors file at all")
    assert "not a readable .safetensors file" in one_line_error(str(garbage))
    other = tmp_path / "other.safetensors"
    save_file({"layer.weight": torch.zeros(2, 2)}, str(other))
    assert "not a Stable Diffusion checkpoint" in one_line_error(str(other))


def test_a_file_missing_weights_is_named(sd1_export, tmp_path):
    _, out, _ = sd1_export
    with safe_open(out / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    state = load_file(out / "model.safetensors")
    del state["model.diffusion_model.out.2.weight"]  # conv_out
    cut = tmp_path / "cut.safetensors"
    save_file(state, str(cut), metadata=metadata)
    assert ("lacks 1 weights needed by the configs it carries (e.g. model.diffusion_model.out.2.weight)"
            in one_line_error(str(cut)))
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 1, 1)  # 3x3 in the model
    save_file(state, str(cut), metadata=metadata)
    assert ("does not fit the configs it carries: model.diffusion_model.out.2.weight is [4, 32, 1, 1]"
            in one_line_error(str(cut)))


# --- the atomic write -------------------------------------------------------------------------------------------


def test_a_failing_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import safetensors.torch

    tiny = build_tiny_sd()
    path = tmp_path / "model.safetensors"
    sf.write_single_file(str(path), tiny.unet, tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.scheduler,
                         dtype=torch.float32)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # some bytes reach the disk, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        sf.write_single_file(str(path), tiny.unet, tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.scheduler,
                             dtype=torch.float16)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary left beside it
    assert path.read_bytes() == before
    with pytest.raises(UserError):
        sf.write_single_file(str(tmp_path / "new.safetensors"), tiny.unet, tiny.vae, tiny.text_encoder,
                             tiny.tokenizer, tiny.scheduler, dtype=torch.float32)
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_the_training_command_prints_one_line_for_a_pickle_or_a_non_checkpoint(train_sdd, tiny_args, tmp_path,
                                                                               capsys):
    from sdd.errors import run_main

    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    other = tmp_path / "other.safetensors"
    save_file({"layer.weight": torch.zeros(2, 2)}, str(other))
    for path, message in ((pickle, "is a pickled checkpoint"), (other, "is not a Stable Diffusion checkpoint")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_main(train_sdd.main, tiny_args(f"model.pretrained={path}"))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], err
        assert not (tmp_path / "run").exists()


def test_a_lora_run_goes_out_merged_in_the_single_file(tmp_path):
    from sdd.export import merged_unet
    from sdd.params import configure_trainable

    tiny = build_tiny_sd()
    unet = tiny.unet
    names = configure_trainable(unet, "lora")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name in names and "lora_B" in name:
                p.normal_()  # B starts at zero: make the adapters change the model
    written = export_model(str(tmp_path), tiny, unet, config_yaml="", card=CARD, is_lora=True, format="single-file")
    assert {"lora", "single-file"} <= set(written) and "pipeline" not in written
    merged = merged_unet(unet)
    to_k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert not torch.equal(merged.state_dict()[to_k], build_tiny_sd().unet.state_dict()[to_k])  # the LoRA is in
    assert_same(merged, load_components(written["single-file"]).unet)
    with pytest.raises(UserError, match="export.merge_lora=true"):
        export_model(str(tmp_path / "b"), tiny, unet, config_yaml="", card=CARD, is_lora=True, merge_lora=False,
                     format="single-file")


def test_sdxl_round_trip_in_ours_and_in_diffusers(tmp_path):
    """tiny-sdxl -> model.safetensors (both text encoders in SDXL's layout) -> our loader and diffusers'
    StableDiffusionXLPipeline.from_single_file: equal tensors, the same tokenizers and conditioning."""
    tiny = build_tiny_sdxl()
    written = export_model(str(tmp_path), tiny, tiny.unet, config_yaml="", card=CARD, format="single-file")
    path = written["single-file"]
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert {sf.XL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight",
            sf.XL_OPEN_CLIP_PREFIX + "text_projection"} <= keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the pooled text and time ids' embedding
    ours = load_components(path)
    pipe = StableDiffusionXLPipeline.from_single_file(path, config=written["single-file-config"],
                                                      local_files_only=True)
    for loaded in (ours, pipe):
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert_same(getattr(tiny, part), getattr(loaded, part))
        assert loaded.tokenizer_2.pad_token == "!"
    assert ours.family.name == "sdxl" and type(ours.scheduler) is type(tiny.scheduler)
    for key in ("timestep_spacing", "steps_offset", "clip_sample", "set_alpha_to_one"):  # the DDIM grid's too
        assert ours.scheduler.config[key] == tiny.scheduler.config[key], key
    torch.testing.assert_close(ours.family.encode(ours, ["a cat", ""]), tiny.family.encode(tiny, ["a cat", ""]))
    assert "StableDiffusionXLPipeline.from_single_file" in (tmp_path / "README.md").read_text()
