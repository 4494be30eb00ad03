"""Top-k gating with a straight-through estimator.

The forward pass uses a hard choice (one-hot for top-1); the backward pass sends the gradient
straight through to the router, in one of two ways (`GATE_GRADS`, docs/method.md):

- "softmax" (our default): the gradient of every expert's gate weight goes to the softmax
  scores, and through the softmax to every logit;
- "chosen" (the reference code's): only the chosen expert's gate weight passes its gradient,
  to the chosen expert's logit, unchanged; the other logits get none.

Without it the router gets no gradient and neither do attacks through it (gradient masking).
"none" is that on purpose: the attacks then follow the experts' gradient along each input's
route, which tells what the surrogate adds to (or takes from) an attack.
All three send the same forward pass, so masked and sparse execution agree under any.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .usage import share_of_counts

GATE_GRADS = {
    "softmax": "straight through to the softmax scores: every expert's logit gets a gradient (ours)",
    "chosen": "straight through to the chosen expert's logit only (the reference code)",
    "none": "no gradient to the router: to a gradient attack the route each input takes is a constant (to "
            "measure what the straight-through surrogate adds to an attack; training needs the reference router loss)",
}


@dataclass
class Route:
    """The routing decision of one batch for one MoE layer (or all layers, shared router)."""

    experts: Tensor  # LongTensor [B, k]: chosen experts, best first
    weights: Tensor  # [B, N]: gate weights, zero for unchosen experts; differentiable
    scores: Tensor  # [B, N]: softmax of the router logits
    logits: Tensor | None = None  # [B, N]: the router logits (router losses and attacks take log_softmax of these)

    @property
    def top1(self) -> Tensor:
        return self.experts[:, 0]


@dataclass
class SortedRoute:
    """A top-1 route for a batch sorted by expert (`sort_by_expert`): expert e's rows are the
    e-th of `counts` consecutive slices of every activation, so each MoE layer runs each expert
    on its own rows only, a slice rather than a gather. What masked execution passes the backbone when
    the gradient needs no unchosen expert's output (`needs_every_expert`)."""

    counts: list[int]  # rows per expert, in expert order
    gain: Tensor  # [B, 1]: the chosen expert's gate weight per sorted row; 1 forward, differentiable


def needs_every_expert(top_k: int, grad: str, gate_learns: bool = True) -> bool:
    """Whether the backward pass needs every expert's output, not only the chosen one's. Under
    "softmax" the gradient of an unchosen expert's gate weight is that expert's output against
    the output gradient; under "chosen" and "none" (top-1) it is dropped, so computing only the
    chosen experts gives the same values and the same gradients at a fraction of the work.
    `gate_learns`: whether the gate weights carry a gradient at all; a route an attack forced or
    detached (advmoe.route_attacks) does not, and then no gate option needs the unchosen experts."""
    return top_k > 1 or (grad == "softmax" and gate_learns)


def sort_by_expert(gate: Route, num_experts: int) -> tuple[Tensor, SortedRoute]:
    """The order that sorts a top-1 batch by expert, and the route of the sorted batch."""
    order = gate.top1.argsort(stable=True)
    counts = gate.top1.bincount(minlength=num_experts).tolist()
    gain = gate.weights.gather(1, gate.experts).index_select(0, order)
    return order, SortedRoute(counts=counts, gain=gain)


class _StraightThroughOneHot(torch.autograd.Function):
    """Forward: exact one-hot of `index`. Backward: the gradient goes to `source` unchanged."""

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor) -> Tensor:
        return torch.zeros_like(source).scatter_(1, index, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ChosenOnlyOneHot(torch.autograd.Function):
    """Forward: exact one-hot of `index`. Backward: the chosen entry's gradient goes to the same
    entry of `source`; the other entries get zero."""

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        return torch.zeros_like(source).scatter_(1, index, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, = ctx.saved_tensors
        return torch.zeros_like(grad).scatter_(1, index, grad.gather(1, index)), None


def route(logits: Tensor, top_k: int = 1, grad: str = "softmax") -> Route:
    """Choose `top_k` experts per sample from router logits [B, N].

    The choice is made on the logits, not on the softmax, so that masked and sparse execution
    (which skips the softmax) break near-ties the same way. `grad` (top-1 only) is where the
    straight-through gradient goes: see `GATE_GRADS`.
    """
    if grad not in GATE_GRADS:
        raise ValueError(f"gate grad must be one of {tuple(GATE_GRADS)}, got {grad!r}")
    experts = logits.topk(top_k, dim=1).indices
    scores = logits.softmax(dim=1)
    if top_k == 1 and grad == "chosen":
        weights = _ChosenOnlyOneHot.apply(logits, experts)
    elif top_k == 1 and grad == "none":
        weights = torch.zeros_like(scores).scatter_(1, experts, 1.0).detach()
    elif top_k == 1:
        weights = _StraightThroughOneHot.apply(scores, experts)
    else:
        # Gate-weighted sum of the chosen experts; weights renormalised to sum to one, which
        # keeps BatchNorm folding exact (see MoEConv2d).
        chosen = scores.gather(1, experts)
        weights = torch.zeros_like(scores).scatter(1, experts, chosen / chosen.sum(1, keepdim=True))
    return Route(experts=experts, weights=weights, scores=scores, logits=logits)


def expert_share(routing: Tensor, num_experts: int) -> list[float]:
    """Share of the routing decisions (samples x MoE layers, `last_routing`) that went to each
    expert: what training logs, `advmoe eval` reports and collapse checks read."""
    return share_of_counts(routing.flatten().bincount(minlength=num_experts).tolist(), num_experts)
