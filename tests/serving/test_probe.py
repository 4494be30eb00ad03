"""The probe's attack (serving/probe.py, what the probe worker runs) on a small trained model:
it raises the classification loss, further than random noise of the same size, within eps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advmoe
from helpers import small_model
from serving.probe import bounded_attack

EPS = 0.1
NO_HANG_S = 600  # the probe's deadline, far beyond what the attack needs: never reached here


def fixed_patterns_under_noise(patterns, n, generator):
    labels = torch.randint(0, len(patterns), (n,), generator=generator)
    return 0.7 * patterns[labels] + 0.3 * torch.rand(n, *patterns.shape[1:], generator=generator), labels


@pytest.fixture(scope="module")
def trained(one_thread):
    """A small MoE ResNet trained to tell 10 fixed 1x28x28 patterns apart under noise, set as the
    probe worker sets its model (masked execution, eval), and a held-out batch it classifies."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    patterns = torch.rand(10, 1, 28, 28, generator=generator)
    model = small_model("moe_resnet18", "shared", in_channels=1, image_size=28, width=0.0625, router_width=4,
                        router_blocks=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        x, y = fixed_patterns_under_noise(patterns, 64, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    advmoe.set_execution(model, "masked")
    model.eval()
    x, y = fixed_patterns_under_noise(patterns, 32, generator)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.9, "the toy model should have learned the patterns"
    return model, x, y


def losses(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_the_probe_raises_the_loss_further_than_noise_and_stays_within_eps(trained, attack):
    model, x, y = trained
    result = bounded_attack(model, x, y, attack, eps=EPS, steps=5, step_size=None, timeout_s=NO_HANG_S)
    assert not result.time_capped and result.steps_run == (1 if attack == "fgsm" else 5)
    adversarial = result.adversarial
    assert (adversarial - x).abs().max() <= EPS + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1
    clean, attacked = losses(model, x, y), losses(model, adversarial, y)
    # noise at the ball's corners: as far from x as a sign step goes, in random directions
    corners = (x + EPS * (2 * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)) - 1)).clamp(0, 1)
    noise = losses(model, corners, y)
    assert (attacked > clean).float().mean() >= 0.9
    assert attacked.mean() > 2 * noise.mean() and attacked.mean() > 2 * clean.mean()
