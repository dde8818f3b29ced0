"""Trainable-parameter sets: after two SDD steps the chosen parameters changed and every other one is bit-identical."""

import pytest
import torch

from sdd.config import load_config
from sdd.loop import fit, make_accelerator
from sdd.methods.sdd import SDDConfig, SDDMethod
from sdd.models import build_tiny_sd
from sdd.params import SELECTORS, configure_trainable


def run_two_steps(tiny_args, finetune):
    args = tiny_args(f"finetune={finetune}")
    cfg = load_config(SDDConfig, args[1], args[2:])  # args: --config FILE overrides...
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    method = SDDMethod(cfg, accelerator.device)
    fit(accelerator, method, cfg)
    return method


EXPECTED = {
    "xattn": lambda n: "attn2" in n,
    "noxattn": lambda n: "attn2" not in n and not n.startswith(("time_embedding", "conv_out")),
    "selfattn": lambda n: "attn1" in n,
    "full": lambda n: True,
}


@pytest.mark.parametrize("finetune", ["xattn", "noxattn", "selfattn", "full", "lora"])
def test_only_the_chosen_parameters_change(tiny_args, finetune):
    before = {k: v.clone() for k, v in build_tiny_sd().unet.state_dict().items()}
    method = run_two_steps(tiny_args, finetune)
    student = dict(method.model.named_parameters())
    trainable = set(method.trainable_names)
    assert trainable == {n for n, p in student.items() if p.requires_grad}

    if finetune == "lora":
        assert trainable and all("lora_" in n for n in trainable)
        assert all(any(t in n for t in ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out")) for n in trainable)
        for name, p in student.items():
            if name in trainable:
                continue
            base = name.replace(".base_layer", "")
            assert torch.equal(p, before[base]), f"frozen {name} changed"
        lora_B = [p for n, p in student.items() if "lora_B" in n]
        assert all(p.abs().sum() > 0 for p in lora_B)  # B starts at zero, so nonzero means trained
        return

    expected = {n for n in before if EXPECTED[finetune](n)}
    assert trainable == expected
    for name, p in student.items():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    # the EMA teacher moved on the same set and equals the student everywhere else
    for name, p in method.teacher.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name])


def test_noxattn_keeps_time_embedding_and_output_conv_frozen():
    unet = build_tiny_sd().unet
    names = configure_trainable(unet, "noxattn")
    assert "conv_in.weight" in names
    assert not any(n.startswith(("time_embedding", "conv_out")) or "attn2" in n for n in names)
    assert any(n.startswith("conv_norm_out") for n in names)
    assert set(SELECTORS) | {"lora"} == {"xattn", "noxattn", "selfattn", "full", "lora"}
