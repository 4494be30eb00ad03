"""One optimisation step per method, on one code path (docs/method.md).

Each method takes the `Step` context (model, attack settings, optimisers) and a batch, and
returns the losses it optimised. `METHODS` is the one table of methods: each entry names its
step, its parameter groups ("all": one optimiser; "experts" and "router": AdvMoE's two, also
used by router-only), how many PGD runs it crafts per batch, and whether it needs a MoE model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from advmoe.attacks import Objective, cross_entropy, kl, kl_div, pgd, router_kl
from advmoe.calibrate import routers
from advmoe.route_attacks import forced_route, steered

if TYPE_CHECKING:  # config.py reads the method table
    from .config import TrainConfig


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Step:
    model: nn.Module  # the model itself: attacks and router scores
    cfg: "TrainConfig"
    optimizers: dict[str, torch.optim.Optimizer]
    forward: nn.Module | None = None  # what the losses run through (a DDP wrapper, or the model)
    autocast: Callable = field(default=lambda: torch.autocast("cpu", enabled=False))
    scaler: torch.amp.GradScaler | None = None
    distributed: bool = False  # under torchrun (any number of ranks): `forward` is DistributedDataParallel

    def __post_init__(self):
        if self.forward is None:  # not `or`: a torch.compile'd module refuses bool() (it has no len())
            self.forward = self.model
        self.params = {g: [p for group in o.param_groups for p in group["params"]] for g, o in self.optimizers.items()}

    def attack(self, x: Tensor, objective) -> Tensor:
        """Adversarial examples of the current model, crafted in eval mode (BatchNorm running
        statistics, as TRADES does), through the straight-through router."""
        self.model.eval()
        x_adv = pgd(self.model, x, objective, self.cfg.eps, self.cfg.attack_step, self.cfg.attack_steps,
                    start=self.cfg.attack_start)
        self.model.train()
        return x_adv

    def update(self, group: str, loss: Tensor, through_forward: bool = True) -> float:
        """One optimiser step of `group` on `loss`.

        One process: the backward runs only as far as the group's parameters need (the expert
        step does not backpropagate into the router, the router step computes no expert weight
        gradients). Under DDP the backward is complete, as DDP expects a gradient for every
        parameter of a forward through it; a loss that did not run through the DDP wrapper
        (through_forward=False: the shared router alone) has its gradients averaged here."""
        if not torch.isfinite(loss):
            raise Diverged(f"the {group} loss is {loss.item()}")
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        if self.distributed and through_forward:
            scaled.backward()
        else:
            params = self.params[group]
            for p, g in zip(params, torch.autograd.grad(scaled, params, allow_unused=True)):
                p.grad = g
            if self.distributed:
                _average_across_processes(params)
        if self.scaler is not None:
            self.scaler.step(self.optimizers[group])
            self.scaler.update()
        else:
            self.optimizers[group].step()
        return loss.item()

    # -- losses ------------------------------------------------------------------------------
    def clean_loss(self, x: Tensor, y: Tensor) -> Tensor:
        with self.autocast():
            return F.cross_entropy(self.forward(x), y) + self.balance_loss()

    def trades_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """CE(f(x), y) + beta * KL(f(x) || f(x'))."""
        with self.autocast():
            logits = self.forward(x)
            balance = self.balance_loss()
            return F.cross_entropy(logits, y) + self.cfg.beta * kl_div(self.forward(x_adv), F.softmax(logits, 1)) + balance

    # -- the expert loss of the alternating methods (AdvMoE, route-aware) ------------------------
    def expert_loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """What the expert step minimises: TRADES' loss (the reference code's), or Madry's
        CE(f(x'), y) as PGD-AT's (--expert-loss ce)."""
        if self.cfg.expert_loss == "ce":
            return self.clean_loss(x_adv, y)
        return self.trades_loss(x, x_adv, y)

    def expert_objective(self, y: Tensor, p: Tensor, router: Tensor | None = None) -> Objective:
        """What the training attack maximises, to match the expert loss: the KL to the clean
        output p, or the cross-entropy; plus the router's KL when `router` (its clean logits) is given."""
        return cross_entropy(y, router) if self.cfg.expert_loss == "ce" else kl(p, router)

    def expert_loss_per_example(self, logits: Tensor, y: Tensor, p: Tensor) -> Tensor:
        if self.cfg.expert_loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return kl_per_example(logits, p)

    def balance_loss(self, scores: Tensor | None = None) -> Tensor:
        """Switch-Transformer load balancing on router scores (default: those of the last
        forward): N * sum_e (share of samples routed to e) * (mean score of e); 1 when balanced."""
        if not self.cfg.balance_weight:
            return torch.zeros(())
        scores = self.model.router_scores if scores is None else scores
        if scores is None:
            return torch.zeros(())
        n = scores.shape[-1]
        flat = scores.reshape(-1, n)
        share = F.one_hot(flat.argmax(1), n).float().mean(0)
        return self.cfg.balance_weight * n * (share * flat.mean(0)).sum()

    def clean_targets(self, x: Tensor, with_router: bool) -> tuple[Tensor, Tensor | None]:
        """Softmax outputs (and router logits) on clean inputs: the attack's KL anchors."""
        self.model.eval()
        with torch.no_grad():
            p = F.softmax(self.model(x), 1)
            router = self.model.router_logits if with_router else None
        self.model.train()
        return p, router

    @contextmanager
    def backbone_statistics_kept(self) -> Iterator[None]:
        """The backbone's BatchNorm layers normalise with batch statistics but leave their
        running statistics alone: a router step, which runs the backbone only to reach the
        gates, must not move the experts' state onto its adversarial inputs. The shared
        router's own BatchNorm keeps training as usual."""
        in_routers = {id(m) for r in routers(self.model) for m in r.modules()}
        norms = [m for m in self.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in in_routers]
        for m in norms:
            m.track_running_stats = False  # train mode: batch statistics, running ones not passed, not updated
        try:
            yield
        finally:
            for m in norms:
                m.track_running_stats = True


def _average_across_processes(params: list[nn.Parameter]) -> None:
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def standard(s: Step, x: Tensor, y: Tensor) -> dict:
    return {"loss": s.update("all", s.clean_loss(x, y))}


def pgd_at(s: Step, x: Tensor, y: Tensor) -> dict:
    x_adv = s.attack(x, cross_entropy(y))
    return {"loss": s.update("all", s.clean_loss(x_adv, y))}


def trades(s: Step, x: Tensor, y: Tensor) -> dict:
    """TRADES; for a MoE model trained jointly with one optimiser this is MoE-AT."""
    p, _ = s.clean_targets(x, with_router=False)
    x_adv = s.attack(x, kl(p))
    return {"loss": s.update("all", s.trades_loss(x, x_adv, y))}


def router_only(s: Step, x: Tensor, y: Tensor) -> dict:
    """Robust router, standard experts: experts on clean data, router against PGD."""
    expert_loss = s.update("experts", s.clean_loss(x, y))
    p, r = s.clean_targets(x, with_router=True)
    x_adv = s.attack(x, kl(p, r))
    with s.backbone_statistics_kept():
        router_loss = s.trades_loss(x, x_adv, y)
    return {"loss": expert_loss, "router_loss": s.update("router", router_loss)}


def advmoe(s: Step, x: Tensor, y: Tensor) -> dict:
    """Router-expert alternating adversarial training: an expert step, then a router step,
    each against adversarial examples of the current model (outputs and routing)."""
    return alternate(s, x, y, advmoe_attack)


def advmoe_attack(s: Step, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
    """AdvMoE's training attack: the perturbation that moves outputs and routing most."""
    p, r = s.clean_targets(x, with_router=True)
    return s.attack(x, s.expert_objective(y, p, r)), {}


def route_aware(s: Step, x: Tensor, y: Tensor) -> dict:
    """AdvMoE whose training attack a change of route cannot hide (docs/method.md)."""
    return alternate(s, x, y, route_aware_attack)


def route_aware_attack(s: Step, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
    """Per example, the worse of two candidates on the real model (the larger adversarial term of
    the expert loss: KL(f(x) || f(x')), or CE(f(x'), y)): AdvMoE's attack through the router, and
    a route-fixed attack that forces the route each example's router would switch to first (its
    runner-up expert), maximises that term on the sub-network, and steers the real router there."""
    p, r = s.clean_targets(x, with_router=True)
    through = s.attack(x, s.expert_objective(y, p, r))
    preference = F.log_softmax(r, -1)
    if preference.dim() == 3:  # per-layer gates: the expert they prefer second on average
        preference = preference.mean(1)
    runner_up = preference.topk(2, dim=1).indices[:, 1]
    with forced_route(s.model, runner_up) as real:
        flipped = s.attack(x, steered(s.expert_objective(y, p), runner_up, real, s.cfg.steer))
    s.model.eval()
    with torch.no_grad():
        through_loss, flipped_loss = (s.expert_loss_per_example(s.model(c), y, p) for c in (through, flipped))
    s.model.train()
    worse = flipped_loss > through_loss
    return torch.where(worse[:, None, None, None], flipped, through), {"route_fixed_share": worse.float().mean().item()}


def kl_per_example(logits: Tensor, p: Tensor) -> Tensor:
    return F.kl_div(F.log_softmax(logits, 1), p, reduction="none").sum(1)


def alternate(s: Step, x: Tensor, y: Tensor, craft: Callable[[Step, Tensor, Tensor], tuple[Tensor, dict]]) -> dict:
    """The expert step, then the router step, on adversarial examples from `craft` (crafted
    again against the updated experts for the router step, unless --no-recraft)."""
    x_adv, stats = craft(s, x, y)
    expert_loss = s.update("experts", s.expert_loss(x, x_adv, y))
    if s.cfg.recraft:  # the reference re-crafts against the updated experts
        x_adv, _ = craft(s, x, y)
    if s.cfg.router_loss == "model":
        with s.backbone_statistics_kept():  # reaches the router through the straight-through gate
            router_loss = s.update("router", s.expert_loss(x, x_adv, y))
    else:
        router_loss = reference_router_step(s, x, x_adv, y)
    return {"loss": expert_loss, "router_loss": router_loss, **stats}


def reference_router_step(s: Step, x: Tensor, x_adv: Tensor, y: Tensor) -> float:
    """The reference code's router loss, alpha * CE(router(x), y mod N) + beta * KL(router(x') ||
    router(x)), from the router logits. The shared router runs alone on x and x', as in the
    reference code: no backbone forward, so no backbone BatchNorm update. Per-layer gates sit
    inside the backbone, which runs to reach them with its running statistics kept."""
    if s.model.router is not None:
        with s.autocast():
            clean, adv = s.model.shared_router_logits(x), s.model.shared_router_logits(x_adv)
        balance = s.balance_loss(clean.softmax(1))
    else:
        with s.autocast(), s.backbone_statistics_kept():
            logits = s.forward(x)
            clean = s.model.router_logits
            balance = s.balance_loss()
            logits_adv = s.forward(x_adv)
            adv = s.model.router_logits
        # The loss does not use the logits; a zero term on them gives every parameter a (zero)
        # gradient, which DistributedDataParallel expects after a forward through it.
        balance = balance + 0.0 * (logits.sum() + logits_adv.sum())
    n = clean.shape[-1]
    flat = clean.reshape(len(y), -1, n)  # [B, decisions, N]
    target = (y % n)[:, None].expand(-1, flat.shape[1]).reshape(-1)
    ce = F.cross_entropy(flat.reshape(-1, n), target)
    loss = s.cfg.alpha * ce + s.cfg.beta * router_kl(adv, clean) + balance
    return s.update("router", loss, through_forward=s.model.router is None)


@dataclass(frozen=True)
class Method:
    name: str
    step: Callable[[Step, Tensor, Tensor], dict]
    groups: tuple[str, ...]  # the optimisers, in the order the step updates them
    attacks: int  # PGD runs crafted per batch
    moe_only: bool
    help: str
    recrafts: int = 0  # more PGD runs for the router step, unless the config says --no-recraft
    forces_routes: bool = False  # part of its attack runs on a forced route, where only the chosen experts run
    label: str = ""  # how tables and plots name it ("AdvMoE"); the name when empty

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)  # frozen: set once, here

    def attack_steps(self, cfg: "TrainConfig") -> int:
        """PGD steps per training batch."""
        return (self.attacks + (self.recrafts if cfg.recraft else 0)) * cfg.attack_steps


# the methods whose expert step --expert-loss chooses (the others' loss is their method's)
ALTERNATING = ("advmoe", "route-aware")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("standard", standard, ("all",), 0, False, "cross-entropy on clean inputs (no robustness)"),
    Method("pgd-at", pgd_at, ("all",), 1, False, "Madry PGD adversarial training, one optimiser", label="PGD-AT"),
    Method("trades", trades, ("all",), 1, False, "TRADES: clean CE + beta * KL(adversarial || clean)", label="TRADES"),
    Method("moe-at", trades, ("all",), 1, True, "TRADES on the whole MoE model with one optimiser (the paper's MoE-AT)",
           label="MoE-AT"),
    Method("router-only", router_only, ("experts", "router"), 1, True,
           "robust router, standard experts: shows routers alone are not enough"),
    Method("advmoe", advmoe, ("experts", "router"), 1, True,
           "AdvMoE: expert step and router step in turn, each against fresh adversarial examples", recrafts=1,
           label="AdvMoE"),
    Method("route-aware", route_aware, ("experts", "router"), 2, True,
           "AdvMoE on the worse per example of its attack and a route-fixed attack on the runner-up route",
           recrafts=2, forces_routes=True, label="route-aware AT"),
)}
