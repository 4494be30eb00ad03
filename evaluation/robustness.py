"""`advmoe eval`: a robustness evaluation that routing cannot fool (docs/evaluation.md).

On the first n test images of a checkpoint's dataset, with an linf budget eps in [0, 1] pixels:

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
checks (`evaluation.sanity`) say when the numbers look like gradient masking.

The images are cut into units of `batch_size`, and every attack runs on one unit at a time with
seeds drawn from the unit's index, so a unit's results do not depend on which process evaluates
it: under `torchrun` the units are dealt out to the ranks and rank 0 gathers the per-example
results into the same eval.json one process writes.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import advmoe
from advmoe.attacks import check_eps, cross_entropy, pgd
from advmoe.checkpoint import WEIGHTS, read_config
from advmoe.io import atomic_write_text
from advmoe.device import unavailable
from advmoe.gate import GATE_GRADS, expert_share
from advmoe.settings import ConfigError, setting, validate_choices
from advmoe.route_attacks import detached_routers, forced_route, route_fixed_pgd, router_pgd

from . import autoattack, sanity
from .summary import summary

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
DEFAULT_EPS = 8 / 255


@dataclass
class EvalSettings:
    attacks: tuple[str, ...] = setting(help="attacks to run", choices=ATTACKS, factory=lambda: tuple(ATTACKS))
    eps: float = setting(DEFAULT_EPS, "linf budget in [0, 1] pixels, e.g. 0.1 or 8/255")
    pgd_steps: tuple[int, ...] = setting(help="PGD-K through the straight-through router, one run per K",
                                         factory=lambda: (10, 50))
    route_steps: int = setting(50, "PGD steps per forced route, and of the router attack")
    # the same fraction for every k; docs/evaluation.md: 2/255 at 8/255
    step: float = setting(0.25, "PGD step as a fraction of eps")
    steer: float = setting(1.0, "weight of the push towards the forced expert in the route-fixed attack")
    square_queries: int = setting(5000, "Square's queries (5000 is AutoAttack's standard)")
    apgd_iterations: int = setting(100, "iterations of APGD-CE, APGD-T and FAB-T (100 is AutoAttack's standard)")
    batch_size: int = setting(256, "images per unit: attacks run one unit at a time; torchrun deals units to ranks")
    seed: int = setting(0, "seed of the attacks' random starts")
    sweep: tuple[float, ...] | None = setting(None, "eps of the sanity sweep (default: eps x 1/4, 1/2, 1, 2 and 0.5)")
    sweep_examples: int = setting(200, "images of the eps sweep of the sanity checks")
    gradient_examples: int = setting(64, "images of the router-gradient check")
    gate_grad: str | None = setting(None, "the straight-through gradient the white-box attacks follow through the "
                                    "route (default: the model's own); the forward pass, so every accuracy of a given "
                                    "input, is the same either way", choices=GATE_GRADS)

    def validate(self) -> None:
        if not self.attacks:
            raise ConfigError(f"no attack given; choose from {', '.join(ATTACKS)}")
        validate_choices(self)
        try:
            check_eps(self.eps)
            for e in self.sweep or ():
                check_eps(e)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0 < self.step <= 1:
            raise ConfigError(f"step is a fraction of eps in (0, 1], got {self.step}")
        if not self.pgd_steps or min(self.pgd_steps) < 1 or self.route_steps < 1:
            raise ConfigError(f"PGD steps must be >= 1, got {list(self.pgd_steps)} and route steps {self.route_steps}")
        for name in ("batch_size", "square_queries", "apgd_iterations", "sweep_examples", "gradient_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def sweep_eps(self) -> list[float]:
        if self.sweep:
            return sorted(set(self.sweep))
        return sorted({min(1.0, self.eps * f) for f in (0.25, 0.5, 1, 2)} | {sanity.LARGE_EPS})


class _Clock:
    """Wall and CPU (process) seconds since creation: CPU time is what a core of its own would
    take, wall time what this run took next to whatever else the machine ran."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _timing(n: int, elapsed: tuple[float, float]) -> dict:
    wall, cpu = elapsed
    return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
            "examples_per_second": round(n / wall, 4) if wall > 0 else None,
            "examples_per_cpu_second": round(n / cpu, 4) if cpu > 0 else None}


