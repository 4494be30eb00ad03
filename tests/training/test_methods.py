"""Each method's step, on a fixed batch: it lowers its own loss, and AdvMoE's two steps touch
only their own parameter group."""
import pytest
import torch

from helpers import small_model
from training.config import resolve
from training.methods import METHODS, Step
from training.trainer import make_optimizers


def make_step(method, router="shared", router_loss="model", lr=0.05):
    cfg = resolve(method=method, model="moe_resnet18", dataset="fashion_mnist", eps=0.1, attack_step=0.05,
                  router_loss=router_loss, lr=lr)
    torch.manual_seed(0)
    model = small_model("moe_resnet18", router, in_channels=1, image_size=28, width=0.125, router_blocks=1, router_width=8)
    model.train()
    optimizers = make_optimizers(cfg, model)
    return Step(model, cfg, optimizers)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_lowers_the_methods_own_loss(method):
    step, (x, y) = make_step(method), batch()
    torch.manual_seed(2)
    before = METHODS[method].step(step, x, y)
    torch.manual_seed(2)  # the same attack noise: the same loss, at the updated parameters
    after = METHODS[method].step(step, x, y)
    for key in before:
        assert after[key] < before[key], (key, before[key], after[key])


@pytest.mark.parametrize("router", ["shared", "per_layer"])
@pytest.mark.parametrize("method,router_loss", [("advmoe", "model"), ("advmoe", "reference"), ("router-only", "model")])
def test_router_step_moves_only_router_parameters_and_expert_step_only_experts(method, router_loss, router):
    step = make_step(method, router, router_loss)
    model = step.model
    router_ids = {id(p) for p in model.router_parameters()}
    changed_by = {}
    update = step.update

    def recording_update(group, loss):
        before = {id(p): p.detach().clone() for p in model.parameters()}
        value = update(group, loss)
        changed_by[group] = {i for i, p in ((id(p), p) for p in model.parameters()) if not torch.equal(before[i], p)}
        return value

    step.update = recording_update
    METHODS[method].step(step, *batch())
    assert changed_by["router"] and changed_by["router"] <= router_ids
    assert changed_by["experts"] and not changed_by["experts"] & router_ids
