import pytest
import torch
import torch.nn.functional as F

from advmoe.gate import route
from advmoe.layers import MoEConv2d


@pytest.mark.parametrize("norm", [True, False])
def test_moe_conv_outputs_the_chosen_experts_slice_of_one_weight(norm):
    conv = MoEConv2d(4, 6, 3, stride=2, norm=norm, num_experts=3).eval()
    assert conv.weight.shape == (18, 4, 3, 3)
    x = torch.rand(5, 4, 9, 9)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [0, 5.0, 0], [5.0, 0, 0]])
    out = conv(x, route(logits))
    assert out.shape == (5, 6, 5, 5)
    for i, e in enumerate(logits.argmax(1).tolist()):
        expected = F.conv2d(x[i : i + 1], conv.weight[e * 6 : (e + 1) * 6], stride=2, padding=1)
        if norm:
            expected = conv.norm(expected)
        torch.testing.assert_close(out[i : i + 1], expected)


def test_per_layer_gate_routes_on_the_layer_input():
    conv = MoEConv2d(4, 6, 3, num_experts=2, gate=True)
    out = conv(torch.rand(3, 4, 8, 8))
    assert out.shape == (3, 6, 8, 8) and conv.last_route.experts.shape == (3, 1)


def test_moe_conv_without_a_route_says_what_to_do():
    with pytest.raises(ValueError, match="needs a route"):
        MoEConv2d(4, 6, 3, num_experts=2)(torch.rand(1, 4, 8, 8))
    with pytest.raises(RuntimeError, match="needs sparse execution"):
        MoEConv2d(4, 6, 3, num_experts=2)(torch.rand(1, 4, 8, 8), 1)