@dataclass
class Results:
    """Per-example results of some units: tensors of one row per example under "ATTACK/what"
    keys (the prediction, the routing and the linf size under each attack, and the verdicts of
    the route-fixed and AutoAttack parts), seconds per attack, AutoAttack's warnings. Units
    concatenate (`extend`), so results of ranks merge into those of one process."""

    rows: dict[str, Tensor] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)  # name: [wall, cpu]
    flags: list[str] = field(default_factory=list)

    def add(self, key: str, value: Tensor) -> None:
        self.rows[key] = value.detach().cpu()

    def time(self, name: str, elapsed: tuple[float, float]) -> None:
        total = self.seconds.setdefault(name, [0.0, 0.0])
        total[0] += elapsed[0]
        total[1] += elapsed[1]

    def extend(self, other: "Results") -> None:
        for key, value in other.rows.items():
            self.rows[key] = torch.cat([self.rows[key], value]) if key in self.rows else value
        for name, (wall, cpu) in other.seconds.items():
            self.time(name, (wall, cpu))
        self.flags += [f for f in other.flags if f not in self.flags]

    def correct(self, name: str, y: Tensor) -> Tensor:
        """Per example, on y's device (rows are kept on the CPU; the attacks' masks live with x)."""
        return self.rows[f"{name}/pred"].to(y.device) == y


def worst_case(correct: dict[str, Tensor]) -> Tensor:
    """Per example: correct under every entry (clean and each attack). Not the minimum of the
    per-attack accuracies, which overstates robustness when attacks fool different examples."""
    if not correct:
        raise ValueError("no results to combine")
    robust = torch.ones_like(next(iter(correct.values())), dtype=torch.bool)
    for value in correct.values():
        robust &= value.bool()
    return robust


def _bits(correct: Tensor) -> str:
    return "".join("1" if c else "0" for c in correct.tolist())


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


class _Evaluator:
    """The attacks, run on one unit of examples at a time; each writes per-example rows."""

    def __init__(self, model: nn.Module, settings: EvalSettings, attacks: list[str], bar):
        model = _copy(model).eval()
        model.requires_grad_(False)  # attacks need input gradients only
        self.masked = advmoe.set_execution(model, "masked")
        self.fast = advmoe.set_execution(copy.deepcopy(model), "sparse")
        self.s, self.attacks, self.bar = settings, attacks, bar
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
        clock = _Clock()
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
            clock = _Clock()
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
            clock, x_adv = _Clock(), x.clone()
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
        k, clock = self.s.route_steps, _Clock()
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
        clock = _Clock()
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


