import pytest
import torch

from advmoe.gate import route


def test_top1_forward_is_an_exact_one_hot():
    logits = torch.tensor([[0.3, 2.0], [1.5, -1.0], [0.1, 0.2]])
    r = route(logits, top_k=1)
    assert r.experts.squeeze(1).tolist() == [1, 0, 1]
    assert torch.equal(r.weights, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))


def test_top1_backward_goes_straight_to_the_softmax_scores():
    logits = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    (route(logits, 1).weights * upstream).sum().backward()
    expected = torch.autograd.grad((logits.softmax(1) * upstream).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)
    assert logits.grad.abs().sum() > 0


def test_chosen_gate_grad_goes_to_the_chosen_logit_only():
    logits = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    r = route(logits, 1, grad="chosen")
    assert torch.equal(r.weights, route(logits.detach(), 1).weights)  # the same forward pass
    (r.weights * upstream).sum().backward()
    chosen = torch.zeros(5, 3, dtype=torch.bool).scatter(1, r.experts, True)
    torch.testing.assert_close(logits.grad[chosen], upstream[chosen])
    assert (logits.grad[~chosen] == 0).all()
    with pytest.raises(ValueError, match="gate grad must be one of"):
        route(logits, 1, grad="nowhere")


def test_route_keeps_the_logits_for_router_losses():
    logits = torch.randn(4, 2)
    r = route(logits)
    assert r.logits is logits
    torch.testing.assert_close(r.scores, logits.softmax(1))


def test_the_none_gate_grad_sends_the_router_nothing_and_routes_the_same():
    logits = torch.randn(5, 3, requires_grad=True)
    r = route(logits, 1, grad="none")
    assert not r.weights.requires_grad  # the route is a constant to whatever differentiates the output
    torch.testing.assert_close(r.weights, route(logits, 1, grad="softmax").weights.detach())


@pytest.mark.parametrize("top_k", [2, 3])
def test_top_k_weights_sum_to_one_over_the_chosen_experts(top_k):
    logits = torch.randn(6, 4, requires_grad=True)
    r = route(logits, top_k)
    assert r.experts.shape == (6, top_k)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(6))
    assert ((r.weights > 0).sum(1) == top_k).all()
    chosen = torch.zeros(6, 4, dtype=torch.bool).scatter(1, r.experts, True)
    assert (r.weights[~chosen] == 0).all()
    r.weights[:, 0].sum().backward()
    assert logits.grad.abs().sum() > 0
