"""SalUn on the shared loop: the mask and the losses by hand, only salient weights move, the run exports a pipeline
that reloads, a resumed run keeps its mask and continues bit-identically, bad input is one line."""

import json
import os

import pytest
import torch
from conftest import ROOT
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdd import api
from sdd.config import load_config
from sdd.errors import ConfigError, UserError
from sdd.loop import fit, make_accelerator
from sdd.methods.salun import (
    SalUnConfig,
    SalUnMethod,
    cfg_prediction,
    forget_loss,
    saliency_loss,
    saliency_mask,
    salun_loss,
)

TINY = str(ROOT / "configs/salun/tiny.yaml")


# --- the math by hand ----------------------------------------------------------------------------------------


def test_mask_ranks_all_tensors_together():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.5, 0.2]]), "b": torch.tensor([0.8, 0.3, 0.7, 0.6])}
    # N = 8, fraction 0.5 -> the 4 largest of all: 0.9 (a), 0.8, 0.7, 0.6 (b); a per-tensor top half would take
    # 0.5 of a instead of 0.6 of b
    mask = saliency_mask(scores, 0.5)
    assert mask["a"].tolist() == [[False, True], [False, False]]
    assert mask["b"].tolist() == [True, False, True, True]
    assert mask["a"].dtype == torch.bool and mask["a"].shape == (2, 2)
    # floor(8 * 0.3) = 2: 0.9 and 0.8; fraction 1: every element
    mask = saliency_mask(scores, 0.3)
    assert mask["a"].sum().item() == 1 and mask["b"].tolist() == [True, False, False, False]
    assert all(m.all() for m in saliency_mask(scores, 1.0).values())


def test_mask_ties_go_to_the_earlier_element():
    mask = saliency_mask({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([2.0, 2.0])}, 0.5)
    # k = 2 of three equal 2.0s: a[1] (first tensor), then b[0]
    assert mask["a"].tolist() == [False, True] and mask["b"].tolist() == [True, False]
    # a large block of equal scores: exactly the first k, so the mask does not depend on the sort's whims
    mask = saliency_mask({"x": torch.ones(5000), "y": torch.ones(5000)}, 0.1)
    assert mask["x"][:1000].all() and not mask["x"][1000:].any() and not mask["y"].any()


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_mask_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ConfigError, match=r"salun.mask_fraction.*\(0, 1\]"):
        saliency_mask({"a": torch.ones(4)}, fraction)
    with pytest.raises(ConfigError, match=r"salun.mask_fraction.*\(0, 1\]") as err:
        load_config(SalUnConfig, TINY, [f"salun.mask_fraction={fraction}"])
    assert "\n" not in str(err.value)


def test_saliency_loss_by_hand():
    eps_c, eps_u = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    # w = 2: 3 * [1, 2] - 2 * [0, 4] = [3, -2]
    prediction = cfg_prediction(eps_c, eps_u, 2.0)
    assert prediction.tolist() == [3.0, -2.0]
    # -((1 - 3)^2 + (1 + 2)^2) / 2 = -6.5
    assert saliency_loss(prediction, torch.tensor([1.0, 1.0])).item() == pytest.approx(-6.5)
    # w = 0: the conditional prediction itself
    assert cfg_prediction(eps_c, eps_u, 0.0).tolist() == [1.0, 2.0]


def test_forget_loss_by_hand_and_no_gradient_into_the_pseudo_prediction():
    eps_forget = torch.tensor([1.0, 3.0], requires_grad=True)
    eps_pseudo = torch.tensor([0.0, 1.0], requires_grad=True)
    loss = forget_loss(eps_forget, eps_pseudo)  # ((1 - 0)^2 + (3 - 1)^2) / 2 = 2.5
    assert loss.item() == pytest.approx(2.5)
    total = salun_loss(loss, torch.tensor(3.0), 0.1)  # 2.5 + 0.1 * 3
    assert total.item() == pytest.approx(2.8)
    total.backward()
    assert eps_forget.grad.tolist() == pytest.approx([1.0, 2.0])  # 2 * (1, 2) / 2
    assert eps_pseudo.grad is None


# --- the method on the tiny model ----------------------------------------------------------------------------


def tiny_cfg(out, *overrides):
    return load_config(SalUnConfig, TINY, [f"output_dir={out}", "train.checkpoint_every=0",
                                           "tracking.num_inference_steps=2", *overrides])


@pytest.mark.parametrize("finetune", ["full", "xattn"])
def test_only_salient_elements_move(tmp_path, finetune):
    cfg = tiny_cfg(tmp_path / "run", "train.steps=2", f"finetune={finetune}", "salun.mask_fraction=0.3")
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    method = SalUnMethod(cfg, accelerator.device)
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    mask = {n: m.clone() for n, m in method.mask.items()}
    assert set(mask) == set(method.trainable_names)
    total = sum(m.numel() for m in mask.values())
    assert method.salient == sum(m.sum().item() for m in mask.values()) == int(total * 0.3)
    fit(accelerator, method, cfg)
    for name, p in method.model.named_parameters():
        changed = p.detach() != before[name]
        if name not in mask:
            assert not changed.any(), name  # outside the trained set
            continue
        assert not changed[~mask[name]].any(), name  # no non-salient element moved
        assert torch.equal(changed, mask[name]), name  # and every salient one did (Adam: ~lr per element)


