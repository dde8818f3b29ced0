"""Every exact speed/memory switch gives the default step's loss, gradients and EMA update (fp32, round-off), the
reference loop's choices (``sdd.speed.REFERENCE_PERF``) included; the precision switch stays within bf16
tolerance."""

import pytest
import torch

from sdd.loop import step_generator
from sdd.methods.registry import entry
from sdd.perf import frozen_copy, make_optimizer
from sdd.speed import REFERENCE_PERF, Case, make_config


def one_step(case: Case):
    cfg = make_config(case)
    method = entry(case.method).method(cfg, "cpu")
    params = {n: p for n, p in method.model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(list(params.values()), cfg.train)
    draws = method.draw(0, step_generator(7, 0, 0))
    loss, _ = method.compute_loss(method.model, 0, step_generator(7, 0, 0))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    optimizer.step()
    if hasattr(method, "after_optimizer_step"):
        method.after_optimizer_step()
    shadow = method.teacher if case.method == "sdd" else method.frozen
    twin = dict(shadow.named_parameters())
    after = {n: twin[n].detach().clone() for n in params}
    return float(loss), grads, after, draws


SWITCHES = [
    REFERENCE_PERF,  # the original code's choices: prompts re-encoded, EMA loop over all, a full second UNet, ...
    {"student_passes": "batched"},
    {"channels_last": True},
    {"gradient_checkpointing": True},
    {"attention": "eager"},
    {"share_frozen": False},
    {"cache_text_embeddings": False},
    {"ema": "loop"},
    {"frozen_passes": "separate"},
]


@pytest.mark.parametrize("method", ["sdd", "esd"])
def test_exact_switches_match_the_default_step(method):
    common = dict(method=method, preset="tiny", batch_size=3, ddim_steps=6, finetune="xattn")
    ref_loss, ref_grads, ref_after, draws = one_step(Case(name="defaults", **common))
    assert draws[1].tolist() != [draws[1][0].item()] * 3  # the batch mixes different k: one batched pass each
    for perf in SWITCHES:
        if method == "esd" and perf in ({"ema": "loop"},):
            continue  # ESD has no EMA
        if method == "sdd" and perf == {"frozen_passes": "separate"}:
            continue  # an ESD switch
        loss, grads, after, _ = one_step(Case(name=str(perf), perf=perf, **common))
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-9), perf
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=f"{perf} {name}")
            torch.testing.assert_close(after[name], ref_after[name], rtol=1e-5, atol=1e-7, msg=f"{perf} {name}")


def test_bf16_sampling_stays_within_bf16_tolerance():
    common = dict(method="sdd", preset="tiny", batch_size=2, ddim_steps=6, finetune="xattn")
    ref_loss, ref_grads, _, _ = one_step(Case(name="defaults", **common))
    loss, grads, _, _ = one_step(Case(name="bf16", perf={"teacher_precision": "bf16"}, **common))
    assert loss == pytest.approx(ref_loss, rel=5e-2)
    flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.99
    assert loss != ref_loss  # it really ran in bf16


def test_shared_frozen_tensors_are_shared_and_trainable_ones_are_not():
    unet = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    unet[0].requires_grad_(False)
    twin = frozen_copy(unet, share_frozen=True)
    assert twin[0].weight is unet[0].weight  # one tensor for both: no second copy in memory
    assert twin[1].weight is not unet[1].weight and torch.equal(twin[1].weight, unet[1].weight)
    assert not twin[1].weight.requires_grad and unet[1].weight.requires_grad
    separate = frozen_copy(unet, share_frozen=False)
    assert separate[0].weight is not unet[0].weight


def test_compiled_unets_give_the_reference_step():
    """torch.compile (inductor kernels, fused) is exact too: same loss, gradients and EMA update to round-off.
    About 1.5 minutes on 2 cores: most of it compiling the UNet's sampling, forward and backward graphs."""
    from torch._dynamo.utils import counters

    common = dict(method="sdd", preset="tiny", batch_size=3, ddim_steps=6, finetune="xattn")
    ref_loss, ref_grads, ref_after, _ = one_step(Case(name="defaults", **common))
    torch._dynamo.reset()
    counters.clear()
    loss, grads, after, _ = one_step(Case(name="compile", perf={"compile": True}, **common))
    assert counters["stats"]["unique_graphs"] > 0, "perf.compile ran the UNets uncompiled"
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-9)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(after[name], ref_after[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("share_frozen", [True, False])
def test_loop_ema_leaves_every_frozen_tensor_of_the_export_bit_identical(train_sdd, tiny_args, tmp_path,
                                                                          share_frozen):
    """perf.ema=loop walks every parameter, frozen ones included: with shared frozen tensors it must not scale
    the student's own weights (it did: by m(2 - m) per step), and an unshared copy must stay equal bit for bit."""
    from safetensors.torch import load_file

    from sdd.models import load_components

    train_sdd.main(tiny_args("perf.ema=loop", f"perf.share_frozen={str(share_frozen).lower()}", "train.steps=3",
                             "sdd.ema_decay=0.5", "train.lr=1e-2"))
    exported = load_file(tmp_path / "run" / "unet.safetensors")  # the EMA teacher
    base = load_components("tiny").unet.state_dict()
    frozen = [k for k in base if "attn2" not in k]
    assert frozen and all(torch.equal(exported[k], base[k]) for k in frozen), \
        [k for k in frozen if not torch.equal(exported[k], base[k])][:3]
    assert any(not torch.equal(exported[k], base[k]) for k in base if "attn2" in k)  # the trained ones moved
