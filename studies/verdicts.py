"""The frontier study's verdicts, computed from the results (no number typed in): each is a typed
finding the report renders as a table row or one short line, and tests check by its numbers."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from advmoe.stats import mean_std
from training.methods import METHODS

from .curves import DenseCurve, Gap, dense_curves, gaps
from .falls import Fall, census, run_falls
from .record import RunResult, best_row, router_collapsed, worst

LEVEL_OFF = 0.01  # a last epoch that adds less validation PGD accuracy than this: levelled off
FALL = 0.2  # a seed's validation PGD accuracy falling this much in one epoch: named, as the row's mean blurs it
COMPARED = ("clean", "pgd-10", "pgd-50", "apgd", "route-fixed", "router")  # the attacks a loss is broken down by
PGD_GAP_TARGET, FLIP_TARGET = 0.05, 0.10
# training that does not collapse: over SEEDS_NEEDED runs or more, the worst case's standard deviation
# stays within SEED_STD_TARGET and no run falls more than SEED_LOW_TARGET under the row's mean
SEEDS_NEEDED, SEED_STD_TARGET, SEED_LOW_TARGET = 3, 0.015, 0.03


@dataclass
class Comparison:
    """One row against another on mean worst case, weighed against the seed spread (the larger of the
    two rows' standard deviations). A row of one run has no spread: no verdict either way."""
    row: str
    other: str
    against: str  # what the other row is to this one ("dense, equal MACs", "MoE-AT", "its base row")
    mean: float
    other_mean: float
    spread: float
    one_run: bool
    by_attack: dict[str, float] = field(default_factory=dict)  # mean differences, where it does not beat

    @property
    def difference(self) -> float:
        return self.mean - self.other_mean

    @property
    def beats(self) -> bool:
        return not self.one_run and self.difference > self.spread

    @property
    def verdict(self) -> str:
        if self.one_run:
            return "one run: no spread yet"
        return "beats" if self.beats else "does not beat"


@dataclass
class Curve:
    """A row's validation PGD accuracy by epoch (mean over its runs) and what it did."""
    row: str
    pgd: list[float]
    route_fixed: list[float] | None
    state: str  # "levelled off" | "still rising" | "peaked at epoch N, fell after"
    falls: list[tuple[str, int, float, float, float | None]]  # (run, epoch, before, after, the epoch after)
    rollbacks: list[tuple[str, int]] = field(default_factory=list)  # (run, epoch): trained again by the collapse guard


@dataclass
class Target:
    row: str
    pgd: str
    pgd_minus_worst: float
    route_flips: float
    runs: int
    worst_std: float
    lowest_under_mean: float  # the mean worst case minus the lowest run's

    @property
    def met(self) -> dict[str, bool | None]:
        """Each target met or not; the seeds' target is None (not yet weighable) under SEEDS_NEEDED runs."""
        seeds = (self.worst_std <= SEED_STD_TARGET and self.lowest_under_mean <= SEED_LOW_TARGET
                 if self.runs >= SEEDS_NEEDED else None)
        return {"pgd_gap": self.pgd_minus_worst <= PGD_GAP_TARGET, "route_flips": self.route_flips <= FLIP_TARGET,
                "seeds": seeds}


def target(runs: list[RunResult]) -> Target:
    mean, std = worst(runs)
    return Target(runs[0].row.label, runs[0].pgd, mean_std([r.pgd_minus_worst for r in runs])[0],
                  mean_std([r.route_flip_rate for r in runs])[0], len(runs), std,
                  mean - min(r.worst_case for r in runs))


@dataclass
class Findings:
    best: str | None = None  # the best MoE row that is still a mixture
    comparisons: list[Comparison] = field(default_factory=list)
    collapsed: dict[str, float] = field(default_factory=dict)  # row: its busiest expert's share of clean routes
    ahead_on_one_run: list[str] = field(default_factory=list)  # rows above the best on a single run
    width: dict | None = None  # what width buys the dense line
    twin: dict | None = None  # the sparse model against the dense model it was cut from
    masking: list[tuple[str, int, str]] = field(default_factory=list)  # (row, seed, detail): Square beat white-box
    curves: list[Curve] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    dense_curves: list[DenseCurve] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)  # every MoE row against the dense curve at its MACs
    fall_census: list[Fall] = field(default_factory=list)  # every run's one-epoch falls, with their kind


