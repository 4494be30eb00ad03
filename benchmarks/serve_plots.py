"""The efficiency report's plots: throughput over concurrency, latency percentiles at the target
concurrency, and the measured speed-up against the MAC ratio. Each series has its own colour and
marker, kept across the plots, and the legend sits outside the data."""
from __future__ import annotations

from pathlib import Path

from .serve_targets import find, target_concurrency

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
MARKERS = ("o", "s", "^", "D", "v", "P")


def styles(keys: list) -> dict:
    """{series: (colour, marker)}, distinct for each series, in the order given."""
    if len(keys) > len(COLOURS):
        raise ValueError(f"{len(keys)} series, but only {len(COLOURS)} colours: add colours to COLOURS")
    return {key: (COLOURS[i], MARKERS[i]) for i, key in enumerate(keys)}


def plot(result: dict, folder: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    n = result["images_per_request"][0]  # the plots show one request size: the first
    rows = [r for r in result["rows"] if r["images_per_request"] == n]
    series = sorted({(r["variant"], r["runtime"]) for r in rows}, key=lambda k: (k[1], k[0]))
    return [throughput_plot(rows, series, n, folder / f"{stem}_throughput.png"),
            latency_plot(rows, series, n, target_concurrency(result), folder / f"{stem}_latency.png"),
            macs_plot(rows, result["macs"], n, target_concurrency(result), folder / f"{stem}_macs.png")]


def throughput_plot(rows: list[dict], series: list, n: int, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for (variant, runtime), (colour, marker) in styles(series).items():
        points = [r for r in rows if (r["variant"], r["runtime"]) == (variant, runtime) and r["level"].isdigit()]
        ax.plot([r["concurrency"] for r in points], [r["images_per_s"] for r in points], color=colour, marker=marker,
                linestyle="-" if runtime == "onnxruntime" else "--", label=f"{variant}, {runtime}")
    levels = sorted({r["concurrency"] for r in rows if r["level"].isdigit()})
    ax.set(xscale="log", xlabel="concurrent users", ylabel="images / s", ylim=(0, None),
           title=f"Served throughput, {n} image(s) per request")
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    return _save(fig, ax, path)


def latency_plot(rows: list[dict], series: list, n: int, c: int, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(series)
    for i, ((variant, runtime), (colour, _)) in enumerate(styles(series).items()):
        r = find(rows, variant, runtime, c, n)
        ax.bar(np.arange(3) + i * width, [r["p50_ms"], r["p95_ms"], r["p99_ms"]], width, color=colour,
               label=f"{variant}, {runtime}")
    ax.set_xticks(np.arange(3) + width * (len(series) - 1) / 2, ["p50", "p95", "p99"])
    ax.set(ylabel="ms", title=f"Latency at concurrency {c}, {n} image(s) per request")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, ax, path)


def macs_plot(rows: list[dict], macs: dict, n: int, c: int, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(macs["dense"], macs["masked"]) / macs["sparse"] * 1.1
    ax.plot([1, top], [1, top], color="grey", linewidth=1, label="speed-up = MAC ratio")
    runtimes = sorted({r["runtime"] for r in rows})
    points = [(other, key, runtime) for runtime in runtimes for other, key in (("dense twin", "dense"),
                                                                               ("masked", "masked"))]
    for (other, key, runtime), (colour, marker) in styles(points).items():
        sparse = find(rows, "sparse", runtime, c, n)["images_per_s"]
        ax.scatter(macs[key] / macs["sparse"], sparse / find(rows, other, runtime, c, n)["images_per_s"], s=60,
                   color=colour, marker=marker, label=f"sparse vs {other}, {runtime}")
    ax.set(xlabel="MAC ratio (other / sparse)", ylabel=f"served speed-up at concurrency {c}",
           title="What the MACs promise vs what serving gives")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
