"""Robust SDD (``sdd.adversarial``): the substituted embedding is exact, the inner attack does what its loss says,
the adversarial term joins the loss, a resumed run is the same run, and the export holds no adversarial token."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sdd.config import load_config
from sdd.errors import ConfigError
from sdd.loop import step_generator
from sdd.methods.sdd import SDDConfig, SDDMethod
from sdd.models import build_tiny_sd
from sdd.textual_inversion import substituted_embeddings

ADV = ["sdd.adversarial.every=1", "sdd.adversarial.steps=5", "sdd.adversarial.lr=0.05",
       'sdd.adversarial.templates=["{}", "a photo of {}"]']


def test_a_substituted_embedding_encodes_as_a_real_row_would():
    tiny = build_tiny_sd()
    tok, enc = tiny.tokenizer, tiny.text_encoder
    vector = torch.randn(enc.config.hidden_size)
    ids = tok(["a photo of dog"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    dog = tok("dog", add_special_tokens=False).input_ids[0]
    with substituted_embeddings(enc, {dog: vector}):
        swapped = enc(ids)[0]
    with torch.no_grad():
        enc.get_input_embeddings().weight[dog] = vector
    assert torch.allclose(swapped, enc(ids)[0], atol=1e-6)
    # an id beyond the table (a token of a tokenizer copy only) works the same
    beyond = enc.get_input_embeddings().weight.shape[0] + 3
    with substituted_embeddings(enc, {beyond: vector}):
        far = enc(torch.where(ids == dog, beyond, ids))[0]
    assert torch.allclose(far, swapped, atol=1e-6)


def build(tiny_args, *extra):
    args = tiny_args(*ADV, *extra)
    return SDDMethod(load_config(SDDConfig, args[1], args[2:]))


def test_the_inner_attack_lowers_its_own_loss_and_the_term_joins_the_loss(tiny_args):
    method = build(tiny_args, "train.batch_size=2")
    z_T, k, idx = method.draw(0, step_generator(0, 0, 0))
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, z_T, k, idx)
    c_concept = method.conditioning(idx)[1]
    adversary = method.adversary
    start = adversary.vector.clone()
    with torch.no_grad():
        target = method.original(z_t, t, encoder_hidden_states=c_concept).sample

        def attack_loss(v):
            c = adversary.encode(v)[torch.arange(2) % 2]
            return F.mse_loss(method.model(z_t, t, encoder_hidden_states=c).sample, target).item()

        before = attack_loss(start)
    adversary.attack(method.model, method.original, z_t, t, c_concept)
    assert not torch.equal(adversary.vector, start) and attack_loss(adversary.vector) < before

    # the loss of a micro-step: SDD's term + the adversarial term on c(v*) (loss_attack logged)
    loss, logs = method.compute_loss(method.model, 0, step_generator(0, 0, 0))
    assert {"loss_attack", "loss_adversarial"} <= set(logs)
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, *method.draw(0, step_generator(0, 0, 0)))
    with torch.no_grad():
        erase = method.student_loss(method.model, z_t, t, c_uncond, c_s)
        c_adv, c_rest = method.adversary.conditioning(2, 0)
        adv = method.student_loss(method.model, z_t, t, c_rest, c_adv)  # "a photo of {}" -> "a photo of"
    assert loss.item() == pytest.approx(erase.item() + adv.item(), rel=1e-5)


def test_the_radius_keeps_the_attack_vector_within_its_ball_of_the_vocabulary_norms(tiny_args):
    """adversarial.radius r: after every inner step v* is projected into the ball of r times the largest vocabulary
    row's norm; the same attack unbounded leaves it, and inside the ball the projection changes nothing."""
    runs = {}
    for radius in (None, 1.0, 1000.0):
        method = build(tiny_args, "train.batch_size=2", "sdd.adversarial.lr=1.0",
                       *([] if radius is None else [f"sdd.adversarial.radius={radius}"]))
        z_t, t, _, _ = method.sample_latents(method.model, *method.draw(0, step_generator(0, 0, 0)))
        c_concept = method.conditioning(torch.zeros(2, dtype=torch.long))[1]
        method.adversary.attack(method.model, method.original, z_t, t, c_concept)
        runs[radius] = method.adversary.vector
    largest = build_tiny_sd().text_encoder.get_input_embeddings().weight.norm(dim=1).max().item()
    assert runs[None].norm().item() > 1.5 * largest  # lr 1 for 5 Adam steps: far off the vocabulary
    assert runs[1.0].norm().item() == pytest.approx(largest, rel=1e-5)
    assert torch.equal(runs[1000.0], runs[None])


def test_a_radius_that_is_not_positive_is_one_clear_error(tiny_args):
    with pytest.raises(ConfigError, match="sdd.adversarial.radius: must be > 0, got 0.0"):
        build(tiny_args, "sdd.adversarial.radius=0")