def _units(n: int, batch_size: int) -> list[slice]:
    return [slice(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(mine: list[tuple[int, Results]], rank: int, world: int) -> list[Results] | None:
    """Rank 0: every unit's results in unit order; the other ranks: None."""
    if world == 1:
        return [r for _, r in sorted(mine, key=lambda t: t[0])]
    everything = [None] * world if rank == 0 else None
    dist.gather_object(mine, everything, dst=0)
    if rank != 0:
        return None
    units = sorted((item for part in everything for item in part), key=lambda t: t[0])
    return [r for _, r in units]


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, settings: EvalSettings | None = None,
                   progress: bool | None = None) -> dict | None:
    """Run the suite on a model (any advmoe model, dense or MoE) and examples x in [0, 1], labels y,
    on the model's device. Returns the eval.json document (without the checkpoint fields).
    Under torch.distributed every rank evaluates its share of the units and rank 0 returns the
    document of all of them (the other ranks return None)."""
    s = settings or EvalSettings()
    s.validate()
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need as many labels as examples (at least one), got {len(x)} and {len(y)}")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    is_moe = model.cfg.is_moe
    attacks, skipped = list(s.attacks), {}
    if not is_moe:
        for name in ROUTE_ATTACKS:
            if name in attacks:
                attacks.remove(name)
                skipped[name] = "dense model (no router): no route to fix or to attack"
    for name, parts in (("apgd", "APGD-CE and APGD-T"), ("fab", "FAB-T")):
        if name in attacks and "autoattack" in attacks:
            attacks.remove(name)
            skipped[name] = f"AutoAttack runs {parts} already"
    rank, world = _world()
    units = _units(len(x), s.batch_size)
    mine = [u for u in range(len(units)) if u % world == rank]
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI") and rank == 0
    started = _Clock()
    own_gate_grad = model.cfg.gate_grad
    if is_moe and s.gate_grad:
        advmoe.set_gate_grad(model, s.gate_grad)
    try:
        with tqdm(total=1, disable=not progress, unit="stage") as bar:
            ev = _Evaluator(model, s, attacks, bar)
            bar.total = ev.stages_per_unit() * len(mine) + (len(s.sweep_eps()) + is_moe) * (rank == 0)
            results = [(u, ev.unit_results(u, x[units[u]], y[units[u]])) for u in mine]
            gathered = _gather(results, rank, world)
            if gathered is None:
                return None
            sweep = ev.sweep(x, y)
            relative_change = ev.router_gradient(x, y) if is_moe else None
    finally:
        if is_moe:
            advmoe.set_gate_grad(model, own_gate_grad)
    out = Results()
    for part in gathered:
        out.extend(part)
    return _document(ev, out, y.cpu(), attacks, skipped, sweep, relative_change, started, world, device)


def _document(ev: _Evaluator, out: Results, y: Tensor, attacks: list[str], skipped: dict, sweep: dict,
              relative_change: Tensor | None, started: _Clock, world: int, device) -> dict:
    s, n = ev.s, len(y)
    names = ["clean"] + [k[: -len("/pred")] for k in out.rows if k.endswith("/pred") and k != "clean/pred"]
    correct = {name: out.correct(name, y) for name in names if not name.endswith("-gradient")}
    robust = worst_case(correct)
    accuracy = {name: c.float().mean().item() for name, c in correct.items()}
    accuracy["robust"] = robust.float().mean().item()
    entries = {"clean": {"accuracy": accuracy["clean"], **_timing(n, out.seconds["clean"])}}
    for name in correct:
        if name != "clean":
            entries[name] = _attack_entry(ev, out, name, y)
    checks = _checks(out, correct, y, sweep, relative_change)
    wall, cpu = started.elapsed()
    return {
        "examples": n,
        "eps": s.eps,
        "norm": "linf",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "moe": ev.is_moe,
        "attacks_run": [a for a in ATTACKS if a in attacks],
        "skipped": skipped,
        "robust_accuracy": accuracy["robust"],
        "robust_accuracy_is": "per example: correct clean and under every attack in " + ", ".join(sorted(correct)),
        "accuracy": accuracy,
        "attacks": entries,
        "sanity": checks,
        "autoattack_flags": out.flags,
        "sweep": sweep,
        "experts": _experts(ev, out, correct, robust) if ev.is_moe else None,
        "per_example": {"label": y.tolist(), **{name: _bits(c) for name, c in correct.items()}, "robust": _bits(robust)},
        "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "processes": world,
        "evaluated_with": "verdicts: sparse execution; gradients: masked execution with the straight-through gate",
        "threads": torch.get_num_threads(),
        "device": str(device),
        "versions": _versions(),
    }


def _attack_entry(ev: _Evaluator, out: Results, name: str, y: Tensor) -> dict:
    """One attack's accuracy, timing, perturbation size, expert usage and what it describes."""
    s, rows, n = ev.s, out.rows, len(y)
    step = s.step * s.eps
    pred = rows[f"{name}/pred"]
    entry = {"accuracy": (pred == y).float().mean().item(), **_timing(n, out.seconds[name]),
             "max_perturbation": rows[f"{name}/linf"].max().item()}
    if ev.is_moe:
        routing, clean_routing = rows[f"{name}/routing"], rows["clean/routing"]
        entry["expert_share"] = expert_share(routing, ev.masked.cfg.num_experts)
        entry["route_flip_rate"] = (routing != clean_routing).any(1).float().mean().item()
    if name.startswith("pgd-"):
        entry["description"] = (f"PGD-{name[4:]}, cross-entropy, random start, step {step:.4g}, "
                                "through the straight-through router")
    elif name == "square":
        entry["description"] = f"Square (gradient-free), {s.square_queries} queries, on every clean-correct example"
    elif name in ev.cascades:
        parts = []
        for part in ev.cascades[name]:
            seconds = out.seconds[f"{name}/{part}"]
            parts.append({"name": part, **_timing(n, seconds), "attacked": int(rows[f"{name}/{part}/attacked"].sum()),
                          "accuracy_after": rows[f"{name}/{part}/alive"].float().mean().item()})
        total = (sum(p["seconds"] for p in parts), sum(p["cpu_seconds"] for p in parts))
        standard = (name == "autoattack" and ev.gradient_aa == autoattack.STANDARD[:3] and s.square_queries == 5000
                    and s.apgd_iterations == 100)
        kind = "AutoAttack " + ("standard" if standard else "custom") if name == "autoattack" else name.upper()
        entry.update(_timing(n, total), components=parts, standard=standard, description=(
            f"{kind} (pyautoattack): {', '.join(p['name'].upper() for p in parts)} in cascade; robust if no "
            "component fools the example"))
    elif name == "route-fixed":
        experts = range(ev.masked.cfg.num_experts)
        mean = lambda key: rows[key].float().mean().item()  # noqa: E731
        entry["routes"] = [{"expert": e, "forced_clean_accuracy": mean(f"route-fixed/{e}/forced_clean"),
                            "forced_adversarial_accuracy": mean(f"route-fixed/{e}/forced_adversarial"),
                            "real_accuracy": mean(f"route-fixed/{e}/real"),
                            "routed_to_expert": mean(f"route-fixed/{e}/routed_to_expert")} for e in experts]
        forced = worst_case({e: rows[f"route-fixed/{e}/forced_adversarial"] for e in experts})
        entry["accuracy_if_attacker_picks_route"] = forced.float().mean().item()
        entry["description"] = (f"PGD-{s.route_steps} (step {step:.4g}) with every router forced to each of "
                                f"{len(experts)} experts (steer {s.steer:g}), judged on the real model, worst "
                                "candidate per example")
    elif name == "router":
        route_flip = (rows["router/routing"] != rows["clean/routing"]).any(1)
        prediction_flip = pred != rows["clean/pred"]

        def rate(mask: Tensor) -> float | None:
            return prediction_flip[mask].float().mean().item() if mask.any() else None

        entry.update(prediction_flip_rate=prediction_flip.float().mean().item(),
                     prediction_flip_given_route_flip=rate(route_flip),
                     prediction_flip_given_no_route_flip=rate(~route_flip),
                     description=f"PGD-{s.route_steps} (step {step:.4g}) maximising KL(router(x) || router(x')), "
                                 "labels unused")
    return entry


def _checks(out: Results, c: dict[str, Tensor], y: Tensor, sweep: dict, relative_change: Tensor | None) -> dict:
    clean = c["clean"]
    checks = [sanity.eps_sweep(sweep["eps"], sweep["accuracy"], sweep["examples"], sweep["steps"])]
    pgd_names = [k for k in c if k.startswith("pgd-")]
    checks.append(sanity.more_steps({int(k[4:]): c[k].float().mean().item() for k in pgd_names}, len(y)))
    # gradient attacks through the router; AutoAttack without its Square part
    gradient = {k: c[k] for k in pgd_names + ["apgd", "fab"] if k in c}
    if "autoattack-gradient/pred" in out.rows:
        gradient["autoattack-gradient"] = out.correct("autoattack-gradient", y)
    route = {k: c[k] for k in ROUTE_ATTACKS if k in c}
    white_box = worst_case({"clean": clean, **gradient, **route})
    if "square" in c and (gradient or route):
        checks.append(sanity.square_vs_white_box(c["square"], white_box, c["square"].float().mean().item(),
                                                 white_box.float().mean().item()))
    else:
        checks.append({"name": "Square does not beat the white-box attacks", "passed": None,
                       "detail": "needs Square and at least one white-box attack"})
    if relative_change is not None:
        checks.append(sanity.router_gradient(relative_change))
        if route and gradient:
            checks.append(sanity.route_aware_vs_pgd(worst_case({"clean": clean, **route}),
                                                    worst_case({"clean": clean, **gradient})))
    return sanity.verdict(checks)


def _experts(ev: _Evaluator, out: Results, correct: dict[str, Tensor], robust: Tensor) -> dict:
    routing, n = out.rows["clean/routing"], ev.masked.cfg.num_experts
    if ev.shared_router:
        keys = [str(r) for r in routing[:, 0].tolist()]
    else:
        keys = ["-".join(map(str, r)) for r in routing.tolist()]
    per_route = {}
    for key in sorted(set(keys)):
        mask = torch.tensor([k == key for k in keys])
        per_route[key] = {"examples": int(mask.sum()), "clean_accuracy": correct["clean"][mask].float().mean().item(),
                          "robust_accuracy": robust[mask].float().mean().item()}
    attacked = [name for name in correct if name != "clean"]
    document = {"clean_share": expert_share(routing, n),
                "adversarial_share": {k: expert_share(out.rows[f"{k}/routing"], n) for k in attacked},
                "route_flip_rate": {k: (out.rows[f"{k}/routing"] != routing).any(1).float().mean().item()
                                    for k in attacked},
                "per_route": per_route,
                "route_key": "the expert of the shared router" if ev.shared_router else "experts of the MoE layers, in order"}
    if not ev.shared_router:
        document["clean_share_per_layer"] = [expert_share(col, n) for col in routing.T]
    return document


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"advmoe": advmoe.__version__, "torch": torch.__version__}
    try:
        found["pyautoattack"] = version("pyautoattack")
    except PackageNotFoundError:
        found["pyautoattack"] = None
    return found


