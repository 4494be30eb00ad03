"""Top-k gating with a straight-through estimator.

The forward pass uses a hard choice (one-hot for top-1); the backward pass sends the gradient
straight to the softmax scores. Without it the router gets no gradient and neither do attacks
through it (gradient masking), see docs/method.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Route:
    """The routing decision of one batch for one MoE layer (or all layers, shared router)."""

    experts: Tensor  # LongTensor [B, k]: chosen experts, best first
    weights: Tensor  # [B, N]: gate weights, zero for unchosen experts; differentiable
    scores: Tensor  # [B, N]: softmax of the router logits (what router losses and attacks use)

    @property
    def top1(self) -> Tensor:
        return self.experts[:, 0]


class _StraightThroughOneHot(torch.autograd.Function):
    """Forward: exact one-hot of `index`. Backward: the gradient goes to `scores` unchanged."""

    @staticmethod
    def forward(ctx, scores: Tensor, index: Tensor) -> Tensor:
        return torch.zeros_like(scores).scatter_(1, index, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def route(logits: Tensor, top_k: int = 1) -> Route:
    """Choose `top_k` experts per sample from router logits [B, N].

    The choice is made on the logits, not on the softmax, so that masked and sparse execution
    (which skips the softmax) break near-ties the same way.
    """
    experts = logits.topk(top_k, dim=1).indices
    scores = logits.softmax(dim=1)
    if top_k == 1:
        weights = _StraightThroughOneHot.apply(scores, experts)
    else:
        # Gate-weighted sum of the chosen experts; weights renormalised to sum to one, which
        # keeps BatchNorm folding exact (see MoEConv2d).
        chosen = scores.gather(1, experts)
        weights = torch.zeros_like(scores).scatter(1, experts, chosen / chosen.sum(1, keepdim=True))
    return Route(experts=experts, weights=weights, scores=scores)


def expert_share(routing: Tensor, num_experts: int) -> list[float]:
    """Share of the routing decisions (samples x MoE layers, `last_routing`) that went to each
    expert: what training logs, `advmoe eval` reports and collapse checks read."""
    counts = routing.flatten().bincount(minlength=num_experts).float()
    return (counts / max(1, routing.numel())).tolist()
