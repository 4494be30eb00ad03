"""PGD in pixel space, through the straight-through router."""
import pytest
import torch
import torch.nn.functional as F

from advmoe.attacks import check_eps, cross_entropy, kl, pgd, router_kl
from helpers import small_model


def test_eps_in_pixels_instead_of_unit_range_is_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"eps=8 must be in \(0, 1\].*8/255 = 0\.0314"):
        check_eps(8)
    with pytest.raises(ValueError, match="norm must be one of"):
        check_eps(0.1, "l1")


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_pgd_stays_in_the_ball_and_the_image_range(norm, eps):
    model = small_model("moe_resnet18").eval()
    x = torch.rand(6, 3, 32, 32)
    y = torch.randint(0, 10, (6,))
    x_adv = pgd(model, x, cross_entropy(y), eps, eps / 4, 5, norm=norm)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert all(p.grad is None for p in model.parameters())  # only the input got gradients


def test_the_router_passes_gradients_to_the_attack():
    """The straight-through gate: an objective on the router scores alone moves the input."""
    model = small_model("moe_resnet18").eval()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    model(x.detach())
    clean = model.router_logits.detach()
    model(x)
    grad, = torch.autograd.grad(router_kl(model.router_logits, clean) + model.router_scores[:, 0].sum(), x)
    assert grad.abs().sum() > 0


@pytest.mark.usefixtures("one_thread")  # the toy's numbers depend on the thread count (2 threads: 0.90 clean)
def test_more_pgd_steps_never_do_worse_on_a_trained_toy_model():
    torch.manual_seed(0)
    model = small_model("moe_resnet18", in_channels=1, image_size=28, width=0.125, router_blocks=1)
    patterns = torch.rand(10, 1, 28, 28)
    y = torch.arange(60) % 10
    x = (0.6 * patterns[y] + 0.4 * torch.rand(60, 1, 28, 28)).clamp(0, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    accuracies = []
    eps = 0.007  # small enough that 1, 5 and 20 steps each leave a different accuracy (0.87, 0.25, 0.18)
    for steps in (1, 5, 20):
        torch.manual_seed(1)
        x_adv = pgd(model, x, cross_entropy(y), eps, eps / 4, steps, random_start=False)
        with torch.no_grad():
            accuracies.append((model(x_adv).argmax(1) == y).float().mean().item())
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.9
    assert clean >= accuracies[0] >= accuracies[1] >= accuracies[2], (clean, accuracies)
    assert accuracies[2] < accuracies[0] < clean  # more steps find more


def test_kl_objective_uses_the_router_scores_when_given():
    model = small_model("moe_resnet18", router="per_layer").eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        r = model.router_logits
    assert r.shape == (3, len(model.moe_layers), 2)
    assert kl(p, r)(model, x).item() == pytest.approx(0.0, abs=1e-5)
    assert kl(p, r)(model, (x + 0.2).clamp(0, 1)).item() > 0


def test_router_kl_keeps_its_gradient_when_the_router_is_saturated():
    """A confidently flipped route (clean logits favour expert 1, adversarial ones expert 0 by
    a margin of 60): the KL is large and so must its gradient be. The log of a softmax clamped
    at 1e-12 has none there."""
    adv = torch.tensor([[30.0, -30.0]] * 4, requires_grad=True)
    clean = torch.tensor([[-30.0, 30.0]] * 4)
    loss = router_kl(adv, clean)
    grad, = torch.autograd.grad(loss, adv)
    assert loss.item() > 50
    torch.testing.assert_close(grad, torch.tensor([[0.25, -0.25]] * 4))  # (softmax(adv) - softmax(clean)) / B
    clamped = F.kl_div(adv.softmax(1).clamp_min(1e-12).log(), clean.softmax(1), reduction="batchmean")
    assert torch.autograd.grad(clamped, adv)[0].abs().max() < 1e-6  # what the old form gave


def test_pgd_starts_next_to_x_with_the_normal_start_and_anywhere_in_the_ball_with_uniform():
    x = torch.full((64, 1, 8, 8), 0.5)
    starts = {}
    for start in ("normal", "uniform"):
        starts[start] = pgd(nn_identity_model(), x, lambda m, xa: xa.sum() * 0, 0.1, 0.05, 0, start=start) - x
    assert starts["normal"].abs().max() < 0.01 and starts["normal"].std() == pytest.approx(0.001, rel=0.1)
    assert starts["uniform"].abs().max() > 0.09 and starts["uniform"].abs().max() <= 0.1 + 1e-6
    assert torch.equal(pgd(nn_identity_model(), x, lambda m, xa: xa.sum(), 0.1, 0.05, 0, random_start=False), x)
    with pytest.raises(ValueError, match="start must be one of"):
        pgd(nn_identity_model(), x, lambda m, xa: xa.sum(), 0.1, 0.05, 1, start="zero")


def nn_identity_model():
    return torch.nn.Identity()