# -- checkpoints -----------------------------------------------------------------------------
def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset: str | None = None, data_dir: str | None = None,
                        n_examples: int = 1000, out: str | os.PathLike | None = None, eps: float | None = None,
                        progress: bool | None = None, device: str = "cpu", split: str = "test",
                        **settings) -> dict | None:
    """Evaluate a checkpoint directory on the first `n_examples` test images of its dataset and
    write eval.json and eval.md (atomically) to `out` (default: the checkpoint directory).
    eps: linf budget in [0, 1] pixels (default: the checkpoint's training eps, else 8/255).
    split: "test", or "val" for the validation images its own training run held out (to choose
    between checkpoints without looking at the test set).

    Under torchrun (WORLD_SIZE > 1) each rank attacks its share of the images (gloo on the CPU,
    NCCL with --device cuda, one GPU per rank); rank 0 writes the files and returns the document."""
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    trained_on = config.get("dataset")
    if dataset and trained_on and dataset != trained_on:
        raise ConfigError(f"{checkpoint} is a {trained_on} model, not {dataset}: pass --dataset {trained_on} "
                          f"or another checkpoint")
    dataset = dataset or trained_on
    if not dataset:
        raise ConfigError(f"{checkpoint}/config.json names no dataset: pass --dataset")
    info = advmoe.get_dataset_info(dataset)
    eps_source = "given"
    if eps is None:
        eps = (config.get("training") or {}).get("eps")
        eps_source = "the checkpoint's training eps"
        if eps is None:
            eps, eps_source = DEFAULT_EPS, "default 8/255"
    s = EvalSettings(eps=float(eps), **settings)
    s.validate()  # before any slow work
    if n_examples < 1:
        raise ConfigError(f"n-examples must be >= 1, got {n_examples}")
    held_out = _held_out(checkpoint, config, split)  # before any slow work
    if problem := unavailable(device):
        raise ConfigError(problem)
    device = torch.device(device)
    started_group = _distributed_setup(device)
    try:
        if started_group and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model = advmoe.load_checkpoint(checkpoint, map_location=device)
        cfg = model.cfg
        if (cfg.in_channels, cfg.image_size, cfg.num_classes) != (info.in_channels, info.image_size, info.num_classes):
            raise ConfigError(f"{checkpoint} takes {cfg.in_channels}x{cfg.image_size}x{cfg.image_size} images and "
                              f"{cfg.num_classes} classes; {dataset} has {info.in_channels}x{info.image_size}x"
                              f"{info.image_size} and {info.num_classes}")
        data = advmoe.load_dataset(dataset, split, data_dir, **held_out)
        n = min(n_examples, len(data))
        items = [data[i] for i in range(n)]
        x = torch.stack([item[0] for item in items])
        y = torch.tensor([item[1] for item in items])
        result = evaluate_model(model, x, y, s, progress)
    finally:
        if started_group:
            dist.destroy_process_group()
    if result is None:  # not rank 0
        return None
    document = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint / WEIGHTS),
                "architecture": config["architecture"], "training_method": (config.get("training") or {}).get("method"),
                "dataset": dataset, "split": split, "first_examples": n, "eps_source": eps_source, **result}
    out = Path(out) if out is not None else checkpoint
    atomic_write_text(out / "eval.json", json.dumps(document, indent=1) + "\n")
    atomic_write_text(out / "eval.md", summary(document))
    return document