def _mean(runs: list[RunResult], key: str) -> float:
    return mean_std([r.accuracy.get(key) for r in runs])[0]


def compare(grouped: dict[str, list[RunResult]], key: str, other: str, against: str) -> Comparison:
    (m, sm), (o, so) = worst(grouped[key]), worst(grouped[other])
    found = Comparison(grouped[key][0].row.label, grouped[other][0].row.label, against, m, o, max(sm, so),
                       one_run=len(grouped[key]) == 1 or len(grouped[other]) == 1)
    if not found.beats:  # where it loses: the difference under each attack both rows ran
        diff = {k: _mean(grouped[key], k) - _mean(grouped[other], k) for k in COMPARED}
        found.by_attack = {k: v for k, v in diff.items() if not math.isnan(v)}
    return found


def equal_cost(grouped: dict[str, list[RunResult]], dense: dict, key: str, fallback: bool) -> list[str]:
    """The dense rows of the MACs nearest a MoE row's among those trained as many epochs, the most
    robust first: with several methods at that cost (PGD-AT, TRADES), the MoE row has to beat each.
    A longer schedule helps both sides, so a row is weighed against dense rows of its own epochs;
    only the best MoE row falls back to the others where none has them."""
    epochs = grouped[key][0].epochs
    pool = {k: runs for k, runs in dense.items() if runs[0].epochs == epochs} or (dense if fallback else {})
    if not pool:
        return []
    macs = grouped[key][0].macs_per_image
    nearest = min(abs(runs[0].macs_per_image - macs) for runs in pool.values())
    return sorted((k for k, runs in pool.items() if abs(runs[0].macs_per_image - macs) == nearest),
                  key=lambda k: -worst(grouped[k])[0])


def variant_base(grouped: dict[str, list[RunResult]], key: str) -> str | None:
    """The row a variant varies: the longest other key its own key extends, so a variant of a variant
    (ce_steps3_e10 of ce_steps3) is weighed against that variant, not against the plain row."""
    bases = [k for k in grouped if k != key and key.startswith((f"{k}-", f"{k}_"))]
    return max(bases, key=len) if bases else None


def width_finding(grouped: dict[str, list[RunResult]], dense_line: dict) -> dict | None:
    """What capacity buys the dense line: whether the MoE width starves its experts."""
    if len(dense_line) < 2:
        return None
    by_cost = sorted(dense_line, key=lambda k: dense_line[k][0].macs_per_image)
    cheapest, dearest = by_cost[0], by_cost[-1]
    rise = worst(grouped[dearest])[0] - worst(grouped[cheapest])[0]
    spread = max((worst(grouped[k])[1] for k in by_cost if len(dense_line[k]) > 1), default=0.0)
    return {"rows": [(dense_line[k][0].macs_per_image, worst(grouped[k])[0]) for k in by_cost],
            "macs_ratio": dense_line[dearest][0].macs_per_image / dense_line[cheapest][0].macs_per_image,
            "rise": rise, "spread": spread, "capacity_limits": rise > spread}


def curve(runs: list[RunResult]) -> Curve:
    """Whether the row's validation robustness levelled off, and any seed's one-epoch fall, which the
    row's mean would blur (named only for a row of several runs: one run's curve shows its own)."""
    pgd = mean_curve(runs)
    fixed = (mean_curve(runs, "val_route_fixed_accuracy")  # runs since it was recorded
             if all(e.get("val_route_fixed_accuracy") is not None for r in runs for e in r.curve) else None)
    peak = max(range(len(pgd)), key=pgd.__getitem__)
    if peak < len(pgd) - 1 and pgd[-1] < pgd[peak] - LEVEL_OFF:
        state = f"peaked at epoch {peak + 1}, fell after"
    elif len(pgd) > 1 and pgd[-1] - pgd[-2] >= LEVEL_OFF:
        state = "still rising"
    else:
        state = "levelled off"
    rollbacks = [(r.run_label, e["epoch"]) for r in runs for e in r.curve if e.get("collapse_guard")]
    return Curve(runs[0].row.label, pgd, fixed, state, falls(runs) if len(runs) > 1 else [], rollbacks)


