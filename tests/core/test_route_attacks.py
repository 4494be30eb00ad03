"""Route-fixed and router attacks: they force or move the route, stay in the threat model, and
leave the model as it was."""
import pytest
import torch
import torch.nn.functional as F

from advmoe.attacks import router_kl
from advmoe.route_attacks import detached_routers, forced_route, route_fixed_pgd, router_pgd
from helpers import ROUTERS, calibrated_model, small_model

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("expert", [0, 1])
def test_forced_route_sends_every_sample_to_the_expert_and_is_undone(router, expert):
    model = calibrated_model("moe_resnet18", router)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        before = model(x).clone()
        routing = model.last_routing.clone()
        assert routing.unique().numel() == 2  # the calibrated router uses both experts
        with forced_route(model, expert) as real:
            model(x)
            assert (model.last_routing == expert).all()
            assert len(real) == (1 if router == "shared" else len(model.moe_layers))
        assert torch.equal(model(x), before) and torch.equal(model.last_routing, routing)


@pytest.mark.parametrize("router", ROUTERS)
def test_forced_route_per_sample_sends_each_sample_to_its_own_expert(router):
    model = calibrated_model("moe_resnet18", router)
    x, experts = torch.rand(6, 3, 32, 32), torch.tensor([1, 0, 0, 1, 1, 0])
    with torch.no_grad(), forced_route(model, experts):
        model(x)
    assert torch.equal(model.last_routing, experts[:, None].expand_as(model.last_routing))
    with pytest.raises(ValueError, match="out of range"):
        with forced_route(model, torch.tensor([0, 2])):
            pass


@pytest.mark.parametrize("router", ROUTERS)
def test_detached_routers_keep_the_routes_and_remove_the_router_gradient(router):
    model = calibrated_model("moe_resnet18", router)
    x, y = torch.rand(4, 3, 32, 32, requires_grad=True), torch.arange(4)

    def grad():
        return torch.autograd.grad(F.cross_entropy(model(x), y), x)[0]

    through = grad()
    with detached_routers(model):
        detached = grad()
        routing = model.last_routing.clone()
    with torch.no_grad():
        model(x)
    assert torch.equal(model.last_routing, routing)  # same routes
    assert not torch.allclose(through, detached)  # the straight-through gate adds a gradient


@pytest.mark.parametrize("router", ROUTERS)
def test_route_attacks_stay_in_the_eps_ball(router):
    model = calibrated_model("moe_resnet18", router)
    x, y, eps = torch.rand(4, 3, 32, 32), torch.arange(4), 8 / 255
    for x_adv in (route_fixed_pgd(model, x, y, 1, eps, eps / 4, 3), router_pgd(model, x, eps, eps / 4, 3)):
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_router_attack_moves_the_router_scores():
    model = calibrated_model("moe_resnet18", "shared")
    x, eps = torch.rand(8, 3, 32, 32), 8 / 255
    with torch.no_grad():
        model(x)
        clean = model.router_logits.clone()
        torch.manual_seed(0)
        noise = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        model(noise)
        random_kl = router_kl(model.router_logits, clean)
    x_adv = router_pgd(model, x, eps, eps / 4, 10)
    with torch.no_grad():
        model(x_adv)
        attacked_kl = router_kl(model.router_logits, clean)
    assert attacked_kl > 10 * random_kl


def test_route_attacks_refuse_dense_models_and_sparse_execution():
    import advmoe

    with pytest.raises(ValueError, match="dense model"):
        route_fixed_pgd(small_model("resnet18"), torch.rand(2, 3, 32, 32), torch.arange(2), 0, 0.03, 0.01, 1)
    model = calibrated_model("moe_resnet18", "shared")
    with pytest.raises(ValueError, match="out of range"):
        with forced_route(model, 5):
            pass
    advmoe.set_execution(model, "sparse")
    with pytest.raises(ValueError, match="masked execution"):
        router_pgd(model, torch.rand(2, 3, 32, 32), 0.03, 0.01, 1)
