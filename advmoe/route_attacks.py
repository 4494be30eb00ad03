"""Attacks on the routing of a MoE model, in pixel space like `attacks.pgd` (docs/method.md, Evaluation).

PGD through the straight-through gate sees the route only through a surrogate gradient. Two
attacks do not rely on it:

- route-fixed: force every router to send every sample to expert e (a forward hook replaces
  the router logits, the weights are untouched), attack that fixed sub-network, and push the
  real router towards e at the same time (`steer`), so that the example the attack makes is
  also one the real model routes to e. Whether it fools the real model is decided by the caller
  on the unforced model: an example made for a forced route is not an attack on the real model
  until the real router has been run on it.
- router attack: maximise KL(router(x) || router(x')), the change of the route itself (from the
  router logits, so a saturated router still gives a gradient).

`detached_routers` runs the usual routes with no gradient through the routers (plain argmax):
the model that masks gradients, for the sanity check that the straight-through gate passes one.
All of these need masked execution, the path that carries gradients.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import Objective, cross_entropy, pgd, router_kl
from .calibrate import routers

FORCED_LOGIT = 30.0  # softmax(+-30) is one-hot to float precision: no gradient reaches the route


def _checked_routers(model: nn.Module) -> list[nn.Module]:
    found = routers(model)
    if not found:
        raise ValueError("the model has no router (a dense model): route attacks do not apply")
    if getattr(model, "execution", "masked") != "masked":
        raise ValueError("route attacks need masked execution (set_execution(model, 'masked')): "
                         "the sparse path carries no gradient through the gate")
    return found


@contextmanager
def _router_hook(model: nn.Module, hook) -> Iterator[None]:
    handles = [r.register_forward_hook(hook) for r in _checked_routers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def forced_route(model: nn.Module, expert: int | Tensor) -> Iterator[list[Tensor]]:
    """While the block runs, every router sends every sample to `expert`: one expert for the
    whole batch (an int), or one per sample (a LongTensor [B], e.g. the route each sample's
    router would switch to first). Yields a list that receives, at each router call, the logits
    the router computed (with their gradient), so an objective can use where the real model
    would have routed; the caller clears it."""
    n = _checked_routers(model)[0].fc.out_features
    per_sample = isinstance(expert, Tensor)
    out_of_range = bool(((expert < 0) | (expert >= n)).any()) if per_sample else not 0 <= expert < n
    if out_of_range:
        raise ValueError(f"expert {expert} out of range for {n} experts")
    real: list[Tensor] = []

    def hook(module, args, logits):
        real.append(logits)
        forced = torch.full_like(logits, -FORCED_LOGIT).detach()
        if per_sample:
            forced.scatter_(1, expert.view(-1, 1).to(logits.device), FORCED_LOGIT)
        else:
            forced[:, expert] = FORCED_LOGIT
        return forced

    with _router_hook(model, hook):
        yield real


@contextmanager
def detached_routers(model: nn.Module) -> Iterator[None]:
    """The same routes as usual, but no gradient flows through any router (plain argmax)."""
    with _router_hook(model, lambda module, args, logits: logits.detach()):
        yield


def steered(objective: Objective, expert: int | Tensor, real_logits: list[Tensor], steer: float = 1.0) -> Objective:
    """`objective` on the model with its route forced to `expert` (inside `forced_route`, whose
    list is `real_logits`), plus `steer` times the mean log-probability that the real routers
    choose `expert`: the example it makes should also be one the real model routes there."""

    def steered_objective(model, x_adv):
        real_logits.clear()
        loss = objective(model, x_adv)
        if steer:
            loss = loss + steer * torch.stack([_log_prob(l, expert).mean() for l in real_logits]).mean()
        return loss

    return steered_objective


def _log_prob(logits: Tensor, expert: int | Tensor) -> Tensor:
    log_p = F.log_softmax(logits, 1)
    return log_p[:, expert] if not isinstance(expert, Tensor) else log_p.gather(1, expert.view(-1, 1)).squeeze(1)


def route_fixed_objective(y: Tensor, expert: int | Tensor, real_logits: list[Tensor], steer: float = 1.0) -> Objective:
    """Cross-entropy of the model with its route forced to `expert`, steered (see `steered`)."""
    return steered(cross_entropy(y), expert, real_logits, steer)


def route_fixed_pgd(model: nn.Module, x: Tensor, y: Tensor, expert: int, eps: float, step: float, steps: int,
                    steer: float = 1.0) -> Tensor:
    """PGD (linf) on the model with every route forced to `expert`; see `route_fixed_objective`."""
    with forced_route(model, expert) as real:
        return pgd(model, x, route_fixed_objective(y, expert, real, steer), eps, step, steps)


def router_pgd(model: nn.Module, x: Tensor, eps: float, step: float, steps: int) -> Tensor:
    """PGD (linf) maximising the KL between the router scores at x' and at x (every router)."""
    _checked_routers(model)
    with torch.no_grad():
        model(x)
        clean = model.router_logits.detach()

    def objective(m, x_adv):
        m(x_adv)
        return router_kl(m.router_logits, clean)

    return pgd(model, x, objective, eps, step, steps)
