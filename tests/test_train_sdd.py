"""SDD end to end on the tiny model: train -> export -> reload -> generate; resume; re-export; LoRA."""

import json
import os

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdd.cli.export import main as export_main
from sdd.config import load_config
from sdd.methods.sdd import SDDConfig, SDDMethod


def pipe_image(pipe, prompt="a photo of a cat", seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=3, generator=g, output_type="np").images[0]


def test_tiny_run_writes_an_export_that_loads_and_generates(train_sdd, tiny_args, tmp_path):
    out = tmp_path / "run"
    result = train_sdd.main(tiny_args("train.steps=3", "train.checkpoint_every=2"))
    assert result.steps == 3
    assert sorted(os.listdir(out)) == sorted(
        ["README.md", "checkpoints", "config.yaml", "pipeline", "samples", "train_summary.json", "unet.safetensors"]
    )
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002", "step-000003"]
    assert sorted(os.listdir(out / "pipeline")) == sorted(
        ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    )

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.safety_checker is None
    image = pipe_image(pipe)
    assert image.shape == (32, 32, 3) and image.std() > 0

    # the single-file UNet is exactly the pipeline's UNet, which is the EMA teacher (the default export)
    single = load_file(out / "unet.safetensors")
    assert single.keys() == pipe.unet.state_dict().keys()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(single[key], value)
    teacher = load_file(out / "checkpoints" / "step-000003" / "method_state.safetensors")
    name = next(iter(teacher)).removeprefix("teacher.")
    assert torch.equal(single[name], teacher[f"teacher.{name}"])

    # the saved config reloads into the same settings, the card names what was done
    cfg = load_config(SDDConfig, str(out / "config.yaml"))
    assert cfg.concepts == ["nudity"] and cfg.train.steps == 3 and cfg.sdd.ddim_steps == 4
    card = (out / "README.md").read_text()
    assert "nudity" in card and "| optimizer steps | 3 |" in card and "EMA teacher" in card
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["num_processes"] == 1


def test_existing_run_is_not_overwritten_without_resume(train_sdd, tiny_args):
    from sdd.errors import UserError

    train_sdd.main(tiny_args())
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_sdd.main(tiny_args())


def final_state(out):
    ckpt = out / "checkpoints" / "step-000006"
    return {**load_file(ckpt / "model.safetensors"), **load_file(ckpt / "method_state.safetensors")}


def test_interrupted_run_resumes_to_the_same_weights(train_sdd, tiny_args, tmp_path, monkeypatch):
    args = ["train.steps=6", "train.checkpoint_every=3", "train.gradient_accumulation_steps=2",
            "train.lr_scheduler=linear", "train.batch_size=2", "sdd.k_distribution=beta"]
    train_sdd.main(tiny_args(*args, out=tmp_path / "straight"))

    calls = {"n": 0}
    original = SDDMethod.after_optimizer_step

    def crash_at_step_5(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed mid-run, after the step-3 checkpoint
        original(self)

    monkeypatch.setattr(SDDMethod, "after_optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_sdd.main(tiny_args(*args, out=tmp_path / "resumed"))
    monkeypatch.setattr(SDDMethod, "after_optimizer_step", original)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["step-000003"]
    assert not (tmp_path / "resumed" / "pipeline").exists()

    result = train_sdd.main([*tiny_args(*args, out=tmp_path / "resumed"), "--resume"])
    assert result.steps == 6
    # the training seconds in each checkpoint count every run of the folder (time to target reads them)
    before = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    after = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    this_run = json.loads((tmp_path / "resumed" / "train_summary.json").read_text())["seconds_this_run"]
    assert before["seconds"] > 0 and after["seconds"] >= before["seconds"] + this_run - 0.01
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_from_a_missing_folder_is_a_clear_error(train_sdd, tiny_args, tmp_path):
    from sdd.errors import UserError

    with pytest.raises(UserError, match="not a checkpoint folder"):
        train_sdd.main([*tiny_args(), "--resume", str(tmp_path / "nope")])


def test_reexport_from_a_checkpoint(train_sdd, tiny_args, tmp_path):
    out = tmp_path / "run"
    train_sdd.main(tiny_args("train.steps=2", "train.checkpoint_every=1"))
    original = load_file(out / "unet.safetensors")

    export_main([str(out), "--out", str(tmp_path / "again")])  # latest checkpoint, same settings
    again = load_file(tmp_path / "again" / "unet.safetensors")
    assert all(torch.equal(original[k], again[k]) for k in original)

    export_main([str(out), "--checkpoint", "step-000001", "--out", str(tmp_path / "s1"), "sdd.export=student"])
    step1_student = load_file(tmp_path / "s1" / "unet.safetensors")
    assert any(not torch.equal(original[k], step1_student[k]) for k in original)
    assert yaml.safe_load((tmp_path / "s1" / "config.yaml").read_text())["sdd"]["export"] == "student"
    StableDiffusionPipeline.from_pretrained(tmp_path / "s1" / "pipeline")


def test_lora_export_reloads_into_a_pipeline_and_changes_its_output(train_sdd, tiny_args, tmp_path):
    out = tmp_path / "run"
    # a large LR so that two steps move the adapters visibly; the teacher decays fast enough to follow
    train_sdd.main(tiny_args("finetune=lora", "train.lr=5e-2", "sdd.ema_decay=0.0", "lora.rank=2",
                             "lora.alpha=4"))
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in k for k in lora)

    base = StableDiffusionPipeline.from_pretrained(out / "pipeline")  # merged export
    from sdd.models import build_tiny_sd

    tiny = build_tiny_sd()
    plain = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    before = pipe_image(plain)
    plain.load_lora_weights(str(out / "lora"))
    after = pipe_image(plain)
    assert abs(after - before).max() > 1e-3  # the LoRA changes the output
    merged = pipe_image(base)
    assert abs(after - merged).max() < 1e-4  # and the merged export is the same model
