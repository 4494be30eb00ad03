"""count_macs (analytic, from the layers' geometry) against what really runs."""
import pytest
import torch
from torch import nn

import advmoe
from advmoe.macs import measure_macs
from helpers import calibrated_model, model_variants, small_model, variant_id


def hook_macs(model, x) -> float:
    """MACs per image from forward hooks on the real modules: each conv unit's output shape
    times its filter size (k experts for top-k), each linear layer's weight."""
    total = 0

    def conv_hook(module, args, out):
        nonlocal total
        per_sample = out.shape[1] * out.shape[2] * out.shape[3] * module.in_channels * module.kernel_size**2
        total += per_sample * getattr(module, "top_k", 1) * out.shape[0]

    def linear_hook(module, args, out):
        nonlocal total
        total += module.in_features * module.out_features * out.shape[0]

    handles = [m.register_forward_hook(conv_hook) for m in model.modules()
               if isinstance(m, (advmoe.ConvNorm2d, advmoe.MoEConv2d))]
    handles += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total / x.shape[0]


VARIANTS_TOP_K = [(n, r, k) for n, r in model_variants() for k in ((1, 2) if r else (1,))]


@pytest.mark.parametrize("name,router,top_k", VARIANTS_TOP_K, ids=variant_id)
def test_count_macs_equals_hook_count_and_op_count_of_sparse_execution(name, router, top_k):
    model = calibrated_model(name, router, top_k=top_k)
    advmoe.set_execution(model, "sparse")
    x = torch.rand(6, 3, 32, 32)
    analytic = advmoe.count_macs(model, (3, 32, 32))
    assert hook_macs(model, x) == analytic
    assert measure_macs(model, x) == analytic  # torch's own count of the conv / matmul ops run


@pytest.mark.parametrize("size", [28, 64])
def test_count_macs_at_other_input_sizes(size):
    model = calibrated_model("moe_resnet18", "per_layer", image_size=size)
    advmoe.set_execution(model, "sparse")
    x = torch.rand(3, 3, size, size)
    assert measure_macs(model, x) == advmoe.count_macs(model, (3, size, size))


def test_moe_resnet18_path_plus_router_is_at_most_036_of_dense():
    moe = advmoe.create_model("moe_resnet18")
    dense = advmoe.create_model("resnet18")
    ratio = advmoe.count_macs(moe, (3, 32, 32)) / advmoe.count_macs(dense, (3, 32, 32))
    assert ratio <= 0.36, ratio


@pytest.mark.parametrize("name,gmacs", [("resnet18", 0.555), ("wrn28_10", 5.24), ("vgg16", 0.314)])
def test_dense_counts_match_the_reference_architectures(name, gmacs):
    """docs/method.md's table (MACs per 32x32 image): the models are the paper's."""
    assert advmoe.count_macs(advmoe.create_model(name), (3, 32, 32)) / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_masked_execution_computes_every_expert():
    model = advmoe.create_model("moe_resnet18").eval()  # full width: the router is not scaled by `width`
    x = torch.rand(2, 3, 32, 32)
    masked = measure_macs(model, x)
    advmoe.set_execution(model, "sparse")
    assert measure_macs(model, x) < 0.7 * masked


def test_count_macs_checks_the_channels():
    with pytest.raises(ValueError, match="1 channels; the model takes 3"):
        advmoe.count_macs(small_model("resnet18"), (1, 32, 32))


def test_a_strided_router_costs_a_quarter_and_is_counted_as_it_runs():
    """router_stride=2 runs the shared router at half resolution: its MACs fall to about a quarter,
    counted as they run, and sparse execution still equals masked execution."""
    models = {}
    for stride in (1, 2):
        torch.manual_seed(0)
        models[stride] = small_model("moe_resnet18", "shared", in_channels=1, image_size=28, router_blocks=1,
                                     router_width=8, router_stride=stride).eval()
    x = torch.rand(8, 1, 28, 28)
    router = {s: m.router.macs(28, 28) for s, m in models.items()}
    assert 0.2 < router[2] / router[1] < 0.3
    total = {s: advmoe.count_macs(m, (1, 28, 28)) for s, m in models.items()}
    assert total[1] - total[2] == router[1] - router[2]
    with torch.no_grad():
        masked = models[2](x)
    advmoe.set_execution(models[2], "sparse")
    assert measure_macs(models[2], x) == total[2] == hook_macs(models[2], x)
    with torch.no_grad():
        torch.testing.assert_close(models[2](x), masked, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="router_stride 1 or 2"):
        small_model("moe_resnet18", "shared", router_stride=3)


@pytest.mark.parametrize("router", ["shared", "per_layer"])
def test_the_imagenet_stem_is_counted(router):
    """The stem's max-pool has no MACs but shrinks every later layer: the analytic count follows it."""
    model = calibrated_model("moe_resnet18", router, image_size=96)
    assert model.stem_kind == "imagenet"
    advmoe.set_execution(model, "sparse")
    x = torch.rand(2, 3, 97, 97)  # odd sizes too: the pool's rounding
    assert hook_macs(model, x) == measure_macs(model, x) == advmoe.count_macs(model, (3, 97, 97))


def test_at_224_resnet18_is_torchvisions_and_the_moe_model_runs_a_third_of_it():
    dense = advmoe.count_macs(advmoe.create_model("resnet18", image_size=224), (3, 224, 224))
    assert dense / 1e9 == pytest.approx(1.814, rel=0.01)  # torchvision's ResNet-18: 1.82 GMACs
    moe = advmoe.create_model("moe_resnet18", image_size=224, router_stride=2)
    assert dense / advmoe.count_macs(moe, (3, 224, 224)) > 2.9
    assert moe.router.macs(224, 224) < 0.07 * advmoe.count_macs(moe, (3, 224, 224))  # the router enters at 1/8 size