def evaluate_in_processes(processes: int, checkpoint: str | os.PathLike, threads: int | None = None,
                          **kwargs) -> dict:
    """evaluate_checkpoint sharded over `processes` local CPU processes (gloo), started by this
    call as torchrun would start them, each with `threads` torch threads; returns the document
    rank 0 wrote. The per-example results are one process's. On a 2-core CPU, two one-thread
    processes attack faster than one two-thread process (docs/evaluation.md)."""
    if processes < 1:
        raise ConfigError(f"processes must be >= 1, got {processes}")
    if processes == 1:
        return evaluate_checkpoint(checkpoint, **kwargs)
    if kwargs.get("device", "cpu") != "cpu":
        raise ConfigError("evaluate_in_processes shards over CPU processes; on GPUs run `torchrun -m cli eval`, one per GPU")
    with socket.socket() as free:  # a port for the group's rendezvous, as torchrun --standalone picks one
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    try:
        torch.multiprocessing.spawn(_evaluate_rank, args=(processes, port, threads, str(checkpoint), kwargs),
                                    nprocs=processes)
    except torch.multiprocessing.ProcessRaisedException as e:  # the rank's own error, not its traceback
        error, _, message = str(e).strip().splitlines()[-1].partition(": ")
        raise (ConfigError if error.endswith("ConfigError") else RuntimeError)(message or error) from None
    return json.loads((Path(kwargs.get("out") or checkpoint) / "eval.json").read_text())


