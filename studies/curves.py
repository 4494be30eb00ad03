"""The dense curve and each MoE point's distance to it: for a budget of MACs per image, is a mixture
of experts more robust than the dense model of that budget?

A dense curve is the study's dense PGD-AT rows (its own or a variant's, such as a longer schedule)
trained alike but for width: worst case (mean and spread over runs) against MACs per image. A MoE
point is weighed against the curve of its data, budget and epochs, interpolated at its MACs (linear
in log MACs between the two dense widths around it; none outside the curve's range), with the
larger of the two spreads."""
from __future__ import annotations

import math
from dataclasses import dataclass

from training.config import with_defaults

from .record import RunResult, worst

# what may differ between the rows of one dense curve: the width, and what says nothing of training
NOT_TRAINING = ("width", "seed", "data_dir", "workers", "device")
MATCH = ("dataset", "eps", "epochs", "train_examples")  # a MoE point and its curve have these in common


@dataclass
class Point:
    key: str
    row: str  # label
    macs: int
    mean: float
    spread: float  # standard deviation over runs (0 for one run)
    runs: int


@dataclass
class DenseCurve:
    trained: dict  # its rows' MATCH settings: data set, ε, epochs, training images
    points: list[Point]  # by MACs

    def at(self, macs: int) -> tuple[float, float] | None:
        """The curve's worst case at `macs` and its spread there (the larger of the two neighbours'),
        or None outside the curve's range of MACs."""
        for low, high in zip(self.points, self.points[1:]):
            if low.macs <= macs <= high.macs:
                t = (math.log(macs) - math.log(low.macs)) / (math.log(high.macs) - math.log(low.macs))
                return low.mean + t * (high.mean - low.mean), max(low.spread, high.spread)
        return None


@dataclass
class Gap:
    key: str
    row: str
    experts: int
    router: str  # "1x8": blocks per stage x first-stage channels
    macs: int
    mean: float
    spread: float
    runs: int
    dense: float | None  # the dense curve at the point's MACs
    dense_spread: float | None

    @property
    def difference(self) -> float | None:
        return None if self.dense is None else self.mean - self.dense

    @property
    def verdict(self) -> str:
        if self.dense is None:
            return "outside the dense curve"
        if self.runs == 1:
            return "one run: no spread yet"
        margin = max(self.spread, self.dense_spread)
        if self.difference > margin:
            return "above the dense curve"
        return "under the dense curve" if self.difference < -margin else "within the spread"


def _point(runs: list[RunResult]) -> Point:
    mean, spread = worst(runs)
    return Point(runs[0].row.key, runs[0].row.label, runs[0].macs_per_image, mean, spread, len(runs))


def dense_curves(grouped: dict[str, list[RunResult]]) -> list[DenseCurve]:
    """The dense curves there are: dense PGD-AT rows trained alike but for width, two widths or more."""
    by_training: dict[str, list[list[RunResult]]] = {}
    for runs in grouped.values():
        if runs[0].row.is_dense_pgd_at:
            # a result written before a setting existed ran at its default: the same training
            training = {k: v for k, v in with_defaults(runs[0].config).items() if k not in NOT_TRAINING}
            by_training.setdefault(repr(sorted(training.items())), []).append(runs)
    return [DenseCurve(_trained(rows[0]), sorted((_point(r) for r in rows), key=lambda p: p.macs))
            for rows in by_training.values() if len(rows) > 1]


def _trained(runs: list[RunResult]) -> dict:
    return {k: runs[0].config.get(k) for k in MATCH}


def _matching(curves: list[DenseCurve], runs: list[RunResult]) -> DenseCurve | None:
    """The curve trained on the point's data and budget for as many epochs (the one of most widths)."""
    return max((c for c in curves if c.trained == _trained(runs)), key=lambda c: len(c.points), default=None)


def gaps(grouped: dict[str, list[RunResult]], curves: list[DenseCurve]) -> list[Gap]:
    """Every MoE row against the dense curve at its MACs, by MACs."""
    found = []
    for runs in grouped.values():
        if not runs[0].row.is_moe:
            continue
        config, curve = runs[0].config, _matching(curves, runs)
        at = curve.at(runs[0].macs_per_image) if curve else None
        mean, spread = worst(runs)
        found.append(Gap(runs[0].row.key, runs[0].row.label, config["num_experts"], f"{config['router_blocks']}x{config['router_width']}",
                         runs[0].macs_per_image, mean, spread, len(runs), *(at or (None, None))))
    return sorted(found, key=lambda g: g.macs)


NEAR = 0.15  # a dense row within this share of a MoE row's MACs stands for the curve where there is none


def dense_at(grouped: dict[str, list[RunResult]], key: str) -> float | None:
    """The dense worst case at MoE row `key`'s MACs: its dense curve there, or, where no curve spans
    its MACs, the mean of the dense PGD-AT row trained alike nearest in MACs within NEAR of them."""
    gap = next((g for g in gaps(grouped, dense_curves(grouped)) if g.key == key), None)
    if gap and gap.dense is not None:
        return gap.dense
    macs = grouped[key][0].macs_per_image
    near = [runs for runs in grouped.values() if not runs[0].row.is_moe and runs[0].row.method == "pgd-at"
            and _trained(runs) == _trained(grouped[key]) and abs(runs[0].macs_per_image / macs - 1) <= NEAR]
    return worst(min(near, key=lambda runs: abs(runs[0].macs_per_image - macs)))[0] if near else None


def regime(found: list[Gap]) -> list[str]:
    """The MoE points above the dense curve beyond the spread: where a mixture of experts pays."""
    return [g.row for g in found if g.verdict == "above the dense curve"]