def test_with_negative_guidance_the_adversarial_conditioning_is_sent_past_its_target_too(tiny_args):
    """c(v*) is sent where the concept's conditioning is: with sdd.negative_guidance = eta, to its template without
    the token minus eta times the original's concept direction on those latents (the concept's own step away)."""
    method = build(tiny_args, "train.batch_size=2", "sdd.negative_guidance=1.5")
    loss, logs = method.compute_loss(method.model, 0, step_generator(0, 0, 0))  # the attack runs here
    z_T, k, idx = method.draw(0, step_generator(0, 0, 0))
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, z_T, k, idx)
    c_rest = method.target_conditioning(idx)
    with torch.no_grad():
        away = 1.5 * (method.original(z_t, t, encoder_hidden_states=c_s).sample
                      - method.original(z_t, t, encoder_hidden_states=c_rest.expand(2, -1, -1)).sample)
        assert away.abs().max() > 0
        erase = method.student_loss(method.model, z_t, t, c_rest, c_s, away)
        c_adv, c_adv_rest = method.adversary.conditioning(2, 0)
        adv = method.student_loss(method.model, z_t, t, c_adv_rest, c_adv, away)
        without = method.student_loss(method.model, z_t, t, c_adv_rest, c_adv)
    assert adv.item() != pytest.approx(without.item(), rel=1e-3)
    assert float(logs["loss_adversarial"]) == pytest.approx(adv.item(), rel=1e-5)
    assert loss.item() == pytest.approx(erase.item() + adv.item(), rel=1e-5)


def test_the_gate_keeps_the_term_only_where_the_attack_brings_the_concept_back(tiny_args, monkeypatch):
    method = build(tiny_args, "train.batch_size=2", "sdd.adversarial.gate=true")
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, *method.draw(0, step_generator(0, 0, 0)))
    c_concept = method.conditioning(torch.zeros(2, dtype=torch.long))[1]
    c_rest = c_uncond.expand(2, -1, -1)
    # before training the student is the original: the concept's own conditioning is at distance 0 (a hit), the
    # template without it is farther (a miss), and a conditioning no closer than the template is a miss
    assert method.adversary.succeeded(method.model, method.original, z_t, t, c_concept, c_rest, c_concept).all()
    assert not method.adversary.succeeded(method.model, method.original, z_t, t, c_rest, c_rest, c_concept).any()

    def loss_with(mask):
        monkeypatch.setattr(method.adversary, "succeeded", lambda *a: torch.tensor(mask))
        return method.compute_loss(method.model, 0, step_generator(0, 0, 0))

    loss, logs = loss_with([True, False])  # the inner attack runs here (every step)
    with torch.no_grad():
        erase = method.student_loss(method.model, z_t, t, c_uncond, c_s)
        c_adv, c_rest = method.adversary.conditioning(2, 0)  # the vector the attack found
        on_first = method.student_loss(method.model, z_t[:1], t[:1], c_rest[:1], c_adv[:1])
    assert float(logs["adversarial_gate"]) == 0.5
    assert loss.item() == pytest.approx(erase.item() + 0.5 * on_first.item(), rel=1e-5)
    loss, logs = loss_with([False, False])
    assert float(logs["adversarial_gate"]) == 0.0 and float(logs["loss_adversarial"]) == 0.0
    assert loss.item() == pytest.approx(erase.item(), rel=1e-6)


def test_resume_is_the_same_run_and_the_export_has_no_adversarial_token(train_sdd, tiny_args, tmp_path, monkeypatch):
    args = [*ADV, "train.steps=4", "train.checkpoint_every=2"]
    train_sdd.main(tiny_args(*args, out=tmp_path / "straight"))

    calls = {"n": 0}
    original = SDDMethod.after_optimizer_step

    def crash_at_step_3(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(SDDMethod, "after_optimizer_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_sdd.main(tiny_args(*args, out=tmp_path / "resumed"))
    monkeypatch.setattr(SDDMethod, "after_optimizer_step", original)
    train_sdd.main([*tiny_args(*args, out=tmp_path / "resumed"), "--resume"])
    final = {run: {**load_file(tmp_path / run / "checkpoints/step-000004/model.safetensors"),
                   **load_file(tmp_path / run / "checkpoints/step-000004/method_state.safetensors")}
             for run in ("straight", "resumed")}
    assert "adversarial.embedding" in final["straight"]
    assert all(torch.equal(final["straight"][k], final["resumed"][k]) for k in final["straight"])

    from transformers import CLIPTokenizer

    exported = CLIPTokenizer.from_pretrained(tmp_path / "straight" / "pipeline" / "tokenizer")
    assert len(exported) == len(build_tiny_sd().tokenizer) and "<adversarial>" not in exported.get_vocab()
