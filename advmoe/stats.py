"""Mean and spread over seeds, as the reports print them (no torch: plain floats)."""
from __future__ import annotations

import statistics


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the values that are not None (0 for one value,
    NaN for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def percent(values: list[float | None]) -> str:
    """'61.3 ± 2.0' for fractions [0.6, 0.62, ...]; '61.3' for one value (one seed has no
    spread to show); 'n/a' when there is none."""
    mean, std = mean_std(values)
    if mean != mean:
        return "n/a"
    return f"{100 * mean:.1f}" if sum(v is not None for v in values) == 1 else f"{100 * mean:.1f} ± {100 * std:.1f}"
