"""The served efficiency targets, each checked against the measured rows of `advmoe bench serve`:
one `Check` per target, runtime and request size, holding the measured value and its bound."""
from __future__ import annotations

from dataclasses import dataclass

TARGET_CONCURRENCY = 32
# By images per request: sparse images/s at least this times the other variant's, at the target
# concurrency.
THROUGHPUT_TARGETS = {1: {"dense twin": 1.8, "masked": 1.5}, 8: {"dense twin": 2.0}}
# By images per request: the dense twin's server CPU per image at least this times sparse's.
CPU_TARGETS = {1: 1.9, 8: 2.1}
# A lone request right after a burst: sparse p50 at most the model's time per call plus this.
LONE_SLACK_MS = 5.0


@dataclass(frozen=True)
class Check:
    """One target: `measured` against `bound`, met when measured >= bound (or <= with at_most)."""
    runtime: str
    images_per_request: int
    name: str
    measured: float
    bound: float
    unit: str  # "x" (a ratio), "ms" or "errors"
    at_most: bool = False

    @property
    def met(self) -> bool:
        return self.measured <= self.bound if self.at_most else self.measured >= self.bound

    def cells(self) -> list[str]:
        """runtime, images/request, target, measured, bound, met: a row of the targets table."""
        bound = f"{'<=' if self.at_most else '>='} {number(self.bound, self.unit)}"
        return [self.runtime, str(self.images_per_request), self.name, number(self.measured, self.unit), bound,
                "met" if self.met else "missed"]

    def line(self) -> str:
        return " | ".join(self.cells())


def number(value: float, unit: str) -> str:
    if unit == "errors":
        return f"{value:.0f}"
    return f"{value:.2f}x" if unit == "x" else f"{value:.1f} ms"


def find(rows: list[dict], variant: str, runtime: str, level, images_per_request: int = 1) -> dict:
    """The row of one variant, runtime, level ("32", "1 after 64") and request size."""
    key = (variant, runtime, str(level), images_per_request)
    for row in rows:
        if (row["variant"], row["runtime"], row["level"], row["images_per_request"]) == key:
            return row
    raise KeyError(f"no measured row for {key}")


def target_concurrency(result: dict) -> int:
    """The concurrency the targets are judged at: TARGET_CONCURRENCY, else the highest measured."""
    return TARGET_CONCURRENCY if TARGET_CONCURRENCY in result["concurrency"] else max(result["concurrency"])


def checks(result: dict) -> list[Check]:
    """Every target for every runtime and request size measured, in a fixed order."""
    found = []
    for runtime in sorted({r["runtime"] for r in result["rows"]}):
        for n in result["images_per_request"]:
            found += _checks_at(result, runtime, n)
    return found


def _checks_at(result: dict, runtime: str, n: int) -> list[Check]:
    rows, c, top = result["rows"], target_concurrency(result), max(result["concurrency"])
    sparse, dense = find(rows, "sparse", runtime, c, n), find(rows, "dense twin", runtime, c, n)
    found = []
    if n in CPU_TARGETS:
        ratio = dense["cpu_ms_per_image"]["server"] / sparse["cpu_ms_per_image"]["server"]
        found.append(Check(runtime, n, f"dense twin / sparse server CPU per image, concurrency {c}", ratio,
                           CPU_TARGETS[n], "x"))
    for other, target in THROUGHPUT_TARGETS.get(n, {}).items():
        ratio = sparse["images_per_s"] / find(rows, other, runtime, c, n)["images_per_s"]
        found.append(Check(runtime, n, f"sparse / {other} images/s, concurrency {c}", ratio, target, "x"))
    if f"1 after {top}" in result["levels"]:
        lone = find(rows, "sparse", runtime, f"1 after {top}", n)
        found.append(Check(runtime, n, f"sparse p50, concurrency 1 after {top} (model ms per call + "
                                       f"{LONE_SLACK_MS:g})", lone["p50_ms"],
                           lone["compute_ms_per_call"] + LONE_SLACK_MS, "ms", at_most=True))
    p99_ratios = [r["p99_ms"] / find(rows, "dense twin", runtime, r["level"], n)["p99_ms"] for r in rows
                  if (r["variant"], r["runtime"], r["images_per_request"]) == ("sparse", runtime, n)
                  and r["level"] in result["levels"]]
    found.append(Check(runtime, n, "sparse / dense twin p99, worst level", max(p99_ratios), 1.0, "x", at_most=True))
    errors = sum(r["errors"] for r in rows
                 if (r["runtime"], r["images_per_request"], r["level"]) == (runtime, n, str(top)))
    found.append(Check(runtime, n, f"errors over all variants, concurrency {top}", errors, 0, "errors", at_most=True))
    return found
