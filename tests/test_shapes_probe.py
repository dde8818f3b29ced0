"""sdd-shapes probe: the one-step x0 probes on the shipped UNet model (which takes the shape from the text at high
noise and from the latent at low noise), the SNR match between a VP and a flow model, and a shapes-base
checkpoint's live weights."""

import pytest
import torch
from conftest import ROOT

from sdd import api
from sdd.errors import UserError
from sdd.loop import fit, make_accelerator
from sdd.methods import shapes_base
from sdd.models import SHAPES_MODEL_DIR, load_components
from sdd.shapes import probe


def test_the_unet_model_follows_a_wrong_shape_word_at_high_noise_and_the_latent_at_low():
    rows = {r.sigma: r for r in probe.run(load_components("shapes"), sigmas=(0.85, 0.5), n=24)}
    high, low = rows[0.85], rows[0.5]
    assert high.shape_followed >= 0.6 and high.shape_difference > 0.1  # measured 0.81, 0.16 on 36 scenes
    assert low.shape_own >= 0.8 and low.shape_followed <= 0.2  # the latent shows its shape by then
    assert high.colour_difference > high.shape_difference > 0


def test_noise_levels_match_in_snr_between_a_vp_and_a_flow_model():
    unet = load_components("shapes")
    z0, eps = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    x_t, t = probe.noised(unet, z0, eps, 0.85)
    a2 = float(unet.prediction.alphas_cumprod[int(t)])
    assert a2 / (1 - a2) == pytest.approx((0.15 / 0.85) ** 2, rel=0.05)  # the nearest of 1000 timesteps
    assert torch.allclose(x_t, torch.full_like(z0, a2**0.5))
    flow = load_components("tiny-sd3")
    x_s, s = probe.noised(flow, z0, eps + 1, 0.25)
    assert s == 250.0 and torch.allclose(x_s, torch.ones_like(z0))  # 0.75 * 1 + 0.25 * 1


def test_a_checkpoint_is_probed_with_its_live_weights(tmp_path):
    out = tmp_path / "run"
    cfg = api.run_config(str(ROOT / "configs/shapes/base_sd3.yaml"), [
        f"output_dir={out}", f"vae_path={SHAPES_MODEL_DIR}/vae", "flow.num_layers=2", "flow.num_attention_heads=2",
        "flow.attention_head_dim=8", "flow.text_layers=1", "train.batch_size=2", "train.steps=1",
        "train.lr_warmup_steps=0", "train.checkpoint_every=1", "tracking.tracker=none", "tracking.sample_every=0"])
    method = shapes_base.ShapesDiffusionMethod(cfg)
    fit(make_accelerator(cfg.train, cfg.tracking, cfg.output_dir), method, cfg)
    loaded = probe.load_checkpoint(str(out / "checkpoints" / "step-000001"))
    for (n, p), q in zip(method.base.unet.named_parameters(), loaded.unet.parameters()):
        assert torch.equal(p, q), n  # the live weights, not the EMA
    assert not all(torch.equal(p, q) for p, q in zip(method.ema.transformer.parameters(), loaded.unet.parameters()))
    [row] = probe.run(loaded, sigmas=(0.85,), n=3)
    assert 0 <= row.shape_followed <= 1 and row.colour_difference >= 0
    with pytest.raises(UserError, match="not a shapes-base checkpoint"):
        probe.load_checkpoint(str(tmp_path))
