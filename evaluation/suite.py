"""The attacks run on a model (docs/evaluation.md), with an linf budget eps in [0, 1] pixels:

- clean accuracy;
- PGD-k (cross-entropy, random start, step eps / 4 for every k) through the straight-through router;
- AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square; `evaluation.autoattack`);
- route-fixed: for each expert e, PGD on the model with every route forced to e (and the real
  router pushed towards e); each candidate is judged on the real, unforced model, and per
  example the candidate that fools it (else the one with the highest loss) is kept;
- router attack: maximise the change of the router scores; route and prediction flips;
- Square alone (gradient-free), the cross-check for gradient masking.

Every adversarial example is checked to lie in the eps-ball and in [0, 1], and every verdict is
the real model's prediction (sparse execution, the path that is deployed; gradients come from
masked execution, which has the straight-through gate). Robust accuracy is per example: an
example counts only if it is classified correctly clean and under every attack run. Sanity
checks (`evaluation.sanity`) say when the numbers look like gradient masking. Attacks run on one
unit of images at a time, so that the units can be shared out between processes
(`evaluation.sharding`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import advmoe
from advmoe.attacks import cross_entropy, pgd
from advmoe.route_attacks import detached_routers, forced_route, route_fixed_pgd, router_pgd

from . import autoattack
from .document import Clock, Results, build_document
from .sharding import gather, rank_and_world, units

if TYPE_CHECKING:
    from .robustness import EvalSettings

ATTACKS = {
    "pgd": "PGD-K through the straight-through router, one run per K of --pgd-steps",
    "autoattack": "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square",
    "apgd": "APGD-CE, then APGD-T on its survivors (AutoAttack's first two; skipped when autoattack runs)",
    "fab": "FAB-T alone, on every clean-correct example (AutoAttack's third; skipped when autoattack runs)",
    "route-fixed": "PGD with every route forced to each expert in turn, judged on the real model",
    "router": "PGD on the router scores: how often the route (and the prediction) flips",
    "square": "Square alone (gradient-free): the cross-check for gradient masking",
}
ROUTE_ATTACKS = ("route-fixed", "router")
APGD = ("apgd-ce", "apgd-t")


def _linf(x: Tensor, x_adv: Tensor, eps: float, name: str) -> Tensor:
    """Per example linf size of the perturbation; an error if an attack left the threat model."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{name} returned adversarial examples of the wrong shape or with NaN/inf")
    size = (x_adv - x).abs().flatten(1).max(1).values if len(x) else x.new_zeros(0)
    worst = size.max().item() if len(x) else 0.0
    if worst > eps + 1e-5 or x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        raise RuntimeError(f"{name} left the threat model: linf {worst:.6f} > eps {eps:.6f} or pixels outside [0, 1]")
    return size


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy, leaving out the routes a forward pass keeps (graph tensors cannot be copied)."""
    kept = {}
    for m in model.modules():
        for attr in ("last_route", "last_routing"):
            if getattr(m, attr, None) is not None:
                kept[m, attr] = getattr(m, attr)
                setattr(m, attr, None)
    try:
        return copy.deepcopy(model)
    finally:
        for (m, attr), value in kept.items():
            setattr(m, attr, value)


class Evaluator:
    """The attacks, run on one unit of examples at a time; each writes per-example rows.
    attacks: those to run (the model can run them all); kept in the order of the ATTACKS table."""

    def __init__(self, model: nn.Module, settings: EvalSettings, attacks: list[str], bar):
        model = _copy(model).eval()
        model.requires_grad_(False)  # attacks need input gradients only
        self.masked = advmoe.set_execution(model, "masked")
        self.fast = advmoe.set_execution(copy.deepcopy(model), "sparse")
        self.s, self.bar = settings, bar
        self.attacks = [a for a in ATTACKS if a in attacks]
        self.route_attacks = tuple(a for a in ROUTE_ATTACKS if a in attacks)
        self.is_moe = model.cfg.is_moe
        self.shared_router = model.router is not None
        self.gradient_aa = autoattack.STANDARD[:3] if "autoattack" in attacks else ()
        self.cascades = {"autoattack": (*self.gradient_aa, "square"), "apgd": APGD, "fab": ("fab-t",)}

    def stages_per_unit(self) -> int:
        a, s = self.attacks, self.s
        return (1 + len(set(s.pgd_steps)) * ("pgd" in a) + len(self.gradient_aa) + ("square" in a or "autoattack" in a)
                + len(APGD) * ("apgd" in a) + ("fab" in a) + self.masked.cfg.num_experts * ("route-fixed" in a) + ("router" in a))

    # -- helpers --------------------------------------------------------------------------
    def stage(self, text: str) -> None:
        self.bar.set_description(text)

    def done(self) -> None:
        self.bar.update(1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and routing of the real model (sparse execution)."""
        return self.fast.forward_with_routing(x)

    def seed(self, offset: int) -> None:
        """Seeds from the unit's index, so a unit draws the same random starts in any process."""
        torch.manual_seed(self.s.seed * 1000 + offset + 1_000_003 * self.unit)

    def record(self, out: Results, name: str, x: Tensor, x_adv: Tensor, elapsed: tuple[float, float]) -> tuple[Tensor, Tensor]:
        """Judge `x_adv` on the real model and store its per-example rows."""
        out.add(f"{name}/linf", _linf(x, x_adv, self.s.eps, name))
        logits, routing = self.predict(x_adv)
        out.add(f"{name}/pred", logits.argmax(1))
        out.add(f"{name}/routing", routing)
        out.time(name, elapsed)
        return logits, routing

    # -- one unit -------------------------------------------------------------------------
    def unit_results(self, unit: int, x: Tensor, y: Tensor) -> Results:
        self.unit, out = unit, Results()
        self.stage("clean")
        clock = Clock()
        logits, routing = self.predict(x)
        out.add("clean/pred", logits.argmax(1))
        out.add("clean/routing", routing)
        out.time("clean", clock.elapsed())
        self.done()
        if "pgd" in self.attacks:
            self.pgd(out, x, y)
        if "square" in self.attacks or "autoattack" in self.attacks:
            self.cascade(out, x, y, "autoattack", self.gradient_aa, square=True)
        if "apgd" in self.attacks:
            self.cascade(out, x, y, "apgd", APGD, square=False)
        if "fab" in self.attacks:
            self.cascade(out, x, y, "fab", self.cascades["fab"], square=False)
        if "route-fixed" in self.attacks:
            self.route_fixed(out, x, y)
        if "router" in self.attacks:
            self.router(out, x, y)
        return out

    def pgd(self, out: Results, x: Tensor, y: Tensor) -> None:
        step = self.s.step * self.s.eps
        for k in sorted(set(self.s.pgd_steps)):
            self.stage(f"PGD-{k}")
            self.seed(0)  # the same random start for every k: PGD-50 continues where PGD-10 stops
            clock = Clock()
            x_adv = pgd(self.masked, x, cross_entropy(y), self.s.eps, step, k)
            self.record(out, f"pgd-{k}", x, x_adv, clock.elapsed())
            self.done()

    def cascade(self, out: Results, x: Tensor, y: Tensor, name: str, parts: tuple[str, ...],
                square: bool) -> None:
        """AutoAttack components in cascade, each on the survivors of the ones before (as the
        package runs them), recorded as `name`. With `square`, Square then runs once on every
        clean-correct example: the gradient-free cross-check ("square"), and the last component
        of the cascade for the examples still standing."""
        model = autoattack.GradientOrFast(self.masked, self.fast)
        attack = autoattack.make(model, self.s.eps, self.masked.cfg.num_classes, self.s.seed, self.s.square_queries,
                                 self.s.apgd_iterations)
        clean = out.correct("clean", y)
        alive, x_best = clean.clone(), x.clone()

        def run_part(part: str, idx: Tensor) -> tuple[Tensor, tuple[float, float]]:
            self.stage(f"{name} {part.upper()}")
            clock, x_adv = Clock(), x.clone()
            if len(idx):
                x_adv[idx], messages = autoattack.run(attack, part, x[idx], y[idx], self.s.batch_size)
                out.flags.extend(f"{part}: {m}" for m in messages if f"{part}: {m}" not in out.flags)
            self.done()
            return x_adv, clock.elapsed()

        def keep(part: str, attacked: Tensor, x_adv: Tensor, fooled: Tensor, elapsed) -> None:
            x_best[fooled] = x_adv[fooled]
            alive.logical_and_(~fooled)
            out.add(f"{name}/{part}/attacked", attacked)
            out.add(f"{name}/{part}/alive", alive.clone())
            out.time(f"{name}/{part}", elapsed)

        for part in parts:
            attacked = alive.clone()
            x_adv, elapsed = run_part(part, attacked.nonzero().flatten())
            keep(part, attacked, x_adv, (self.predict(x_adv)[0].argmax(1) != y) & alive, elapsed)
        if square:
            x_square, elapsed = run_part("square", clean.nonzero().flatten())
            self.record(out, "square", x, x_square, elapsed)
            if parts:
                out.add(f"{name}-gradient/pred", torch.where(alive, y, -1))  # correct iff no gradient part fooled it
                keep("square", clean.clone(), x_square, alive & ~out.correct("square", y), elapsed)
        if parts:
            self.record(out, name, x, x_best, (0.0, 0.0))  # its time is the sum of its parts

    def route_fixed(self, out: Results, x: Tensor, y: Tensor) -> None:
        k, clock = self.s.route_steps, Clock()
        step = self.s.step * self.s.eps
        best_score = torch.full((len(x),), -math.inf, device=x.device)
        x_best = x.clone()
        for e in range(self.masked.cfg.num_experts):
            self.stage(f"route-fixed, expert {e}")
            self.seed(10_000 + e)
            x_e = route_fixed_pgd(self.masked, x, y, e, self.s.eps, step, k, self.s.steer)
            _linf(x, x_e, self.s.eps, "route-fixed")
            logits, routing = self.predict(x_e)
            fooled = logits.argmax(1) != y
            # fooling the real model first, then the real model's loss: a valid attack on it
            score = F.cross_entropy(logits, y, reduction="none") + 1e6 * fooled
            better = score > best_score
            x_best[better], best_score[better] = x_e[better], score[better]
            with torch.no_grad(), forced_route(self.masked, e):
                out.add(f"route-fixed/{e}/forced_clean", self.masked(x).argmax(1) == y)
                out.add(f"route-fixed/{e}/forced_adversarial", self.masked(x_e).argmax(1) == y)
            out.add(f"route-fixed/{e}/real", ~fooled)
            out.add(f"route-fixed/{e}/routed_to_expert", (routing == e).all(1))
            self.done()
        self.record(out, "route-fixed", x, x_best, clock.elapsed())

    def router(self, out: Results, x: Tensor, y: Tensor) -> None:
        self.stage("router attack")
        self.seed(20_000)
        clock = Clock()
        x_adv = router_pgd(self.masked, x, self.s.eps, self.s.step * self.s.eps, self.s.route_steps)
        self.record(out, "router", x, x_adv, clock.elapsed())
        self.done()

    # -- sanity measurements (one process: few examples) ----------------------------------------
    def sweep(self, x: Tensor, y: Tensor) -> dict:
        eps_values, accuracy = self.s.sweep_eps(), []
        k = min(self.s.pgd_steps)
        x, y = x[: self.s.sweep_examples], y[: self.s.sweep_examples]
        self.unit = 0
        for eps in eps_values:
            self.stage(f"sanity sweep, eps {eps:.3g}")
            self.seed(30_000)
            x_adv = torch.cat([pgd(self.masked, xb, cross_entropy(yb), eps, self.s.step * eps, k)
                               for xb, yb in zip(x.split(self.s.batch_size), y.split(self.s.batch_size))])
            _linf(x, x_adv, eps, "sweep")
            accuracy.append((torch.cat([self.predict(b)[0] for b in x_adv.split(self.s.batch_size)]).argmax(1) == y)
                            .float().mean().item())
            self.done()
        return {"eps": eps_values, "accuracy": accuracy, "examples": len(y), "steps": k}

    def router_gradient(self, x: Tensor, y: Tensor) -> Tensor:
        """Per example: how much the input gradient changes when the routers are detached."""
        self.stage("router gradient check")
        x = x[: self.s.gradient_examples].clone().requires_grad_(True)
        y = y[: self.s.gradient_examples]

        def grad() -> Tensor:
            loss = F.cross_entropy(self.masked(x), y, reduction="sum")
            return torch.autograd.grad(loss, x)[0].flatten(1)

        through = grad()
        with detached_routers(self.masked):
            detached = grad()
        self.done()
        return (through - detached).norm(dim=1) / through.norm(dim=1).clamp_min(1e-12)


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, settings: EvalSettings | None = None,
                   progress: bool | None = None) -> dict | None:
    """Run the suite on a model (any advmoe model, dense or MoE) and examples x in [0, 1], labels y,
    on the model's device. Returns the eval.json document (without the checkpoint fields).
    Under torch.distributed every rank evaluates its share of the units and rank 0 returns the
    document of all of them (the other ranks return None)."""
    if settings is None:
        from .robustness import EvalSettings  # here, not above: robustness imports this module

        settings = EvalSettings()
    settings.validate()
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need as many labels as examples (at least one), got {len(x)} and {len(y)}")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    attacks, skipped = _runnable(settings.attacks, model.cfg.is_moe)
    rank, world = rank_and_world()
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI") and rank == 0
    started = Clock()
    with _gate_grad(model, settings.gate_grad):
        run = _attack_units(model, x, y, settings, attacks, progress)
    if run is None:  # not rank 0
        return None
    ev, gathered, sweep, relative_change = run
    out = Results()
    for part in gathered:
        out.extend(part)
    return build_document(ev, out, y.cpu(), skipped, sweep, relative_change, started, world, device)


