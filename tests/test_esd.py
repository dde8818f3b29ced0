"""ESD on the shared loop: the target by hand, the esd-x / esd-u parameter sets, export that reloads."""

import pytest
import torch
from conftest import ROOT, load_script
from diffusers import StableDiffusionPipeline

from sdd.config import load_config
from sdd.loop import fit, make_accelerator
from sdd.methods.esd import ESDConfig, ESDMethod, esd_loss, esd_target
from sdd.models import build_tiny_sd


def test_esd_target_by_hand():
    eps_u = torch.tensor([1.0, -2.0])
    eps_c = torch.tensor([3.0, 0.0])
    # eta = 1: 1 - (3 - 1) = -1 ; -2 - (0 + 2) = -4
    assert esd_target(eps_u, eps_c, 1.0).tolist() == [-1.0, -4.0]
    # eta = 3: 1 - 3 * 2 = -5 ; -2 - 3 * 2 = -8
    assert esd_target(eps_u, eps_c, 3.0).tolist() == [-5.0, -8.0]
    # eta = 0: the unconditional prediction itself (what SDD distils toward)
    assert esd_target(eps_u, eps_c, 0.0).tolist() == [1.0, -2.0]


def test_esd_loss_by_hand_and_no_gradient_into_the_target():
    eps = torch.tensor([0.0, 1.0], requires_grad=True)
    target = torch.tensor([2.0, 1.0], requires_grad=True)
    loss = esd_loss(eps, target)  # ((0-2)^2 + 0) / 2 = 2
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert eps.grad.tolist() == pytest.approx([-2.0, 0.0])
    assert target.grad is None


def run(tmp_path, finetune, steps=2):
    cfg = load_config(ESDConfig, str(ROOT / "configs/esd/tiny.yaml"), [
        f"output_dir={tmp_path / finetune}", f"finetune={finetune}", f"train.steps={steps}",
        "train.checkpoint_every=0", "esd.ddim_steps=4", "tracking.num_inference_steps=2",
    ])
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    method = ESDMethod(cfg, accelerator.device)
    fit(accelerator, method, cfg)
    return method


@pytest.mark.parametrize("finetune,selected", [
    ("esd-x", lambda n: "attn2" in n),
    ("esd-u", lambda n: "attn2" not in n and not n.startswith(("time_embedding", "conv_out"))),
])
def test_esd_variants_train_exactly_their_parameters_and_keep_the_frozen_copy(tmp_path, finetune, selected):
    before = {k: v.clone() for k, v in build_tiny_sd().unet.state_dict().items()}
    method = run(tmp_path, finetune)
    assert set(method.trainable_names) == {n for n in before if selected(n)}
    for name, p in method.model.named_parameters():
        assert torch.equal(p, before[name]) != (name in method.trainable_names), name
    for name, p in method.frozen.named_parameters():  # the targets' model never moves
        assert torch.equal(p, before[name]), name


def test_esd_script_exports_a_pipeline_that_generates(tmp_path):
    out = tmp_path / "run"
    result = load_script("train_esd").main([
        "--config", str(ROOT / "configs/esd/tiny.yaml"), f"output_dir={out}", "train.steps=3",
        "train.checkpoint_every=0", "esd.ddim_steps=4", "tracking.num_inference_steps=2",
    ])
    assert result.steps == 3
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    image = pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3)
    assert "ESD (esd-x, eta=1)" in (out / "README.md").read_text()
