"""SDD's pure math against numbers worked out by hand."""

import numpy as np
import pytest
import torch

from sdd.methods.sdd import ema_update_, sdd_loss
from sdd.sampling import concept_indices, sample_k


def test_sdd_loss_is_the_element_mean_of_squared_differences():
    eps_concept = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    eps_uncond = torch.tensor([[0.0, 0.0], [1.0, 6.0]])
    # differences 1, 2, 2, -2 -> squares 1, 4, 4, 4 -> mean 13 / 4
    assert sdd_loss(eps_concept, eps_uncond).item() == pytest.approx(3.25)


def test_sdd_loss_stops_the_gradient_of_the_unconditional_target():
    eps_concept = torch.tensor([1.0, 3.0], requires_grad=True)
    eps_uncond = torch.tensor([0.0, 1.0], requires_grad=True)
    sdd_loss(eps_concept, eps_uncond).backward()
    # d/dx mean((x - y)^2) = 2 (x - y) / n = [1, 2]
    assert eps_concept.grad.tolist() == pytest.approx([1.0, 2.0])
    assert eps_uncond.grad is None


def test_ema_update_by_hand():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    student = [torch.tensor([3.0, 0.0]), torch.tensor([[20.0]])]
    ema_update_(teacher, student, decay=0.75)
    # 0.75 * 1 + 0.25 * 3 = 1.5; 0.75 * 2 + 0 = 1.5; 0.75 * 10 + 0.25 * 20 = 12.5
    assert teacher[0].tolist() == pytest.approx([1.5, 1.5])
    assert teacher[1].item() == pytest.approx(12.5)
    assert student[0].tolist() == [3.0, 0.0]  # the student is read, never written


def test_ema_decay_zero_copies_and_one_freezes():
    teacher, student = [torch.tensor([1.0])], [torch.tensor([5.0])]
    ema_update_(teacher, student, decay=0.0)
    assert teacher[0].item() == 5.0
    teacher = [torch.tensor([1.0])]
    ema_update_(teacher, student, decay=1.0)
    assert teacher[0].item() == 1.0


def test_uniform_k_covers_the_whole_grid_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    k = sample_k(5000, 10, g, "uniform")
    assert k.dtype == torch.int64
    assert set(k.tolist()) == set(range(10))


def test_beta_k_is_floor_of_K_times_a_beta33_sample():
    g = torch.Generator().manual_seed(0)
    k = sample_k(20000, 50, g, "beta", (3.0, 3.0)).numpy()
    assert k.min() >= 0 and k.max() <= 49
    # Beta(3, 3): mean 1/2, variance 1/28 -> k has mean ~ 50 * 0.5 - 0.5 and sd ~ 50 / sqrt(28)
    assert abs(k.mean() - 24.5) < 0.3
    assert abs(k.std() - 50 / np.sqrt(28)) < 0.3
    # mid-trajectory emphasis: the middle fifth of the grid is about 3x as likely as the first fifth
    assert (k // 10 == 2).mean() > 2.5 * (k // 10 == 0).mean()


def test_same_generator_state_gives_same_k():
    a = sample_k(8, 50, torch.Generator().manual_seed(3), "beta")
    b = sample_k(8, 50, torch.Generator().manual_seed(3), "beta")
    assert torch.equal(a, b)


def test_iterative_concepts_run_round_robin_over_the_global_sample_count():
    g = torch.Generator().manual_seed(0)
    assert concept_indices("iterative", 3, 4, 0, g).tolist() == [0, 1, 2, 0]
    assert concept_indices("iterative", 3, 4, 4, g).tolist() == [1, 2, 0, 1]
    random = concept_indices("random", 3, 1000, 0, g)
    assert set(random.tolist()) == {0, 1, 2}