def test_weight_decay_and_lora_are_refused():
    with pytest.raises(ConfigError, match="train.weight_decay.*non-salient"):
        load_config(SalUnConfig, TINY, ["train.weight_decay=0.01"])
    with pytest.raises(ConfigError, match="lora is not supported"):
        load_config(SalUnConfig, TINY, ["finetune=lora"])


def test_run_writes_the_sdd_layout_and_the_export_generates(tmp_path):
    out = tmp_path / "run"
    result = api.train(TINY, f"output_dir={out}", "train.steps=3", "train.checkpoint_every=2",
                       "tracking.num_inference_steps=2")
    assert result.steps == 3
    # SDD's files, and the generated forget/retain sets
    assert sorted(os.listdir(out)) == sorted(["README.md", "checkpoints", "config.yaml", "pipeline", "samples",
                                              "train_summary.json", "unet.safetensors", "data"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002", "step-000003"]
    assert sorted(os.listdir(out / "pipeline")) == sorted(
        ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"])
    forget = [json.loads(line) for line in (out / "data/forget/metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in forget] == ["a photo of a nude person"] * 4
    assert [r["seed"] for r in forget] == [200000, 200001, 200002, 200003]

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    image = pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0
    single = load_file(out / "unet.safetensors")
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(single[key], value), key
    # the checkpoint holds the mask; the export moved exactly where it is set
    mask = {k.removeprefix("mask."): v for k, v in load_file(out / "checkpoints/step-000003/method_state.safetensors")
            .items()}
    from sdd.models import build_tiny_sd

    original = build_tiny_sd().unet.state_dict()
    for key, value in single.items():
        assert not (value != original[key])[~mask[key]].any(), key
    summary = json.loads((out / "train_summary.json").read_text())
    total = sum(m.numel() for m in mask.values())
    assert summary["salun_mask"] == {"salient": total // 2, "trainable": total}
    assert "SalUn (full, top 50% salient, alpha=0.1)" in (out / "README.md").read_text()


def test_interrupted_run_resumes_with_its_mask_to_the_same_weights(tmp_path, monkeypatch):
    args = ["train.steps=6", "train.checkpoint_every=3", "train.gradient_accumulation_steps=2",
            "train.lr_scheduler=linear", "tracking.num_inference_steps=2"]
    api.train(TINY, f"output_dir={tmp_path / 'straight'}", *args)

    calls = {"n": 0}

    def crash_at_step_5(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed mid-run, after the step-3 checkpoint

    monkeypatch.setattr(SalUnMethod, "after_optimizer_step", crash_at_step_5, raising=False)
    with pytest.raises(KeyboardInterrupt):
        api.train(TINY, f"output_dir={tmp_path / 'resumed'}", *args)
    monkeypatch.delattr(SalUnMethod, "after_optimizer_step")
    data = tmp_path / "resumed" / "data" / "forget" / "images.json"
    stamp = data.stat().st_mtime_ns

    # the resumed run recomputes a different mask at start; the checkpoint's must replace it
    original = SalUnMethod.compute_mask
    monkeypatch.setattr(SalUnMethod, "compute_mask",
                        lambda self: {n: ~m for n, m in original(self).items()})
    result = api.train(TINY, f"output_dir={tmp_path / 'resumed'}", *args, "train.resume=latest")
    assert result.steps == 6
    assert data.stat().st_mtime_ns == stamp  # the generated sets were reused, not generated again

    def final(run):
        ckpt = tmp_path / run / "checkpoints" / "step-000006"
        return {**load_file(ckpt / "model.safetensors"), **load_file(ckpt / "method_state.safetensors")}

    straight, resumed = final("straight"), final("resumed")
    assert straight.keys() == resumed.keys() and any(k.startswith("mask.") for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_empty_forget_folder_is_one_line(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("")
    with pytest.raises(UserError, match="lists no images") as err:
        api.train(TINY, f"output_dir={tmp_path / 'run'}", f"forget.images={folder}")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "data").exists()  # refused before anything was generated


def test_forget_caption_without_a_pseudo_prompt_is_one_line(tmp_path):
    from PIL import Image

    folder = tmp_path / "forget"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "a red kite", "seed": 0}))
    with pytest.raises(UserError, match="'a red kite' is not one of forget.prompts") as err:
        api.train(TINY, f"output_dir={tmp_path / 'run'}", f"forget.images={folder}",
                  "forget.prompts=[a red circle,a red square]", "salun.pseudo_prompts=[a green circle,a green square]")
    assert "\n" not in str(err.value)
