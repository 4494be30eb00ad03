"""Sparse execution (inference: only the chosen experts run) equals masked execution (the
training path, every expert computed), for every MoE model, batch size and routing; and the
masked path that runs only the chosen experts, where the gradient allows it, gives the same
values and gradients as the one that computes every expert."""
import copy

import pytest
import torch
import torch.nn.functional as F

import advmoe
from advmoe.calibrate import force_routing
from advmoe.layers import MoEConv2d
from advmoe.route_attacks import detached_routers, forced_route
from helpers import MOE_MODELS, ROUTERS, calibrated_model

TOL = 1e-5


def assert_sparse_equals_masked(model, x):
    with torch.no_grad():
        advmoe.set_execution(model, "masked")
        masked, masked_routes = model(x), model.last_routing.clone()
        advmoe.set_execution(model, "sparse")
        sparse, sparse_routes = model(x), model.last_routing.clone()
    assert torch.equal(masked_routes, sparse_routes)
    diff = (sparse - masked).abs().max().item()
    assert diff <= TOL, f"max |sparse - masked| = {diff:.2e}"
    return sparse_routes


@pytest.mark.parametrize("name", MOE_MODELS)
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("routing", ["mixed", "all_to_0", "all_to_1"])
def test_sparse_equals_masked(name, router, batch, routing):
    model = calibrated_model(name, router)
    if routing != "mixed":
        force_routing(model, int(routing[-1]))
    torch.manual_seed(1)
    x = torch.rand(64, 3, 32, 32)[:batch]
    routes = assert_sparse_equals_masked(model, x)
    if routing != "mixed":
        assert (routes == int(routing[-1])).all()  # the other expert receives no sample
    elif batch == 64:
        assert set(routes.flatten().tolist()) == {0, 1}  # the dispatch really splits the batch


@pytest.mark.parametrize("router", ROUTERS)
def test_sparse_equals_masked_with_the_chosen_gate_gradient(router):
    calibrated = calibrated_model("moe_resnet18", router)
    model = advmoe.create_model("moe_resnet18", **{**calibrated.cfg.to_dict(), "gate_grad": "chosen"}).eval()
    model.load_state_dict(calibrated.state_dict())
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), calibrated(x))  # the option changes the backward pass only
    routes = assert_sparse_equals_masked(model, x)
    assert set(routes.flatten().tolist()) == {0, 1}


@pytest.mark.parametrize("router", ROUTERS)
def test_sparse_equals_masked_top2_of_three(router):
    model = calibrated_model("moe_resnet18", router, top_k=2, num_experts=3)
    assert model.cfg.num_experts == 3 and model.cfg.top_k == 2
    routes = assert_sparse_equals_masked(model, torch.rand(9, 3, 32, 32))
    assert routes.max() == 2  # the third expert is used too


def test_an_empty_batch_gives_empty_logits_in_sparse_and_masked_execution():
    model = calibrated_model("moe_resnet18", "shared")
    x = torch.rand(0, 3, 32, 32)
    with torch.no_grad():
        assert advmoe.set_execution(model, "masked")(x).shape == (0, 10)
        assert advmoe.set_execution(model, "sparse")(x).shape == (0, 10)


def test_sparse_is_inference_only():
    model = calibrated_model("moe_resnet18", "shared")
    advmoe.set_execution(model, "sparse")
    model.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="execution must be one of"):
        advmoe.set_execution(model, "dense")


@pytest.mark.parametrize("router", ROUTERS)
def test_sparse_follows_weight_changes(router):
    """Folded inference weights are rebuilt when the weights change in place (optimizer
    steps, load_state_dict), so sparse never serves stale weights."""
    model = calibrated_model("moe_resnet18", router)
    other = calibrated_model("moe_resnet18", router, seed=1)
    x = torch.rand(8, 3, 32, 32)
    advmoe.set_execution(model, "sparse")
    with torch.no_grad():
        before = model(x)
        model.load_state_dict(other.state_dict())
        after = model(x)
        expected = other(x)  # masked execution of the same weights
    assert not torch.allclose(before, after)
    assert (after - expected).abs().max() <= TOL


def test_dense_model_inference_preparation_matches_eager():
    model = calibrated_model("resnet18")
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        advmoe.set_execution(model, "sparse")
        assert (model(x) - eager).abs().max() <= TOL


def training_step(model, x, y, skip_unchosen: bool):
    """One masked forward and backward in train mode: what it computed and every gradient."""
    model.skip_unchosen = skip_unchosen
    model.train().zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    return logits.detach(), model.last_routing.clone(), x.grad, grads, stats


def refuse(monkeypatch, method: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"MoEConv2d.{method} ran")
    monkeypatch.setattr(MoEConv2d, method, refused)