def mean_curve(runs: list[RunResult], key: str = "val_pgd_accuracy") -> list[float]:
    """A validation accuracy per epoch, the mean over the runs that reached the epoch."""
    epochs = max(len(r.curve) for r in runs)
    return [statistics.mean(r.curve[e][key] for r in runs if e < len(r.curve)) for e in range(epochs)]


def falls(runs: list[RunResult]) -> list[tuple[str, int, float, float, float | None]]:
    """Each epoch where a run's validation PGD accuracy fell by FALL or more from the epoch before, with
    the next epoch's (a recovery, or not)."""
    return [(f.run, f.epoch, f.before["pgd"], f.after["pgd"], f.next_pgd) for r in runs for f in run_falls(r)
            if f.after["pgd"] <= f.before["pgd"] - FALL]


def verdicts(grouped: dict[str, list[RunResult]]) -> Findings:
    dense = {k: runs for k, runs in grouped.items() if not runs[0].row.is_moe}
    moe = {k: runs for k, runs in grouped.items() if runs[0].row.is_moe}
    found = Findings(curves=[curve(runs) for runs in grouped.values()], dense_curves=dense_curves(grouped),
                     fall_census=census(grouped))
    found.gaps = gaps(grouped, found.dense_curves)
    if not dense or not moe:
        return found
    found.collapsed = {runs[0].row.label: share for runs in moe.values() if (share := router_collapsed(runs))}
    # the best MoE row that is still a mixture: a collapsed router makes a dense model of one expert
    mixtures = {k: runs for k, runs in moe.items() if router_collapsed(runs) is None} or moe
    best = found.best = best_row(mixtures)
    found.ahead_on_one_run = [runs[0].row.label for k, runs in mixtures.items()
                              if len(runs) == 1 and worst(runs)[0] > worst(grouped[best])[0]]
    # a longer schedule helps every row, so the twin, MoE-AT and the dense rows of another schedule
    # are weighed against the best mixture trained as long as they were
    epochs = {k: runs[0].epochs for k, runs in grouped.items()}
    best_of = {e: best_row({k: r for k, r in mixtures.items() if epochs[k] == e}) for e in {epochs[k] for k in mixtures}}
    other_schedules = sorted((k for k in best_of.values() if k != best), key=epochs.get)
    found.comparisons += [compare(grouped, best, o, "dense, equal MACs") for o in equal_cost(grouped, dense, best, True)]
    found.comparisons += [compare(grouped, k, o, f"dense, equal MACs, {epochs[k]} epochs")
                          for k in other_schedules for o in equal_cost(grouped, dense, k, False)]
    dense_line = {k: runs for k, runs in dense.items() if runs[0].row.is_dense_line}
    found.width = width_finding(grouped, dense_line)
    twins = [k for k in dense_line if grouped[k][0].row.width == grouped[best][0].row.width and epochs[k] in best_of]
    if twins:  # the sparse model against the dense model it was cut from: what it keeps for what it saves
        key, twin = best_of[epochs[twins[0]]], twins[0]
        m, o = worst(grouped[key])[0], worst(grouped[twin])[0]
        found.twin = {"row": grouped[key][0].row.label, "twin": grouped[twin][0].row.label, "worst": m, "twin_worst": o,
                      "macs_ratio": grouped[key][0].macs_per_image / grouped[twin][0].macs_per_image,
                      "kept": m / o if o > 0 else None}
    # MoE-AT: the MoE model adversarially trained as a whole with one optimiser (the paper's TRADES,
    # or PGD-AT's loss as a variant); the best row of its schedule has to beat each of them
    joint = [k for k, runs in moe.items() if (m := METHODS[runs[0].row.method]).groups == ("all",) and m.attacks]
    found.comparisons += [compare(grouped, best_of[epochs[o]], o, "MoE-AT") for o in joint
                          if best_of.get(epochs[o]) not in (None, o)]
    found.comparisons += [compare(grouped, k, base, "its base row") for k, runs in grouped.items()
                          if runs[0].row.variant and (base := variant_base(grouped, k))]
    found.masking = [(r.row.label, r.seed, r.autoattack["square_check"]["detail"]) for runs in grouped.values()
                     for r in runs if r.autoattack and not r.autoattack["square_check"]["passed"]]
    found.targets = [target(grouped[k]) for k in [best, *other_schedules]]
    return found
