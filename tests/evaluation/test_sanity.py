"""Sanity-check thresholds count whole images: one image of slack, not a float comparison."""
import pytest
import torch

from evaluation import sanity


def f32(value: float) -> float:
    return torch.tensor(value).item()  # what .float().mean().item() gives: 11/20 -> 0.550000011920929


@pytest.mark.parametrize("pgd50, passed", [(10 / 20, True), (11 / 20, True), (12 / 20, False)])
def test_more_steps_allows_one_image(pgd50, passed):
    assert sanity.more_steps({10: f32(10 / 20), 50: f32(pgd50)}, 20)["passed"] is passed


@pytest.mark.parametrize("curve, passed", [
    ([0.60, 0.55, 0.30, 0.00], True),
    ([0.60, 0.65, 0.30, 0.00], True),  # one image back up: noise of random starts
    ([0.60, 0.70, 0.30, 0.00], False),  # two: the attack is failing
    ([0.60, 0.55, 0.30, 0.10], False),  # not about zero at eps 0.5
])
def test_eps_sweep(curve, passed):
    check = sanity.eps_sweep([0.05, 0.1, 0.2, 0.5], [f32(a) for a in curve], 20, 10)
    assert check["passed"] is passed
