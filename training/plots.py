"""PNG plots of a run's history: losses, clean, PGD, route-fixed and worst-case accuracy, per-expert usage."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def write(folder: Path, history: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # an epoch trained again after the collapse guard rolled back: the training of it that stands
    history = list({row["epoch"]: row for row in history}.values())
    epochs = [row["epoch"] for row in history]
    losses = sorted({k for row in history for k in row if k.startswith("train_") and k.endswith("loss")})
    _plot(folder / "loss.png", "training loss", epochs, {k.removeprefix("train_"): [r.get(k) for r in history] for k in losses})
    accuracy = {"clean": "val_clean_accuracy", "PGD": "val_pgd_accuracy"}
    if "val_route_fixed_accuracy" in history[-1]:  # a MoE model (a dense model's worst case is its PGD accuracy)
        accuracy |= {"route-fixed": "val_route_fixed_accuracy", "worst case": "val_worst_accuracy"}
    _plot(folder / "accuracy.png", "validation accuracy", epochs,
          {label: [r.get(key) for r in history] for label, key in accuracy.items()})
    if "val_expert_share" in history[0]:
        n = len(history[0]["val_expert_share"])
        series = {f"expert {e}": [r["val_expert_share"][e] for r in history] for e in range(n)}
        series |= {f"expert {e} (adversarial)": [r["val_expert_share_adversarial"][e] for r in history] for e in range(n)}
        _plot(folder / "experts.png", "share of validation routes per expert", epochs, series)


def _plot(path: Path, title: str, epochs: list[int], series: dict[str, list]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(epochs, values, marker="o", label=label, linestyle="--" if "adversarial" in label else "-")
    ax.set(title=title, xlabel="epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)  # never a half-written PNG
