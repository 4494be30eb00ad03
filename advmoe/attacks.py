"""PGD in pixel space ([0, 1] inputs, eps in pixel units), used by training and evaluation.

The attack differentiates through the model as it runs in masked execution, where the
straight-through gate passes gradients to the router: routing does not hide the gradient.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Objective = Callable[[nn.Module, Tensor], Tensor]  # (model, x_adv) -> scalar to maximise
NORMS = ("linf", "l2")
STARTS = {
    "uniform": "uniform in the eps-ball (Madry; what evaluation uses)",
    "normal": "x + 0.001 * N(0, 1), as TRADES and the reference code's training attack",
}
NORMAL_START_STD = 0.001


def check_eps(eps: float, norm: str = "linf") -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "linf" and not 0 < eps <= 1:
        hint = f" (did you mean {eps:g}/255 = {eps / 255:.4f}?)" if eps > 1 else ""
        raise ValueError(f"eps={eps:g} must be in (0, 1]: inputs are pixels in [0, 1]{hint}")
    if norm == "l2" and eps <= 0:
        raise ValueError(f"eps={eps:g} must be positive")


def pgd(model: nn.Module, x: Tensor, objective: Objective, eps: float, step: float, steps: int,
        norm: str = "linf", random_start: bool = True, start: str = "uniform") -> Tensor:
    """Projected gradient ascent on `objective` within the eps-ball around x, kept in [0, 1].
    Only the input gets gradients; the model's parameter gradients are left untouched.

    random_start=False starts at x itself; otherwise `start` (see STARTS): "uniform" in the ball,
    or "normal", TRADES' x + 0.001 * N(0, 1), which starts next to x so that the first steps
    (of sign size `step`) move every pixel the same distance."""
    check_eps(eps, norm)
    if start not in STARTS:
        raise ValueError(f"start must be one of {tuple(STARTS)}, got {start!r}")
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start and start == "normal":
        delta = NORMAL_START_STD * torch.randn_like(x)
        delta = delta.clamp(-eps, eps) if norm == "linf" else _project_l2(delta, torch.full_like(x[:, 0, 0, 0], eps))
    elif random_start:
        if norm == "linf":
            delta.uniform_(-eps, eps)
        else:
            delta = _project_l2(torch.randn_like(x), eps * torch.rand(x.shape[0], device=x.device))
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(objective(model, x_adv), x_adv)
        with torch.no_grad():
            if norm == "linf":
                x_adv = x_adv + step * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            else:
                x_adv = x + _project_l2(x_adv - x + step * _unit_l2(grad), torch.full_like(x[:, 0, 0, 0], eps))
            x_adv = x_adv.clamp(0, 1)
    return x_adv.detach()


def _unit_l2(g: Tensor) -> Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def _project_l2(delta: Tensor, radius: Tensor) -> Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (radius / norms).clamp(max=1.0).view(-1, 1, 1, 1)


# -- objectives -------------------------------------------------------------------------------
def cross_entropy(y: Tensor, router_clean: Tensor | None = None) -> Objective:
    """Madry's PGD: maximise the classification loss; with `router_clean` (the router logits at
    x), also the router's KL, as `kl` does."""
    return _with_router(lambda logits: F.cross_entropy(logits, y), router_clean)


def kl(p_clean: Tensor, router_clean: Tensor | None = None) -> Objective:
    """TRADES: maximise KL(f(x) || f(x')); with `router_clean` (the router logits at x), also
    the router's KL (AdvMoE: the perturbation that moves outputs and routing most)."""
    return _with_router(lambda logits: kl_div(logits, p_clean), router_clean)


def _with_router(output_loss: Callable[[Tensor], Tensor], router_clean: Tensor | None) -> Objective:
    def objective(model, x_adv):
        loss = output_loss(model(x_adv))
        if router_clean is not None:
            loss = loss + router_kl(model.router_logits, router_clean)
        return loss

    return objective


def kl_div(logits_adv: Tensor, p_clean: Tensor) -> Tensor:
    """KL(p_clean || softmax(logits_adv)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean, reduction="batchmean")


def router_kl(logits_adv: Tensor, logits_clean: Tensor) -> Tensor:
    """KL(softmax(logits_clean) || softmax(logits_adv)) between router decisions ([B, N] or
    [B, layers, N] router logits, `model.router_logits`), averaged per decision. Computed from
    log_softmax: its gradient does not vanish when a router is saturated (a confident route),
    where the log of a clamped softmax has none."""
    n = logits_adv.shape[-1]
    adv, clean = logits_adv.reshape(-1, n), logits_clean.reshape(-1, n)
    return F.kl_div(F.log_softmax(adv, 1), F.log_softmax(clean, 1), reduction="batchmean", log_target=True)


@torch.no_grad()
def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()
