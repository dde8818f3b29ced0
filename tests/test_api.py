"""The Python API (``sdd.api``), as the README shows it: train, load, generate, benchmark, evaluate, export; and
``sdd-export`` on the run folder of every method that exports something."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script
from PIL import Image
from safetensors.torch import load_file
from test_hfi_autolabel import make_shapes_folder

from hfi.auto_feedback import autolabel
from sdd import api
from sdd.cli.export import main as export_main
from sdd.errors import UserError
from sdd.shapes.oracle import ShapesOracle

TINY_SDD = ["train.steps=2", "train.checkpoint_every=0", "sdd.ddim_steps=4", "tracking.num_inference_steps=2"]


@pytest.fixture(scope="module")
def sdd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "sdd"
    result = api.train(str(ROOT / "configs/sdd/tiny.yaml"), f"output_dir={out}", *TINY_SDD)
    return out, result


def test_train_from_a_yaml_names_its_method_and_returns_the_run(sdd_run):
    out, result = sdd_run
    assert result.output_dir == str(out) and result.steps == 2 and result.main_process
    assert result.exports["pipeline"] == str(out / "pipeline")
    assert json.loads((out / "train_summary.json").read_text())["exports"] == result.exports


def test_train_twice_in_one_session_with_other_precision(tmp_path):
    """A notebook trains again with other accelerate settings: the first run's must not stick."""
    api.train(str(ROOT / "configs/sdd/tiny.yaml"), f"output_dir={tmp_path / 'a'}", *TINY_SDD)
    result = api.train(str(ROOT / "configs/sdd/tiny.yaml"), f"output_dir={tmp_path / 'b'}", *TINY_SDD,
                       "train.mixed_precision=bf16", "train.gradient_accumulation_steps=2")
    assert result.steps == 2 and np.isfinite(result.final_loss)


def test_train_takes_a_config_object_or_a_method_name(tmp_path):
    from sdd.config import load_config
    from sdd.methods.esd import ESDConfig

    cfg = load_config(ESDConfig, str(ROOT / "configs/esd/tiny.yaml"), [f"output_dir={tmp_path / 'esd'}"])
    result = api.train(cfg, "train.steps=1", "esd.ddim_steps=3", "tracking.num_inference_steps=1")
    assert result.steps == 1 and (tmp_path / "esd" / "pipeline").is_dir()
    with pytest.raises(UserError, match="unknown method 'nope'"):
        api.train(None, method="nope")


def test_load_pipeline_of_a_run_generates_what_generate_gives(sdd_run):
    out, _ = sdd_run
    pipe = api.load_pipeline(out)
    direct = pipe("a photo of a cat", num_inference_steps=3, guidance_scale=7.5,
                  latents=None, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert direct.shape == (32, 32, 3)
    images = api.generate(out, ["a photo of a cat", "a dog"], seed=5, num_inference_steps=3)
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    again = api.generate(out, ["a photo of a cat", "a dog"], seed=5, num_inference_steps=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))  # seeds reach it