@pytest.mark.parametrize("name", MOE_MODELS)
@pytest.mark.parametrize("grad", ["chosen", "none"])
@pytest.mark.parametrize("routing", ["mixed", "all_to_1"])
def test_masked_runs_only_the_chosen_experts_when_the_gradient_allows(name, grad, routing, monkeypatch):
    every = advmoe.set_gate_grad(calibrated_model(name, "shared"), grad)
    if routing != "mixed":
        force_routing(every, 1)
    assert every.can_skip_unchosen
    chosen = copy.deepcopy(every)
    torch.manual_seed(2)
    x, y = torch.rand(24, 3, 32, 32), torch.randint(0, 10, (24,))
    reference = training_step(every, x, y, skip_unchosen=False)
    refuse(monkeypatch, "_masked")  # from here on, no layer may compute every expert
    fast = training_step(chosen, x, y, skip_unchosen=True)
    logits, routes, x_grad, grads, stats = reference
    assert torch.equal(routes, fast[1])
    if routing == "mixed":
        assert set(routes[:, 0].tolist()) == {0, 1}  # the batch really is split and put back
    torch.testing.assert_close(fast[0], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[2], x_grad, rtol=1e-4, atol=1e-6)
    for n, g in grads.items():
        if g is None:
            assert fast[3][n] is None, n
        else:
            torch.testing.assert_close(fast[3][n], g, rtol=1e-4, atol=1e-6, msg=n)
    for n, s in stats.items():  # BatchNorm saw the same batch, in another order
        torch.testing.assert_close(fast[4][n], s, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", MOE_MODELS)
@pytest.mark.parametrize("forced", ["per_sample", "one_expert", "detached"])
def test_a_route_that_carries_no_gradient_runs_only_the_chosen_experts(name, forced, monkeypatch):
    """Under our "softmax" gate, an attack that forces the route (route-fixed PGD, route-aware
    training) or detaches the router gives the gate weights no gradient: no unchosen expert's
    output can reach one, so masked execution runs only the chosen experts, with the same
    values and input gradient as computing every expert."""
    model = calibrated_model(name, "shared").train()
    assert not model.can_skip_unchosen
    torch.manual_seed(3)
    x, y = torch.rand(24, 3, 32, 32), torch.randint(0, 10, (24,))
    runner_up = model.router(x).argmin(1)  # two experts: the route each sample would not take

    def attack_gradient(skip_unchosen: bool):
        model.skip_unchosen = skip_unchosen
        x_adv = x.clone().requires_grad_(True)
        if forced == "detached":
            context = detached_routers(model)
        else:
            context = forced_route(model, runner_up if forced == "per_sample" else 1)
        with context:
            logits = model(x_adv)
            routes = model.last_routing[:, 0].clone()
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x_adv)
        return logits.detach(), routes, grad

    logits, routes, grad = attack_gradient(skip_unchosen=False)
    if forced != "one_expert":
        assert set(routes.tolist()) == {0, 1}
    refuse(monkeypatch, "_masked")
    fast = attack_gradient(skip_unchosen=True)
    assert torch.equal(fast[1], routes)
    torch.testing.assert_close(fast[0], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[2], grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(AssertionError, match="_masked ran"):  # the real route's gate learns: every expert again
        model(x.clone().requires_grad_(True))


@pytest.mark.parametrize("router", ROUTERS)
def test_masked_computes_every_expert_when_the_gradient_needs_them(router, monkeypatch):
    """Under "softmax" an unchosen expert's output is its logit's gradient; per-layer gates
    route each layer afresh: both keep the path that computes every expert."""
    model = calibrated_model("moe_resnet18", router)
    if router == "per_layer":
        advmoe.set_gate_grad(model, "chosen")
    assert not model.can_skip_unchosen
    refuse(monkeypatch, "_sorted")
    x = torch.rand(16, 3, 32, 32, requires_grad=True)
    model.train()
    model(x).sum().backward()
    if router == "shared":
        assert model.router.fc.weight.grad.abs().sum(1).gt(0).all()  # every expert's logit learns


def test_tracing_and_export_keep_the_path_that_computes_every_expert():
    """The sorted path's slices have data-dependent sizes: a trace would freeze this batch's
    split into the graph. Tracing and export take the every-expert path, exact for any batch."""
    model = advmoe.set_gate_grad(calibrated_model("moe_resnet18", "shared"), "chosen").eval()
    x, other = torch.rand(16, 3, 32, 32), torch.rand(16, 3, 32, 32).flip(0)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    with torch.no_grad():
        for batch in (x, other, x[:5]):
            expected = model(batch)
            assert len(set(model.last_routing[:, 0].tolist())) == 2  # a split the trace did not see
            torch.testing.assert_close(traced(batch), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(exported.module()(batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
def test_sparse_equals_masked_with_the_imagenet_stem(router):
    model = calibrated_model("moe_resnet18", router, image_size=96)  # over 64 pixels: the ImageNet stem
    assert model.stem_kind == "imagenet"
    x = torch.rand(4, 3, 96, 96)
    with torch.no_grad():
        masked = model(x)
        routing = model.last_routing.clone()
        advmoe.set_execution(model, "sparse")
        sparse = model(x)
    assert len(routing.unique()) == 2  # both experts in use
    assert torch.allclose(sparse, masked, atol=1e-4) and torch.equal(model.last_routing, routing)