def _runnable(attacks: tuple[str, ...], is_moe: bool) -> tuple[list[str], dict[str, str]]:
    """The attacks to run on a model, and why each one left out is skipped: a dense model has no
    route to attack, and AutoAttack runs APGD and FAB already."""
    attacks, skipped = list(attacks), {}
    if not is_moe:
        for name in ROUTE_ATTACKS:
            if name in attacks:
                attacks.remove(name)
                skipped[name] = "dense model (no router): no route to fix or to attack"
    for name, parts in (("apgd", "APGD-CE and APGD-T"), ("fab", "FAB-T")):
        if name in attacks and "autoattack" in attacks:
            attacks.remove(name)
            skipped[name] = f"AutoAttack runs {parts} already"
    return attacks, skipped


@contextlib.contextmanager
def _gate_grad(model: nn.Module, gate_grad: str | None):
    """The white-box attacks follow `gate_grad` through the route (None: the model's own); the
    model gets its own back afterwards."""
    is_moe, own = model.cfg.is_moe, model.cfg.gate_grad
    if is_moe and gate_grad:
        advmoe.set_gate_grad(model, gate_grad)
    try:
        yield
    finally:
        if is_moe:
            advmoe.set_gate_grad(model, own)


def _attack_units(model: nn.Module, x: Tensor, y: Tensor, s: EvalSettings, attacks: list[str],
                  progress: bool) -> tuple[Evaluator, list[Results], dict, Tensor | None] | None:
    """This rank's units attacked; on rank 0 also the gathered results of every unit and the
    sanity measurements (the sweep, the router-gradient check), which one process makes. None
    on the other ranks."""
    rank, world = rank_and_world()
    parts = units(len(x), s.batch_size)
    mine = [u for u in range(len(parts)) if u % world == rank]
    with tqdm(total=1, disable=not progress, unit="stage") as bar:
        ev = Evaluator(model, s, attacks, bar)
        bar.total = ev.stages_per_unit() * len(mine) + (len(s.sweep_eps()) + ev.is_moe) * (rank == 0)
        results = [(u, ev.unit_results(u, x[parts[u]], y[parts[u]])) for u in mine]
        gathered = gather(results, rank, world)
        if gathered is None:
            return None
        sweep = ev.sweep(x, y)
        relative_change = ev.router_gradient(x, y) if ev.is_moe else None
    return ev, gathered, sweep, relative_change
