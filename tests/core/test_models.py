"""Every registered model, as timm's tests do: builds, runs forward and backward at the input
sizes the project supports, and exposes its router and expert parameters as two groups."""
import pytest
import torch
import torch.nn.functional as F

import advmoe
from advmoe.calibrate import balance_routing
from advmoe.gate import Route
from helpers import ALL_MODELS, MOE_MODELS, model_variants, small_model, variant_id

SIZES = [(1, 28), (3, 32), (3, 64)]  # (channels, image size): Fashion-MNIST, CIFAR, TinyImageNet


def test_registry_lists_the_four_architectures_and_their_moe_twins():
    for arch in ("resnet18", "wrn28_10", "vgg16", "densenet40"):
        assert arch in ALL_MODELS and f"moe_{arch}" in MOE_MODELS
        assert advmoe.dense_twin(f"moe_{arch}") == arch
    assert advmoe.list_models("moe_*") == MOE_MODELS
    assert set(advmoe.list_models(moe=False)) == set(ALL_MODELS) - set(MOE_MODELS)


@pytest.mark.parametrize("name,router", model_variants(), ids=variant_id)
@pytest.mark.parametrize("channels,size", SIZES, ids=lambda v: str(v))
def test_forward_backward(name, router, channels, size):
    model = small_model(name, router, in_channels=channels, image_size=size, num_classes=7)
    x = torch.rand(4, channels, size, size)
    logits = model(x)
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    if model.cfg.is_moe:
        assert model.last_routing.shape == (4, len(model.moe_layers))
        assert model.last_routing.dtype == torch.long