def _evaluate_rank(rank: int, processes: int, port: int, threads: int | None, checkpoint: str, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    evaluate_checkpoint(checkpoint, **kwargs)


def _held_out(checkpoint: Path, config: dict, split: str) -> dict:
    """load_dataset's arguments for `split`: for "val", the size and seed of the split the
    checkpoint's training run held out, so that no image it trained on is evaluated."""
    if split == "test":
        return {}
    if split != "val":
        raise ConfigError(f"split must be test or val, got {split!r}")
    training = config.get("training") or {}
    if "val_size" not in training or "seed" not in training:
        raise ConfigError(f"{checkpoint}/config.json does not record the validation split its training held out "
                          f"(training.val_size and training.seed): evaluate it on the test split")
    return {"val_size": training["val_size"], "seed": training["seed"]}


def _distributed_setup(device: torch.device) -> bool:
    """Join the torchrun group (WORLD_SIZE > 1); True when this call started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def kept_evaluation(path: Path, accept: Callable[[dict], bool]) -> dict | None:
    """The eval.json at `path` when `accept` says it can stand in for running the evaluation again
    (evaluated_with, usually), else None: also when it is missing, not JSON or not an eval.json."""
    try:
        doc = json.loads(Path(path).read_text())
        return doc if accept(doc) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def evaluated_with(doc: dict, checkpoint: Path, n: int, settings: dict, at_least: bool = False,
                   split: str = "test") -> bool:
    """Whether an eval.json document is of `checkpoint`'s weights, the first n images of `split`
    and `settings` (EvalSettings fields), so that it can stand in for running them again.
    at_least: an evaluation of more images, or with more attacks, will do as well."""
    wanted = json.loads(json.dumps(settings))  # as eval.json stores them: tuples as lists
    have = doc["settings"]
    attacks = wanted.pop("attacks", None)
    if attacks is not None and not (set(attacks) <= set(have["attacks"]) if at_least else attacks == have["attacks"]):
        return False
    images = doc.get("first_examples")
    return (doc.get("checkpoint_sha256") == file_sha256(checkpoint / WEIGHTS) and doc.get("split", "test") == split
            and images is not None and (images >= n if at_least else images == n)
            and all(have.get(k) == v for k, v in wanted.items()))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
