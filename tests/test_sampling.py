"""The partial DDIM sampler: exactly k steps, the timestep of the latent it returns, per-latent k in one batch."""

import pytest
import torch
from diffusers import DDIMScheduler

from sdd.models import build_tiny_sd
from sdd.sampling import classifier_free_guidance, sample_to_k


class CountingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.timesteps = []
        self.batch_sizes = []

    def forward(self, z, t, encoder_hidden_states):
        self.timesteps.append(int(t))
        self.batch_sizes.append(z.shape[0])
        return self.unet(z, t, encoder_hidden_states=encoder_hidden_states)


@pytest.fixture(scope="module")
def setup():
    tiny = build_tiny_sd()
    scheduler = DDIMScheduler.from_config(tiny.scheduler.config)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    c_cond = torch.randn(1, 77, 32, generator=g)
    c_uncond = torch.randn(1, 77, 32, generator=g)
    z_T = torch.randn(3, 4, 16, 16, generator=g)
    return tiny.unet, scheduler, z_T, c_cond, c_uncond


def reference(unet, scheduler, z, c_cond, c_uncond, s, k):
    """The textbook loop: k CFG-DDIM steps, one latent at a time."""
    for t in scheduler.timesteps[:k]:
        e_u = unet(z, t, encoder_hidden_states=c_uncond).sample
        e_c = unet(z, t, encoder_hidden_states=c_cond).sample
        z = scheduler.step(e_u + s * (e_c - e_u), t, z).prev_sample
    return z


def test_grid_is_the_sd_leading_grid(setup):
    _, scheduler, *_ = setup
    # 1000 training steps, 10 inference steps, steps_offset 1: 901, 801, ..., 1
    assert scheduler.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_stops_after_exactly_k_steps_and_returns_the_timestep_of_its_latent(setup, k):
    unet, scheduler, z_T, c_cond, c_uncond = setup
    counting = CountingUNet(unet)
    z, t = sample_to_k(counting, scheduler, z_T[:1], c_cond, c_uncond, 3.0, torch.tensor([k]))
    assert len(counting.timesteps) == k  # one batched (uncond, cond) forward per step
    assert counting.timesteps == scheduler.timesteps[:k].tolist()
    assert t.tolist() == [scheduler.timesteps[k].item()]  # k = 0: z_T itself at the noisiest grid point
    expected = reference(unet, scheduler, z_T[:1], c_cond, c_uncond, 3.0, k)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4)
    if k == 0:
        assert torch.equal(z, z_T[:1])


def test_each_latent_of_a_batch_stops_at_its_own_k(setup):
    unet, scheduler, z_T, c_cond, c_uncond = setup
    k = torch.tensor([3, 0, 6])
    counting = CountingUNet(unet)
    z, t = sample_to_k(counting, scheduler, z_T, c_cond, c_uncond, 3.0, k)
    assert len(counting.timesteps) == 6  # the batch runs until the largest k
    # (uncond, cond) pairs of the latents still moving: 2 latents for 3 steps, then 1 for 3 more
    assert counting.batch_sizes == [4, 4, 4, 2, 2, 2]
    assert t.tolist() == [scheduler.timesteps[i].item() for i in k.tolist()]
    for b, kb in enumerate(k.tolist()):
        expected = reference(unet, scheduler, z_T[b : b + 1], c_cond, c_uncond, 3.0, kb)
        torch.testing.assert_close(z[b : b + 1], expected, atol=1e-5, rtol=1e-4)


def test_rejects_k_outside_the_grid(setup):
    unet, scheduler, z_T, c_cond, c_uncond = setup
    with pytest.raises(ValueError, match="k must lie in"):
        sample_to_k(unet, scheduler, z_T[:1], c_cond, c_uncond, 3.0, torch.tensor([10]))


def test_cfg_by_hand():
    # 1 + 2.5 * 2
    assert classifier_free_guidance(torch.tensor([1.0]), torch.tensor([3.0]), 2.5).item() == pytest.approx(6.0)


def test_one_trajectory_yields_its_latent_after_each_of_its_k(setup):
    unet, scheduler, z_T, c_cond, c_uncond = setup
    k = torch.tensor([[3, 0], [1, 5]])  # two trajectories, two latents each
    counting = CountingUNet(unet)
    z, t = sample_to_k(counting, scheduler, z_T[:2], c_cond, c_uncond, 3.0, k)
    # each trajectory runs once, to its largest k: both for 3 steps, then the second alone for 2 more
    assert counting.batch_sizes == [4, 4, 4, 2, 2]
    assert z.shape == (4, 4, 16, 16)
    assert t.tolist() == [scheduler.timesteps[i].item() for i in (3, 0, 1, 5)]
    for j, (b, kb) in enumerate([(0, 3), (0, 0), (1, 1), (1, 5)]):
        expected = reference(unet, scheduler, z_T[b : b + 1], c_cond, c_uncond, 3.0, kb)
        torch.testing.assert_close(z[j : j + 1], expected, atol=1e-5, rtol=1e-4)
    # one latent per trajectory, as (B, 1), is the paper's sampler exactly
    k1 = torch.tensor([3, 0, 6])
    assert all(torch.equal(a, b) for a, b in zip(sample_to_k(unet, scheduler, z_T, c_cond, c_uncond, 3.0, k1),
                                                 sample_to_k(unet, scheduler, z_T, c_cond, c_uncond, 3.0, k1[:, None])))
