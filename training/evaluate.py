"""`advmoe eval`: a robustness evaluation that routing cannot fool (ADVMOE.md, "Evaluation").

On the first n test images of a checkpoint's dataset, with an linf budget eps in [0, 1] pixels:

- clean accuracy;
- PGD-k (cross-entropy, random start, step eps / 4 for every k) through the straight-through router;
- AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square; `training.autoattack`);
- route-fixed: for each expert e, PGD on the model with every route forced to e (and the real
  router pushed towards e); each candidate is judged on the real, unforced model, and per
  example the candidate that fools it (else the one with the highest loss) is kept;
- router attack: maximise the change of the router scores; route and prediction flips;
- Square alone (gradient-free), the cross-check for gradient masking.

Every adversarial example is checked to lie in the eps-ball and in [0, 1], and every verdict is
the real model's prediction (sparse execution, the path that is deployed; gradients come from
masked execution, which has the straight-through gate). Robust accuracy is per example: an
example counts only if it is classified correctly clean and under every attack run. Sanity
checks (`training.sanity`) say when the numbers look like gradient masking.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import advmoe
from advmoe.attacks import check_eps, cross_entropy, pgd
from advmoe.checkpoint import WEIGHTS, read_config
from advmoe.io import atomic_write_text
from advmoe.route_attacks import detached_routers, forced_route, route_fixed_pgd, router_pgd

from . import autoattack, sanity
from .eval_summary import summary

ATTACKS = ("pgd", "autoattack", "route-fixed", "router", "square")
ROUTE_ATTACKS = ("route-fixed", "router")
DEFAULT_EPS = 8 / 255


@dataclass
class EvalSettings:
    attacks: tuple[str, ...] = ATTACKS
    eps: float = DEFAULT_EPS
    pgd_steps: tuple[int, ...] = (10, 50)
    route_steps: int = 50  # PGD steps per forced route, and of the router attack
    step: float = 0.25  # PGD step as a fraction of eps, the same for every k (ADVMOE.md: 2/255 at 8/255)
    steer: float = 1.0  # weight of the push towards the forced expert in the route-fixed attack
    square_queries: int = 5000  # AutoAttack's standard budget
    batch_size: int = 256
    seed: int = 0
    sweep: tuple[float, ...] | None = None  # eps of the sanity sweep; None: eps x (1/4, 1/2, 1, 2) and 0.5
    sweep_examples: int = 200
    gradient_examples: int = 64  # examples of the router-gradient check

    def validate(self) -> None:
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
        if not self.attacks:
            raise ValueError(f"no attack given; choose from {', '.join(ATTACKS)}")
        check_eps(self.eps)
        for e in self.sweep or ():
            check_eps(e)
        if not 0 < self.step <= 1:
            raise ValueError(f"step is a fraction of eps in (0, 1], got {self.step}")
        if not self.pgd_steps or min(self.pgd_steps) < 1 or self.route_steps < 1:
            raise ValueError(f"PGD steps must be >= 1, got {list(self.pgd_steps)} and route steps {self.route_steps}")
        for name in ("batch_size", "square_queries", "sweep_examples", "gradient_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def sweep_eps(self) -> list[float]:
        if self.sweep:
            return sorted(set(self.sweep))
        return sorted({min(1.0, self.eps * f) for f in (0.25, 0.5, 1, 2)} | {sanity.LARGE_EPS})


@dataclass
class _Run:
    """What evaluate_model accumulates: per-example correctness by attack, and the rest."""

    y: Tensor
    clean_pred: Tensor
    clean_routing: Tensor
    correct: dict[str, Tensor] = field(default_factory=dict)
    attacks: dict[str, dict] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    extra: dict[str, Tensor] = field(default_factory=dict)  # per-example verdicts kept out of the worst case


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


def _check_ball(x: Tensor, x_adv: Tensor, eps: float, name: str) -> float:
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{name} returned adversarial examples of the wrong shape or with NaN/inf")
    worst = (x_adv - x).abs().flatten(1).max(1).values.max().item() if len(x) else 0.0
    if worst > eps + 1e-5 or x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        raise RuntimeError(f"{name} left the threat model: linf {worst:.6f} > eps {eps:.6f} or pixels outside [0, 1]")
    return worst


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
    def __init__(self, model: nn.Module, settings: EvalSettings, bar):
        model = _copy(model).eval()
        model.requires_grad_(False)  # attacks need input gradients only
        self.masked = advmoe.set_execution(model, "masked")
        self.fast = advmoe.set_execution(copy.deepcopy(model), "sparse")
        self.s, self.bar = settings, bar
        self.is_moe = model.cfg.is_moe
        self.shared_router = model.router is not None

    # -- helpers --------------------------------------------------------------------------
    def stage(self, text: str) -> None:
        self.bar.set_description(text)

    def done(self) -> None:
        self.bar.update(1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and routing of the real model (sparse execution), batched."""
        logits, routing = [], []
        for xb in x.split(self.s.batch_size):
            out, route = self.fast.forward_with_routing(xb)
            logits.append(out)
            routing.append(route)
        return torch.cat(logits), torch.cat(routing)

    def batched(self, attack, x: Tensor, y: Tensor) -> Tensor:
        return torch.cat([attack(xb, yb) for xb, yb in zip(x.split(self.s.batch_size), y.split(self.s.batch_size))])

    def record(self, run: _Run, name: str, x: Tensor, x_adv: Tensor, elapsed: tuple[float, float],
               **extra) -> tuple[Tensor, Tensor]:
        """Judge `x_adv` on the real model and store the per-example verdict and statistics."""
        worst = _check_ball(x, x_adv, self.s.eps, name)
        logits, routing = self.predict(x_adv)
        correct = logits.argmax(1) == run.y
        run.correct[name] = correct
        entry = {"accuracy": correct.float().mean().item(), **_timing(len(x), elapsed), "max_perturbation": worst,
                 **extra}
        if self.is_moe:
            entry["expert_share"] = self.share(routing)
            entry["route_flip_rate"] = (routing != run.clean_routing).any(1).float().mean().item()
        run.attacks[name] = entry
        return logits, routing

    def share(self, routing: Tensor) -> list[float]:
        n = self.masked.cfg.num_experts
        return (routing.flatten().bincount(minlength=n).float() / max(1, routing.numel())).tolist()

    def seed(self, offset: int) -> None:
        torch.manual_seed(self.s.seed * 1000 + offset)

    # -- attacks --------------------------------------------------------------------------
    def pgd(self, run: _Run, x: Tensor, y: Tensor) -> None:
        step = self.s.step * self.s.eps
        for k in sorted(set(self.s.pgd_steps)):
            self.stage(f"PGD-{k}")
            self.seed(0)  # the same random start for every k: PGD-50 continues where PGD-10 stops
            clock = _Clock()
            x_adv = self.batched(lambda xb, yb: pgd(self.masked, xb, cross_entropy(yb), self.s.eps, step, k), x, y)
            self.record(run, f"pgd-{k}", x, x_adv, clock.elapsed(),
                        description=f"PGD-{k}, cross-entropy, random start, step {step:.4g}, through the straight-through router")
            self.done()

    def autoattack(self, run: _Run, x: Tensor, y: Tensor, gradient: tuple[str, ...]) -> None:
        """AutoAttack's gradient attacks in cascade (each on the survivors of the ones before, as
        the package runs them), then Square once on every clean-correct example: the gradient-free
        cross-check, and AutoAttack's last component for the examples still standing."""
        model = autoattack.GradientOrFast(self.masked, self.fast)
        attack = autoattack.make(model, self.s.eps, self.masked.cfg.num_classes, self.s.seed, self.s.square_queries)
        clean = run.correct["clean"]
        alive, x_best, parts = clean.clone(), x.clone(), []

        def run_part(name: str, idx: Tensor) -> tuple[Tensor, tuple[float, float]]:
            self.stage(f"AutoAttack {name.upper()}")
            clock, x_adv = _Clock(), x.clone()
            if len(idx):
                x_adv[idx], messages = autoattack.run(attack, name, x[idx], y[idx], self.s.batch_size)
                run.flags.extend(f"{name}: {m}" for m in messages if f"{name}: {m}" not in run.flags)
            self.done()
            return x_adv, clock.elapsed()

        for name in gradient:
            idx = alive.nonzero().flatten()
            x_adv, elapsed = run_part(name, idx)
            fooled = (self.predict(x_adv)[0].argmax(1) != y) & alive
            x_best[fooled] = x_adv[fooled]
            alive &= ~fooled
            parts.append({"name": name, **_timing(len(x), elapsed), "attacked": len(idx),
                          "accuracy_after": alive.float().mean().item()})
        x_square, elapsed = run_part("square", clean.nonzero().flatten())
        self.record(run, "square", x, x_square, elapsed, description=(
            f"Square (gradient-free), {self.s.square_queries} queries, on every clean-correct example"))
        if not gradient:
            return
        run.extra["autoattack-gradient"] = alive.clone()
        fooled = alive & ~run.correct["square"]
        x_best[fooled] = x_square[fooled]
        alive &= ~fooled
        parts.append({"name": "square", **_timing(len(x), elapsed), "attacked": int(clean.sum()),
                      "accuracy_after": alive.float().mean().item()})
        standard = gradient == autoattack.STANDARD[:3] and self.s.square_queries == 5000
        total = (sum(p["seconds"] for p in parts), sum(p["cpu_seconds"] for p in parts))
        self.record(run, "autoattack", x, x_best, total, components=parts,
                    standard=standard, description=(
                        f"AutoAttack {'standard' if standard else 'custom'} (pyautoattack): "
                        f"{', '.join(p['name'].upper() for p in parts)}; robust if no component fools the example"))

    def route_fixed(self, run: _Run, x: Tensor, y: Tensor) -> None:
        n_experts = self.masked.cfg.num_experts
        k, clock = self.s.route_steps, _Clock()
        step = self.s.step * self.s.eps
        best_score = torch.full((len(x),), -math.inf, device=x.device)
        x_best = x.clone()
        routes, forced_correct = [], torch.ones(len(x), dtype=torch.bool, device=x.device)
        for e in range(n_experts):
            self.stage(f"route-fixed, expert {e}")
            self.seed(10_000 + e)
            x_e = self.batched(lambda xb, yb: route_fixed_pgd(self.masked, xb, yb, e, self.s.eps, step, k, self.s.steer), x, y)
            _check_ball(x, x_e, self.s.eps, "route-fixed")
            logits, routing = self.predict(x_e)
            fooled = logits.argmax(1) != y
            # fooling the real model first, then the real model's loss: a valid attack on it
            score = F.cross_entropy(logits, y, reduction="none") + 1e6 * fooled
            better = score > best_score
            x_best[better], best_score[better] = x_e[better], score[better]
            with torch.no_grad(), forced_route(self.masked, e):
                forced_clean = torch.cat([self.masked(b).argmax(1) for b in x.split(self.s.batch_size)]) == y
                forced_adv = torch.cat([self.masked(b).argmax(1) for b in x_e.split(self.s.batch_size)]) == y
            forced_correct &= forced_adv
            routes.append({"expert": e, "forced_clean_accuracy": forced_clean.float().mean().item(),
                           "forced_adversarial_accuracy": forced_adv.float().mean().item(),
                           "real_accuracy": (~fooled).float().mean().item(),
                           "routed_to_expert": (routing == e).all(1).float().mean().item()})
            self.done()
        self.record(run, "route-fixed", x, x_best, clock.elapsed(), routes=routes,
                    accuracy_if_attacker_picks_route=forced_correct.float().mean().item(),
                    description=(f"PGD-{k} (step {step:.4g}) with every router forced to each of {n_experts} experts "
                                 f"(steer {self.s.steer:g}), judged on the real model, worst candidate per example"))

    def router(self, run: _Run, x: Tensor, y: Tensor) -> None:
        self.stage("router attack")
        self.seed(20_000)
        k, clock = self.s.route_steps, _Clock()
        step = self.s.step * self.s.eps
        x_adv = self.batched(lambda xb, yb: router_pgd(self.masked, xb, self.s.eps, step, k), x, y)
        logits, routing = self.record(run, "router", x, x_adv, clock.elapsed(), description=(
            f"PGD-{k} (step {step:.4g}) maximising KL(router(x) || router(x')), labels unused"))
        route_flip = (routing != run.clean_routing).any(1)
        prediction_flip = logits.argmax(1) != run.clean_pred
        entry = run.attacks["router"]
        entry["prediction_flip_rate"] = prediction_flip.float().mean().item()
        entry["prediction_flip_given_route_flip"] = prediction_flip[route_flip].float().mean().item() if route_flip.any() else None
        entry["prediction_flip_given_no_route_flip"] = (prediction_flip[~route_flip].float().mean().item()
                                                       if (~route_flip).any() else None)
        self.done()

    # -- sanity measurements -----------------------------------------------------------------
    def sweep(self, x: Tensor, y: Tensor) -> dict:
        eps_values, accuracy = self.s.sweep_eps(), []
        k = min(self.s.pgd_steps)
        x, y = x[: self.s.sweep_examples], y[: self.s.sweep_examples]
        for eps in eps_values:
            self.stage(f"sanity sweep, eps {eps:.3g}")
            self.seed(30_000)
            x_adv = self.batched(lambda xb, yb: pgd(self.masked, xb, cross_entropy(yb), eps, self.s.step * eps, k), x, y)
            _check_ball(x, x_adv, eps, "sweep")
            accuracy.append((self.predict(x_adv)[0].argmax(1) == y).float().mean().item())
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
                   progress: bool | None = None) -> dict:
    """Run the suite on a model (any advmoe model, dense or MoE) and examples x in [0, 1], labels y,
    on the model's device. Returns the eval.json document (without the checkpoint fields)."""
    s = settings or EvalSettings()
    s.validate()
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need as many labels as examples (at least one), got {len(x)} and {len(y)}")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    is_moe = model.cfg.is_moe
    attacks = list(s.attacks)
    skipped = {}
    if not is_moe:
        for name in ROUTE_ATTACKS:
            if name in attacks:
                attacks.remove(name)
                skipped[name] = "dense model (no router): no route to fix or to attack"
    square = "square" in attacks or "autoattack" in attacks
    gradient_aa = ("apgd-ce", "apgd-t", "fab-t") if "autoattack" in attacks else ()
    stages = (1 + len(set(s.pgd_steps)) * ("pgd" in attacks) + len(gradient_aa) + square
              + model.cfg.num_experts * ("route-fixed" in attacks) + ("router" in attacks)
              + len(s.sweep_eps()) + is_moe)
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI")
    started = _Clock()
    with tqdm(total=stages, disable=not progress, unit="stage") as bar:
        ev = _Evaluator(model, s, bar)
        ev.stage("clean")
        clock = _Clock()
        logits, routing = ev.predict(x)
        clean_time = clock.elapsed()
        run = _Run(y=y, clean_pred=logits.argmax(1), clean_routing=routing)
        run.correct["clean"] = run.clean_pred == y
        ev.done()
        if "pgd" in attacks:
            ev.pgd(run, x, y)
        if square:
            ev.autoattack(run, x, y, gradient_aa)
        if "route-fixed" in attacks:
            ev.route_fixed(run, x, y)
        if "router" in attacks:
            ev.router(run, x, y)
        sweep = ev.sweep(x, y)
        relative_change = ev.router_gradient(x, y) if is_moe else None
    robust = worst_case(run.correct)
    accuracy = {name: c.float().mean().item() for name, c in run.correct.items()}
    accuracy["robust"] = robust.float().mean().item()
    checks = _checks(run, sweep, relative_change)
    document = {
        "examples": len(y),
        "eps": s.eps,
        "norm": "linf",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "moe": is_moe,
        "attacks_run": [a for a in ATTACKS if a in attacks],
        "skipped": skipped,
        "robust_accuracy": accuracy["robust"],
        "robust_accuracy_is": "per example: correct clean and under every attack in " + ", ".join(sorted(run.correct)),
        "accuracy": accuracy,
        "attacks": {"clean": {"accuracy": accuracy["clean"], **_timing(len(y), clean_time)}, **run.attacks},
        "sanity": checks,
        "autoattack_flags": run.flags,
        "sweep": sweep,
        "experts": _experts(ev, run, robust) if is_moe else None,
        "per_example": {"label": y.tolist(), **{name: _bits(c) for name, c in run.correct.items()}, "robust": _bits(robust)},
        **dict(zip(("seconds", "cpu_seconds"), (round(t, 1) for t in started.elapsed()))),
        "evaluated_with": "verdicts: sparse execution; gradients: masked execution with the straight-through gate",
        "threads": torch.get_num_threads(),
        "device": str(device),
        "versions": _versions(),
    }
    return document


