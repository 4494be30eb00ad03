"""The result document of an evaluation: per-example `Results` of the units (which merge across
processes), the per-example worst case, and the eval.json document built from them (accuracy,
timing, perturbation size and expert usage per attack, sanity checks, versions)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

import advmoe
from advmoe.gate import expert_share

from . import autoattack, sanity

if TYPE_CHECKING:
    from .suite import Evaluator


class Clock:
    """Wall and CPU (process) seconds since creation: CPU time is what a core of its own would
    take, wall time what this run took next to whatever else the machine ran."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def timing(n: int, elapsed: tuple[float, float]) -> dict:
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



def build_document(ev: Evaluator, out: Results, y: Tensor, skipped: dict, sweep: dict, relative_change: Tensor | None,
                   started: Clock, world: int, device) -> dict:
    """The eval.json document (without the checkpoint fields) of the merged results `out` of every
    unit, labels y (on the CPU); `ev` is the evaluator that ran the attacks."""
    s, n = ev.s, len(y)
    names = ["clean"] + [k[: -len("/pred")] for k in out.rows if k.endswith("/pred") and k != "clean/pred"]
    correct = {name: out.correct(name, y) for name in names if not name.endswith("-gradient")}
    robust = worst_case(correct)
    accuracy = {name: c.float().mean().item() for name, c in correct.items()}
    accuracy["robust"] = robust.float().mean().item()
    entries = {"clean": {"accuracy": accuracy["clean"], **timing(n, out.seconds["clean"])}}
    for name in correct:
        if name != "clean":
            entries[name] = _attack_entry(ev, out, name, y)
    checks = _checks(out, correct, y, sweep, relative_change, ev.route_attacks)
    wall, cpu = started.elapsed()
    return {
        "examples": n,
        "eps": s.eps,
        "norm": "linf",
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "moe": ev.is_moe,
        "attacks_run": list(ev.attacks),
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


def _attack_entry(ev: Evaluator, out: Results, name: str, y: Tensor) -> dict:
    """One attack's accuracy, timing, perturbation size, expert usage and what it describes."""
    s, rows, n = ev.s, out.rows, len(y)
    step = s.step * s.eps
    pred = rows[f"{name}/pred"]
    entry = {"accuracy": (pred == y).float().mean().item(), **timing(n, out.seconds[name]),
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
        entry.update(_cascade_entry(ev, out, name, n))
    elif name == "route-fixed":
        entry.update(_route_fixed_entry(ev, rows, step))
    elif name == "router":
        entry.update(_router_entry(rows, s.route_steps, step))
    return entry


def _cascade_entry(ev: Evaluator, out: Results, name: str, n: int) -> dict:
    """AutoAttack (or APGD, FAB) in cascade: its components' timing and survivors, its total time."""
    s, rows, parts = ev.s, out.rows, []
    for part in ev.cascades[name]:
        seconds = out.seconds[f"{name}/{part}"]
        parts.append({"name": part, **timing(n, seconds), "attacked": int(rows[f"{name}/{part}/attacked"].sum()),
                      "accuracy_after": rows[f"{name}/{part}/alive"].float().mean().item()})
    total = (sum(p["seconds"] for p in parts), sum(p["cpu_seconds"] for p in parts))
    standard = (name == "autoattack" and ev.gradient_aa == autoattack.STANDARD[:3] and s.square_queries == 5000
                and s.apgd_iterations == 100)
    kind = "AutoAttack " + ("standard" if standard else "custom") if name == "autoattack" else name.upper()
    return {**timing(n, total), "components": parts, "standard": standard, "description": (
        f"{kind} (pyautoattack): {', '.join(p['name'].upper() for p in parts)} in cascade; robust if no "
        "component fools the example")}


def _route_fixed_entry(ev: Evaluator, rows: dict[str, Tensor], step: float) -> dict:
    """Per forced expert: accuracy forced and real; and the accuracy if the attacker chose the route."""
    s, experts = ev.s, range(ev.masked.cfg.num_experts)

    def mean(key: str) -> float:
        return rows[key].float().mean().item()

    routes = [{"expert": e, "forced_clean_accuracy": mean(f"route-fixed/{e}/forced_clean"),
               "forced_adversarial_accuracy": mean(f"route-fixed/{e}/forced_adversarial"),
               "real_accuracy": mean(f"route-fixed/{e}/real"),
               "routed_to_expert": mean(f"route-fixed/{e}/routed_to_expert")} for e in experts]
    forced = worst_case({e: rows[f"route-fixed/{e}/forced_adversarial"] for e in experts})
    return {"routes": routes, "accuracy_if_attacker_picks_route": forced.float().mean().item(),
            "description": (f"PGD-{s.route_steps} (step {step:.4g}) with every router forced to each of "
                            f"{len(experts)} experts (steer {s.steer:g}), judged on the real model, worst "
                            "candidate per example")}


def _router_entry(rows: dict[str, Tensor], steps: int, step: float) -> dict:
    """How often the router attack flips the prediction, given that it flipped the route or not."""
    route_flip = (rows["router/routing"] != rows["clean/routing"]).any(1)
    prediction_flip = rows["router/pred"] != rows["clean/pred"]

    def rate(mask: Tensor) -> float | None:
        return prediction_flip[mask].float().mean().item() if mask.any() else None

    return {"prediction_flip_rate": prediction_flip.float().mean().item(),
            "prediction_flip_given_route_flip": rate(route_flip),
            "prediction_flip_given_no_route_flip": rate(~route_flip),
            "description": f"PGD-{steps} (step {step:.4g}) maximising KL(router(x) || router(x')), labels unused"}


def _checks(out: Results, c: dict[str, Tensor], y: Tensor, sweep: dict, relative_change: Tensor | None,
            route_attacks: tuple[str, ...]) -> dict:
    clean = c["clean"]
    checks = [sanity.eps_sweep(sweep["eps"], sweep["accuracy"], sweep["examples"], sweep["steps"])]
    pgd_names = [k for k in c if k.startswith("pgd-")]
    checks.append(sanity.more_steps({int(k[4:]): c[k].float().mean().item() for k in pgd_names}, len(y)))
    # gradient attacks through the router; AutoAttack without its Square part
    gradient = {k: c[k] for k in pgd_names + ["apgd", "fab"] if k in c}
    if "autoattack-gradient/pred" in out.rows:
        gradient["autoattack-gradient"] = out.correct("autoattack-gradient", y)
    route = {k: c[k] for k in route_attacks if k in c}
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


def _experts(ev: Evaluator, out: Results, correct: dict[str, Tensor], robust: Tensor) -> dict:
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