@pytest.mark.parametrize("name,router", model_variants(), ids=variant_id)
def test_every_parameter_router_included_gets_a_gradient_in_masked_mode(name, router):
    model = small_model(name, router)
    x = torch.rand(16, 3, 32, 32)
    model.train()
    balance_routing(model, x)  # both experts in use, so every expert's weights take part
    model.zero_grad()
    model(x).logsumexp(1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name,router", model_variants(MOE_MODELS), ids=variant_id)
def test_set_gate_grad_changes_the_router_gradient_not_the_forward_pass(name, router):
    torch.manual_seed(0)
    model = small_model(name, router).eval()
    balance_routing(model, torch.rand(16, 3, 32, 32))
    x = torch.rand(8, 3, 32, 32)

    def forward_and_router_grad():
        model.zero_grad()
        logits = model(x)
        logits.logsumexp(1).sum().backward()
        return logits.detach(), torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                           for p in model.router_parameters()])

    softmax_logits, softmax_grad = forward_and_router_grad()
    advmoe.set_gate_grad(model, "chosen")
    assert model.cfg.gate_grad == "chosen" and all(m.gate_grad == "chosen" for m in model.moe_layers)
    chosen_logits, chosen_grad = forward_and_router_grad()
    # To float precision: under "chosen" and "none" the masked path convolves only the chosen
    # experts' rows, a different summation order (test_execution.py checks it in full).
    torch.testing.assert_close(chosen_logits, softmax_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(chosen_grad, softmax_grad)
    advmoe.set_gate_grad(model, "none")  # the route is a constant: the routers get nothing from the output
    none_logits, none_grad = forward_and_router_grad()
    torch.testing.assert_close(none_logits, softmax_logits, rtol=1e-4, atol=1e-4)
    assert (none_grad == 0).all() and (softmax_grad != 0).any()
    with pytest.raises(ValueError, match="gate grad must be one of"):
        advmoe.set_gate_grad(model, "nowhere")


@pytest.mark.parametrize("name,router", model_variants(), ids=variant_id)
def test_router_and_expert_parameters_partition_the_model(name, router):
    model = small_model(name, router)
    routers = {id(p) for p in model.router_parameters()}
    experts = {id(p) for p in model.expert_parameters()}
    assert routers.isdisjoint(experts)
    assert routers | experts == {id(p) for p in model.parameters()}
    assert bool(routers) == model.cfg.is_moe


def test_moe_layout_follows_the_reference():
    """N experts in one weight of N * w filters, w = int(r * C); shortcuts and stem dense."""
    model = advmoe.create_model("moe_resnet18", num_experts=3, expert_ratio=0.5)
    block = model.blocks[2]  # first block of stage 2: dense width 128
    assert isinstance(block.conv1, advmoe.MoEConv2d)
    assert block.conv1.weight.shape == (3 * 64, 32, 3, 3)
    assert isinstance(block.shortcut, advmoe.ConvNorm2d) and block.shortcut.out_channels == 64
    assert model.stem.out_channels == 64  # ResNet-18 keeps a full-width stem
    wrn = advmoe.create_model("moe_wrn28_10", width=0.1)
    assert all(isinstance(b.shortcut, advmoe.MoEConv2d) for b in wrn.blocks if b.shortcut is not None)
    assert len(advmoe.create_model("moe_vgg16").moe_layers) == 12  # every conv but the first


@pytest.mark.parametrize("bad,message", [
    (dict(top_k=3), "top_k=3"),
    (dict(expert_ratio=0), "expert_ratio"),
    (dict(router="global"), "router='global'"),
    (dict(num_experts=1), "at least 2 experts"),
    (dict(mean=(0.1, 0.2)), "mean has 2 values"),
    (dict(width=0), "width"),
])
def test_invalid_configs_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        advmoe.create_model("moe_resnet18", **bad)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*moe_resnet18"):
        advmoe.create_model("resnet50")
    with pytest.raises(TypeError, match="unknown argument.*'experts'"):
        advmoe.create_model("moe_resnet18", experts=2)
    with pytest.raises(ValueError, match="dense model; use moe_resnet18"):
        advmoe.create_model("resnet18", num_experts=2)
    with pytest.raises(ValueError, match="depth=27"):
        advmoe.create_model("wrn28_10", depth=27)
    with pytest.raises(ValueError, match=r"expected input \[B, 3, H, W\]"):
        advmoe.create_model("resnet18", width=0.1)(torch.rand(2, 1, 32, 32))


def test_top_k_two_runs_and_mixes_two_experts():
    """Top-2 of 2 experts: every sample goes through both, both learn, and an MoE layer's output
    is the gate-weighted mix of what each expert alone gives."""
    model = small_model("moe_resnet18", top_k=2)
    x = torch.rand(3, 3, 32, 32)
    model(x).sum().backward()
    layer = model.moe_layers[0]
    route = layer.last_route
    assert route.experts.sort(1).values.tolist() == [[0, 1]] * 3
    assert (route.weights > 0).all() and torch.allclose(route.weights.sum(1), torch.ones(3))
    assert all(grad.abs().sum() > 0 for grad in layer.weight.grad.split(layer.out_channels))
    # In eval mode BatchNorm is affine, so with weights summing to one the mix commutes with it.
    layer.eval()
    h = torch.rand(3, layer.in_channels, 16, 16)
    with torch.no_grad():
        alone = [layer(h, Route(experts=torch.full((3, 1), e), weights=F.one_hot(torch.full((3,), e), 2).float(),
                                scores=route.scores)) for e in (0, 1)]
        mixed = layer(h, route)
    weights = route.weights.detach()[:, :, None, None]
    torch.testing.assert_close(mixed, weights[:, :1] * alone[0] + weights[:, 1:] * alone[1])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_the_stem_follows_the_image_size_where_the_architecture_has_an_imagenet_one(name):
    small = small_model(name, image_size=32)
    assert small.stem_kind == "small"
    if "resnet18" in name:
        assert small_model(name, image_size=224).stem_kind == "imagenet"
        assert small_model(name, image_size=64, stem="imagenet").stem_kind == "imagenet"
        assert small_model(name, image_size=224, stem="small").stem_kind == "small"
    else:
        assert small_model(name, image_size=96).stem_kind == "small"
        with pytest.raises(ValueError, match="stem=imagenet is ResNet-18's"):
            small_model(name, image_size=96, stem="imagenet")