def _checks(run: _Run, sweep: dict, relative_change: Tensor | None) -> dict:
    c, clean = run.correct, run.correct["clean"]
    checks = [sanity.eps_sweep(sweep["eps"], sweep["accuracy"], sweep["examples"], sweep["steps"])]
    pgd_names = [k for k in c if k.startswith("pgd-")]
    checks.append(sanity.more_steps({int(k[4:]): c[k].float().mean().item() for k in pgd_names}, len(run.y)))
    # gradient attacks through the router; AutoAttack without its Square part
    gradient = {k: c[k] for k in pgd_names}
    if "autoattack-gradient" in run.extra:
        gradient["autoattack-gradient"] = run.extra["autoattack-gradient"]
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


def _experts(ev: _Evaluator, run: _Run, robust: Tensor) -> dict:
    routing = run.clean_routing
    if ev.shared_router:
        keys = [str(r) for r in routing[:, 0].tolist()]
    else:
        keys = ["-".join(map(str, r)) for r in routing.tolist()]
    per_route = {}
    for key in sorted(set(keys)):
        mask = torch.tensor([k == key for k in keys], device=robust.device)
        per_route[key] = {"examples": int(mask.sum()), "clean_accuracy": run.correct["clean"][mask].float().mean().item(),
                          "robust_accuracy": robust[mask].float().mean().item()}
    document = {"clean_share": ev.share(routing),
                "adversarial_share": {k: v["expert_share"] for k, v in run.attacks.items() if "expert_share" in v},
                "route_flip_rate": {k: v["route_flip_rate"] for k, v in run.attacks.items() if "route_flip_rate" in v},
                "per_route": per_route,
                "route_key": "the expert of the shared router" if ev.shared_router else "experts of the MoE layers, in order"}
    if not ev.shared_router:
        n = ev.masked.cfg.num_experts
        document["clean_share_per_layer"] = [(col.bincount(minlength=n).float() / len(col)).tolist() for col in routing.T]
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
                        progress: bool | None = None, device: str = "cpu", **settings) -> dict:
    """Evaluate a checkpoint directory on the first `n_examples` test images of its dataset and
    write eval.json and eval.md (atomically) to `out` (default: the checkpoint directory).
    eps: linf budget in [0, 1] pixels (default: the checkpoint's training eps, else 8/255)."""
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    trained_on = config.get("dataset")
    if dataset and trained_on and dataset != trained_on:
        raise ValueError(f"{checkpoint} is a {trained_on} model, not {dataset}: pass --dataset {trained_on} "
                         f"or another checkpoint")
    dataset = dataset or trained_on
    if not dataset:
        raise ValueError(f"{checkpoint}/config.json names no dataset: pass --dataset")
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
        raise ValueError(f"n-examples must be >= 1, got {n_examples}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    model = advmoe.load_checkpoint(checkpoint, map_location=device)
    cfg = model.cfg
    if (cfg.in_channels, cfg.image_size, cfg.num_classes) != (info.in_channels, info.image_size, info.num_classes):
        raise ValueError(f"{checkpoint} takes {cfg.in_channels}x{cfg.image_size}x{cfg.image_size} images and "
                         f"{cfg.num_classes} classes; {dataset} has {info.in_channels}x{info.image_size}x{info.image_size} "
                         f"and {info.num_classes}")
    data = advmoe.load_dataset(dataset, "test", data_dir)
    n = min(n_examples, len(data))
    items = [data[i] for i in range(n)]
    x = torch.stack([item[0] for item in items])
    y = torch.tensor([item[1] for item in items])
    document = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint / WEIGHTS),
                "architecture": config["architecture"], "training_method": (config.get("training") or {}).get("method"),
                "dataset": dataset, "split": "test", "first_examples": n, "eps_source": eps_source,
                **evaluate_model(model, x, y, s, progress)}
    out = Path(out) if out is not None else checkpoint
    atomic_write_text(out / "eval.json", json.dumps(document, indent=1) + "\n")
    atomic_write_text(out / "eval.md", summary(document))
    return document


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
