"""The frontier plot: worst-case robust accuracy against MACs per image and, where the rows were
timed (--time-rows), against milliseconds per image at batch 1 and 64; each dense curve (the dense
PGD-AT rows of one schedule) as a black line, each other row its own colour and marker; beside them,
validation robustness by epoch. Rows at the same cost (every MoE row of one width) are spread a
little sideways so none hides another; the legend sits below the axes."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .curves import dense_curves
from .record import RunResult, worst
from .speed import Speed
from .verdicts import mean_curve

MARKERS = "sD^vP*Xh<>p"
DODGE = 0.012  # sideways spread of rows at one cost, as a share of that cost
LINE_MARKERS = "os^"  # the dense lines (one per schedule), in black
ROW_MARKERS = "H8dp<>"  # the dense lines' rows in the validation panel, each its own grey (none black)


def _points(rows: list[list[RunResult]], cost: Callable[[list[RunResult]], float]) -> list[tuple[str, float, float, float]]:
    """(label, x, mean, std) of each row, rows at one cost spread sideways."""
    by_cost: dict[float, list] = {}
    for runs in rows:
        by_cost.setdefault(cost(runs), []).append(runs)
    points = []
    for x, group in by_cost.items():
        for i, runs in enumerate(group):
            points.append((runs[0].row.label, x * (1 + DODGE * (i - (len(group) - 1) / 2)), *worst(runs)))
    return points


def curve_rows(grouped: dict[str, list[RunResult]]) -> list[tuple[str, list[str]]]:
    """Each dense curve as (its label, its rows' keys by MACs): one line per schedule, named by its
    variant too, as two variants of one schedule make two curves."""
    found = []
    for c in dense_curves(grouped):
        variant = grouped[c.points[0].key][0].row.variant
        found.append((f"dense PGD-AT, {c.trained['epochs']} epochs{f' ({variant})' if variant else ''} (a line)",
                      [p.key for p in c.points]))
    return found


def styles(grouped: dict[str, list[RunResult]], colours) -> dict[str, tuple]:
    """(colour, marker) of every row and dense line, none shared: the lines' rows in greys, the others in colour."""
    lines = curve_rows(grouped)
    on_a_line = {key for _, keys in lines for key in keys}
    line = [grouped[key][0].row.label for _, keys in lines for key in keys]
    others = [runs[0].row.label for key, runs in grouped.items() if key not in on_a_line]
    found = {label: (f"{0.25 + 0.55 * i / max(len(line) - 1, 1):.2f}", ROW_MARKERS[i % len(ROW_MARKERS)])
             for i, label in enumerate(line)}
    found |= {label: ("black", LINE_MARKERS[i % len(LINE_MARKERS)]) for i, (label, _) in enumerate(lines)}
    found |= {label: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, label in enumerate(others)}
    return found


def _frontier(axes, grouped: dict[str, list[RunResult]], style: dict, cost: Callable, xlabel: str, title: str) -> None:
    """Worst case against one cost: a line per dense curve, then every other row as its own point."""
    lines = curve_rows(grouped)
    for label, keys in lines:
        x, mean, std = zip(*sorted((cost(grouped[k]), *worst(grouped[k])) for k in keys))
        colour, marker = style[label]
        axes.errorbar(x, [100 * v for v in mean], yerr=[100 * s for s in std], fmt=f"{marker}-", color=colour,
                      capsize=3, label=label)
    on_a_line = {key for _, keys in lines for key in keys}
    others = [runs for key, runs in grouped.items() if key not in on_a_line]
    for label, x, mean, std in _points(others, cost):
        axes.errorbar([x], [100 * mean], yerr=[100 * std], fmt=style[label][1], color=style[label][0], capsize=3,
                      label=label)
    axes.set(xlabel=xlabel, ylabel="worst-case robust accuracy (%)", title=title, xscale="log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 10, 20, 30 on the log axis, not powers of ten
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.grid(alpha=0.3, which="both")


def plot(grouped: dict[str, list[RunResult]], path: Path, speeds: dict[str, Speed] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speeds = speeds or {}
    timed = {k: runs for k, runs in grouped.items() if k in speeds}
    fig, axes = plt.subplots(2, 2, figsize=(14, 10)) if timed else plt.subplots(1, 2, figsize=(14, 5.5))
    axes = list(axes.flat)
    style = styles(grouped, plt.get_cmap("tab20" if len(grouped) > 10 else "tab10").colors)
    _frontier(axes[0], grouped, style, lambda runs: runs[0].macs_per_image / 1e6, "MACs per image (M)",
              "Robustness against MACs (mean ± std over runs)")
    if timed:
        for ax, batch in zip(axes[1:3], (1, 64)):
            _frontier(ax, timed, style, lambda runs, b=batch: speeds[runs[0].row.key].ms_per_image[b],
                      f"ms per image at batch {batch}, fastest runtime", f"Robustness against time, batch {batch}")
    curves = axes[-1]
    for runs in grouped.values():
        label = runs[0].row.label
        colour, marker = style[label]
        mean = mean_curve(runs)
        curves.plot(range(1, len(mean) + 1), [100 * v for v in mean], marker=marker, color=colour,
                    linestyle="-" if runs[0].row.is_moe else "--", label=label)
    curves.set(xlabel="epoch", ylabel="validation PGD accuracy (%)", title="Validation robustness by epoch")
    curves.grid(alpha=0.3)
    handles, labels = curves.get_legend_handles_labels()
    drawn, names = axes[0].get_legend_handles_labels()  # the dense lines: only the frontier panels draw them
    lines = [label for label, _ in curve_rows(grouped)]
    handles += [h for h, name in zip(drawn, names) if name in lines]
    labels += [name for name in names if name in lines]
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.013 * ((len(labels) + 1) // 2) * (2 if not timed else 1), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
