"""Static execution (the sparse path with static shapes: each expert's group padded to a capacity)
equals sparse execution, for every MoE model, router and routing split, a bucket too small for the
largest group included; its exported ONNX graph has no NonZero or ScatterND and runs the same in
onnxruntime."""
import pytest
import torch

import advmoe
from advmoe.calibrate import force_routing
from advmoe.dispatch import capacity_dispatch, capacity_for
from helpers import MOE_MODELS, ROUTERS, calibrated_model

TOL = 1e-5  # float32 sums in another order: relative to the logits' size too


def same(a, b) -> bool:
    return torch.allclose(a, b, rtol=TOL, atol=TOL)


def run(model, x, mode, buckets=()):
    advmoe.set_execution(model, mode, capacity_buckets=buckets)
    with torch.no_grad():
        return model(x), model.last_routing.clone()


def split_batch(model, share: float, n: int = 12, seed: int = 1):
    """n images of which `share` go to expert 0 at the first MoE layer (the others to expert 1)."""
    x = torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    _, routes = run(model, x, "sparse")
    first = routes[:, 0]
    zero, one = x[first == 0], x[first == 1]
    take = round(share * n)
    assert len(zero) >= take and len(one) >= n - take, "the calibrated router should use both experts"
    return torch.cat([zero[:take], one[:n - take]])


# (share of the batch routed to expert 0, capacity buckets): (4, 8, 16) holds the largest group
# of a 12-image batch; (2, 4) does not, so the batch is the capacity, as it is with no buckets.
# A 50/50 split is the calibrated router's own (the graphed and ONNX tests below).
SPLITS = [(0.75, (4, 8, 16)), (0.75, (2, 4)), (1.0, ())]


@pytest.mark.parametrize("name", MOE_MODELS)
@pytest.mark.parametrize("router", ROUTERS)
def test_static_equals_sparse(name, router):
    model = calibrated_model(name, router)
    for share, buckets in SPLITS:
        x = split_batch(model, share)
        sparse, sparse_routes = run(model, x, "sparse")
        static, static_routes = run(model, x, "static", buckets)
        assert torch.equal(static_routes, sparse_routes), (share, buckets)
        assert same(static, sparse), (share, buckets)


@pytest.mark.parametrize("router", ROUTERS)
def test_static_equals_sparse_for_top2_of_3_experts_and_one_expert_for_all(router):
    model = calibrated_model("moe_resnet18", router, top_k=2, num_experts=3)
    x = torch.rand(9, 3, 32, 32)
    for forced in (None, 1):
        if forced is not None:
            force_routing(model, forced)
        sparse, _ = run(model, x, "sparse")
        static, _ = run(model, x, "static", (4,))
        assert same(static, sparse)


def test_the_capacity_is_the_smallest_bucket_that_holds_the_largest_group():
    experts = torch.tensor([[0], [0], [0], [1], [0]])
    assert capacity_for(experts, 2, (2, 4, 8)) == 4
    assert capacity_for(experts, 2, (2, 3)) == 5  # none holds 4: the batch
    y = capacity_dispatch(torch.arange(5.0)[:, None], experts, 2, lambda rows, e: rows * (10 if e else 1), capacity=4)
    assert y.flatten().tolist() == [0, 1, 2, 30, 4]


def test_an_empty_batch_gives_empty_logits():
    model = calibrated_model("moe_resnet18", "shared")
    logits, routes = run(model, torch.rand(0, 3, 32, 32), "static")
    assert logits.shape == (0, 10) and routes.shape[0] == 0


@pytest.mark.parametrize("router", ["shared"])  # per-layer gates' static dispatch: test_static_equals_sparse
def test_the_static_onnx_graph_has_no_nonzero_and_matches_eager(router, tmp_path):
    import onnx

    from export.graph import export_onnx, onnx_runner

    model = calibrated_model("moe_resnet18", router)
    advmoe.set_execution(model, "static", channels_last=False)
    path = export_onnx(model, tmp_path / "static.onnx")
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert not ops & {"NonZero", "ScatterND", "If", "Loop"}, ops
    runner = onnx_runner(path, threads=1)
    for share in (0.5, 1.0):
        x = split_batch(model, share, n=10)
        expected, expected_routes = run(model, x, "sparse")
        logits, routes = runner(x)
        assert (routes == expected_routes.numpy()).all()
        assert abs(logits - expected.numpy()).max() <= 1e-4


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("capacity_buckets", [(), (4, 8)], ids=["batch", "buckets"])
def test_the_graphed_model_pads_each_batch_to_its_bucket_and_gives_the_sparse_answer(router, capacity_buckets):
    """On a CPU the graphs' shapes run eagerly: batches of 1, 5 and 11 padded to the buckets 1, 8
    and 16, a batch of 40 cut into pieces of the largest bucket."""
    from advmoe.graphs import GraphedModel

    model = calibrated_model("moe_resnet18", router)
    x = split_batch(model, 0.5, n=40)
    expected, expected_routes = run(model, x, "sparse")
    graphed = GraphedModel(model, batch_buckets=(1, 8, 16), capacity_buckets=capacity_buckets)
    assert model.execution == "static"
    for batch in (1, 5, 11, 40):
        logits, routes = graphed(x[:batch])
        assert logits.shape[0] == routes.shape[0] == batch
        assert torch.equal(routes, expected_routes[:batch]) and same(logits, expected[:batch])


def test_bf16_experts_keep_the_float32_routes():
    from advmoe.graphs import GraphedModel

    model = calibrated_model("moe_resnet18", "shared")
    x = split_batch(model, 0.5, n=16)
    expected, expected_routes = run(model, x, "sparse")
    logits, routes = GraphedModel(model, batch_buckets=(16,), expert_dtype=torch.bfloat16)(x)
    assert torch.equal(routes, expected_routes)  # the router ran in float32
    assert logits.dtype == torch.float32 and not same(logits, expected)  # the experts did not
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