def test_generate_into_a_folder_and_with_a_baseline(tmp_path):
    summary = api.generate("tiny", ["a photo of a cat"], out=tmp_path / "imgs", method="sld-max", concept="cat",
                           images_per_prompt=2, num_inference_steps=2)
    assert summary["images"] == 2 and summary["method"] == "sld-max"
    rows = [json.loads(line) for line in (tmp_path / "imgs" / "metadata.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1] and rows[0]["method_settings"]["safety_concept"] == "cat"


def test_benchmark_runs_the_shapes_bench(tmp_path):
    report = api.benchmark({"base": "shapes"}, "red", out=tmp_path / "bench", n=4, n_retention=4,
                           num_inference_steps=3)
    [row] = report["rows"]
    assert row["label"] == "base" and set(row["metrics"]) >= {"erased_rate", "bare_rate", "retention_colour"}
    assert (tmp_path / "bench" / "bench.json").is_file() and (tmp_path / "bench" / "grid.png").is_file()
    with pytest.raises(UserError, match="--concept"):
        api.benchmark(["shapes"], "purple", n=1, n_retention=1)


def test_evaluate_a_config_with_overrides(sdd_run, tmp_path):
    out, _ = sdd_run
    report = api.evaluate(str(ROOT / "configs/eval/tiny.yaml"), f"out={tmp_path / 'eval'}",
                          f"paths.sdd={out / 'pipeline'}", "suites=[nudity]", "nudity.limit=2",
                          "generation.num_inference_steps=2", progress=False)
    assert [e["label"] for e in report["entries"]] == ["SD", "SDD", "SLD-max"]
    assert (tmp_path / "eval" / "report.md").is_file()


# --- sdd-export on every method that exports ------------------------------------------------------------------


def test_export_sdd_and_esd_runs(sdd_run, tmp_path):
    out, _ = sdd_run
    written = api.export(out, "sdd.export=student", out=tmp_path / "student")
    assert set(written) == {"pipeline", "unet", "config", "card"}
    esd = tmp_path / "esd"
    api.train(str(ROOT / "configs/esd/tiny.yaml"), f"output_dir={esd}", "train.steps=1", "esd.ddim_steps=3",
              "tracking.num_inference_steps=1")
    original = load_file(esd / "unet.safetensors")
    export_main([str(esd), "--out", str(tmp_path / "esd-again")])
    again = load_file(tmp_path / "esd-again" / "unet.safetensors")
    assert all(torch.equal(original[k], again[k]) for k in original)


@pytest.fixture(scope="module")
def feedback(tmp_path_factory):
    root = tmp_path_factory.mktemp("feedback")
    images, _ = make_shapes_folder(root / "images", n=24)
    autolabel(images, str(root / "fb"), ShapesOracle("red"), concept="red", noise=0.0)
    return root


def test_export_reward_and_hfi_runs(feedback, tmp_path):
    reward = tmp_path / "reward"
    load_script("train_reward").main([
        "--config", str(ROOT / "configs/reward/tiny.yaml"), f"feedback.images={feedback / 'images'}",
        f"feedback.dir={feedback / 'fb'}", f"output_dir={reward}", "train.steps=5",
    ])
    written = export_main([str(reward), "--out", str(tmp_path / "reward-again")])
    assert written == {"reward": str(tmp_path / "reward-again" / "reward")}
    assert json.loads((tmp_path / "reward-again/reward/reward.json").read_text())["mlp"] == \
        json.loads((reward / "reward/reward.json").read_text())["mlp"]

    token = tmp_path / "hfi"
    load_script("train_hfi").main([
        "--config", str(ROOT / "configs/hfi/tiny.yaml"), f"images={feedback / 'images'}", f"reward={reward}",
        f"output_dir={token}", "train.steps=2", "train.batch_size=2", "tracking.num_inference_steps=1",
        "hfi.weighting=minmax",
    ])
    written = export_main([str(token), "--out", str(tmp_path / "hfi-again")])
    assert set(written) == {"learned_embeds", "image_weights", "card"}
    first = load_file(token / "learned_embeds.safetensors")
    again = load_file(tmp_path / "hfi-again/learned_embeds.safetensors")
    [name] = first
    assert torch.equal(first[name], again[name])
    pipe = api.load_pipeline(token)  # an HFI run: the base model with its token
    assert name in pipe.tokenizer.get_vocab()


def test_export_shapes_base_run(tmp_path):
    out = tmp_path / "base"
    result = api.train(str(ROOT / "configs/shapes/base.yaml"), f"output_dir={out}", "vae.steps=2",
                       "vae.batch_size=4", "train.steps=2", "train.batch_size=4", "train.lr_warmup_steps=0",
                       "train.checkpoint_every=0", "tracking.tracker=none", "tracking.num_inference_steps=1",
                       "tracking.validation_prompts=[red]")
    assert result.steps == 2 and (out / "vae" / "vae").is_dir() and (out / "pipeline").is_dir()
    written = export_main([str(out), "--out", str(tmp_path / "again")])
    assert {"pipeline", "unet"} <= set(written)
    image = api.generate(tmp_path / "again", ["a red circle"], num_inference_steps=2)[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    assert os.path.isfile(tmp_path / "again" / "unet.safetensors")
