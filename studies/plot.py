"""The frontier plot: worst-case robust accuracy against MACs per image, the dense PGD-AT rows as a
line, each other row its own colour and marker; beside it, validation robustness by epoch. Rows
at the same MACs (every MoE row of one width) are spread a little sideways so none hides another;
legends sit outside the axes."""
from __future__ import annotations

from pathlib import Path

from .record import RunResult, worst
from .verdicts import mean_curve

MARKERS = "sD^vP*Xh<>p"
DODGE = 0.012  # sideways spread of rows at one MACs value, as a share of that value
LINE_STYLES = (("black", "o"), ("0.4", "H"), ("0.65", "8"), ("0.8", "d"))  # the dense line's rows, by MACs


def _points(grouped: dict[str, list[RunResult]]) -> list[tuple[str, float, float, float]]:
    """(label, x in M MACs, mean, std) of every row off the dense line, rows at one MACs value spread."""
    others = [runs for runs in grouped.values() if not runs[0].row.is_dense_line]
    by_macs: dict[int, list] = {}
    for runs in others:
        by_macs.setdefault(runs[0].macs_per_image, []).append(runs)
    points = []
    for macs, group in by_macs.items():
        for i, runs in enumerate(group):
            x = macs / 1e6 * (1 + DODGE * (i - (len(group) - 1) / 2))
            points.append((runs[0].row.label, x, *worst(runs)))
    return points


def styles(grouped: dict[str, list[RunResult]], colours) -> dict[str, tuple]:
    """(colour, marker) of every row, none shared: the dense line's rows in greys, the others in colour."""
    line = [runs[0].row.label for runs in grouped.values() if runs[0].row.is_dense_line]
    others = [runs[0].row.label for runs in grouped.values() if not runs[0].row.is_dense_line]
    found = {label: LINE_STYLES[i % len(LINE_STYLES)] for i, label in enumerate(line)}
    found |= {label: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, label in enumerate(others)}
    return found


def plot(grouped: dict[str, list[RunResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (frontier, curves) = plt.subplots(1, 2, figsize=(14, 5.5))
    style = styles(grouped, plt.get_cmap("tab20" if len(grouped) > 10 else "tab10").colors)
    dense = sorted((runs[0].macs_per_image, *worst(runs)) for runs in grouped.values() if runs[0].row.is_dense_line)
    if dense:
        macs, mean, std = zip(*dense)
        frontier.errorbar([m / 1e6 for m in macs], [100 * v for v in mean], yerr=[100 * s for s in std], fmt="o-",
                          color="black", capsize=3, label="dense PGD-AT (the line)")
    for label, x, mean, std in _points(grouped):
        frontier.errorbar([x], [100 * mean], yerr=[100 * std], fmt=style[label][1], color=style[label][0], capsize=3,
                          label=label)
    frontier.set(xlabel="MACs per image (M)", ylabel="worst-case robust accuracy (%)",
                 title="Robustness against cost (mean ± std over runs)")
    frontier.grid(alpha=0.3)
    for runs in grouped.values():
        label = runs[0].row.label
        colour, marker = style[label]
        mean = mean_curve(runs)
        curves.plot(range(1, len(mean) + 1), [100 * v for v in mean], marker=marker, color=colour,
                    linestyle="-" if runs[0].row.is_moe else "--", label=label)
    curves.set(xlabel="epoch", ylabel="validation PGD accuracy (%)", title="Validation robustness by epoch")
    curves.grid(alpha=0.3)
    handles, labels = curves.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(labels) + 1) // 2), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
