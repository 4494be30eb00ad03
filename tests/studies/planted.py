"""Study results planted by hand: RunResult records whose numbers a test chooses, so that the
verdicts and tables computed from them can be checked against those numbers."""
from __future__ import annotations

from studies.design import Row
from studies.record import CURVE_KEYS, RunResult
from training.config import resolve

EPOCH_SECONDS = 120.0


def curve_of(pgd: tuple[float, ...], route_fixed: tuple[float | None, ...] | None = None) -> list[dict]:
    """A run's training curve: validation PGD accuracy by epoch, and route-fixed where given (None:
    a run from before validation ran it)."""
    route_fixed = route_fixed or (None,) * len(pgd)
    return [{**dict.fromkeys(CURVE_KEYS), "epoch": e + 1, "val_pgd_accuracy": v, "val_route_fixed_accuracy": f,
             "epoch_seconds": EPOCH_SECONDS} for e, (v, f) in enumerate(zip(pgd, route_fixed, strict=True))]


def planted(key: str, method: str, macs: int, worst: list[float], apgd: list[float], busiest: float = 0.55,
            curve: tuple[float, ...] = (0.6, 0.7, 0.705), width: float = 0.25, variant: str | None = None,
            epochs: int = 5, model: str | None = None, settings: dict | None = None) -> list[RunResult]:
    """A row's runs, one per worst case in `worst` (seeds 0, 1, ...): clean 83 %, PGD-10 73 %,
    APGD-CE+T from `apgd`; MoE rows (the model moe_resnet18 unless `model` says otherwise) route
    `busiest` of their clean images to one expert and flip 4 % of routes under the router attack."""
    model = model or ("resnet18" if method in ("pgd-at", "trades") else "moe_resnet18")
    row = Row(key, key, method, model, width, tuple(range(len(worst))), variant=variant, settings=settings or {})
    moe = row.is_moe
    return [RunResult(
        row=row, seed=seed, repeat=0,
        config=resolve("fmnist-tiny", **(settings or {}), method=method, model=model, width=width, seed=seed,
                       epochs=epochs).to_dict(),
        macs_per_image=macs, checkpoint_sha256=f"{key}-{seed}", examples=1000,
        accuracy={"clean": 0.83, "pgd-10": 0.73, "apgd": a}, worst_case=w, pgd="pgd-10", pgd_minus_worst=0.73 - w,
        sanity_passed=True, sanity_failed=[],
        curve=curve_of(curve),
        seconds={"train": EPOCH_SECONDS * len(curve), "eval": 300.0},
        route_flip_rate=0.04 if moe else None, prediction_flip_given_route_flip=0.5 if moe else None,
        expert_share=[busiest, 1 - busiest] if moe else None)
        for seed, (w, a) in enumerate(zip(worst, apgd))]
