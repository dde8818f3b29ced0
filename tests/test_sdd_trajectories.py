"""``sdd.latents_per_trajectory``: R training latents from one teacher trajectory. The teacher runs B / R
trajectories, each to its largest k, and every latent is the one the paper's sampler gives for its own k."""

import pytest
import torch

from sdd.config import load_config
from sdd.errors import ConfigError
from sdd.loop import make_accelerator, step_generator
from sdd.methods.sdd import SDDConfig, SDDMethod
from sdd.sampling import sample_to_k


def build(tiny_args, *overrides):
    args = tiny_args(*overrides)
    cfg = load_config(SDDConfig, args[1], args[2:])
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    return SDDMethod(cfg, accelerator.device)


def test_two_trajectories_give_four_latents_each_at_its_own_k(tiny_args):
    method = build(tiny_args, "train.batch_size=4", "sdd.latents_per_trajectory=2", "concepts=[nudity, violence]")
    z_T, k, idx = method.draw(1, step_generator(0, 0, 1))
    assert z_T.shape[0] == 2 and k.shape == (2, 2)
    assert idx.tolist() == [0, 1]  # round robin over trajectories: micro-step 1 holds trajectories 2 and 3
    calls = []
    hook = method.teacher.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    z_t, t, c_uncond, c_s = method.sample_latents(method.model, z_T, k, idx)
    hook.remove()
    assert len(calls) == int(k.max())  # one trajectory pass per grid step, to the largest k
    assert calls[0] == 4  # (uncond, cond) of the two trajectories, not of four latents
    assert z_t.shape[0] == 4 and c_s.shape[0] == 4
    c_p = method.conditioning(idx)[1]
    for j in range(4):  # latent j: trajectory j // 2 after k[j // 2, j % 2] steps, sampled alone
        b, r = divmod(j, 2)
        alone, t_alone = sample_to_k(method.teacher, method.scheduler, z_T[b : b + 1], c_p[b : b + 1], c_uncond,
                                     method.cfg.sdd.guidance_scale, k[b, r : r + 1])
        torch.testing.assert_close(z_t[j : j + 1], alone, atol=1e-5, rtol=1e-4)
        assert t[j] == t_alone[0]
    loss, _ = method.compute_loss(method.model, 1, step_generator(0, 0, 1))
    assert torch.isfinite(loss) and loss.requires_grad


def test_latents_per_trajectory_must_divide_the_batch(tiny_args):
    with pytest.raises(ConfigError, match=r"sdd.latents_per_trajectory: must divide train.batch_size \(3\)"):
        build(tiny_args, "train.batch_size=3", "sdd.latents_per_trajectory=2")
