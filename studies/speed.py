"""What each row of the study costs in time, not MACs: milliseconds per image at batch 1 and 64 on
this CPU, each model on its fastest runtime, as `advmoe export` measures and the service would run
it (one thread per worker; export/timing.py). A user pays in time.

A row is timed on the best checkpoint of its first run when its run folder is there (a MoE model's
speed depends on how its router splits the images), else on its architecture with fresh weights,
BatchNorm calibrated on test images and a MoE router balanced to split them evenly (the same time
for a dense model; a trained router's split is in the run's evaluation). All rows are timed in one
call, one after another, so their numbers compare."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import advmoe
from advmoe.calibrate import untrained
from advmoe.checkpoint import is_checkpoint
from advmoe.io import atomic_write_text
from export.api import export_checkpoint
from training.config import TrainConfig, resolve, with_defaults

from .design import Plan
from .record import RunResult

BATCHES = (1, 64)  # the batches reported: a lone request, and the service's batcher cap


@dataclass
class Speed:
    runtime: str  # the fastest by the export's rule
    ms_per_image: dict[int, float]  # batch -> ms per image on that runtime
    weights: str  # "trained" (the row's checkpoint) | "fresh" (its architecture, untrained)


def recorded_config(runs: list[RunResult], plan: Plan) -> TrainConfig:
    """The settings the row's runs were trained with, as their result file records them (a
    variant's --set included, which this call's plan may not have), reading data where this plan does."""
    here = plan.config(runs[0].row, runs[0].seed)
    return resolve(None, **{**with_defaults(runs[0].config), "data_dir": here.data_dir})


def _checkpoint(runs: list[RunResult], plan: Plan, scratch: Path) -> tuple[Path, str]:
    """The row's trained checkpoint, or one of its architecture with fresh weights written to `scratch`."""
    for r in runs:
        best = Path(plan.runs) / r.name / "best"
        if is_checkpoint(best):
            return best, "trained"
    cfg = recorded_config(runs, plan)
    info = advmoe.get_dataset_info(cfg.dataset)
    test = advmoe.load_dataset(cfg.dataset, "test", cfg.data_dir)
    x = torch.stack([test[i][0] for i in range(min(256, len(test)))])
    model = untrained(cfg.model, x, **cfg.model_kwargs(info))
    path = scratch / "fresh"
    advmoe.save_checkpoint(model, path, config={"dataset": cfg.dataset, "classes": list(info.classes)})
    return path, "fresh"


def time_row(runs: list[RunResult], plan: Plan, rounds: int = 7) -> Speed:
    """Export the row's model (ONNX and torch.export, sparse execution) and time every runtime."""
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, weights = _checkpoint(runs, plan, Path(scratch))
        export_checkpoint(checkpoint, Path(scratch) / "export", formats=("onnx", "pt2"), max_batch_size=max(BATCHES),
                          timing_rounds=rounds, log=lambda *a: None)
        timing = json.loads((Path(scratch) / "export" / "export.json").read_text())["runtime_timing"]
    ms = dict(zip(timing["batches"], timing["ms"][timing["fastest"]]))
    return Speed(timing["fastest"], {b: ms[b] / b for b in BATCHES}, weights)


def time_rows(grouped: dict[str, list[RunResult]], plan: Plan, path: Path, rounds: int = 7, log=print) -> dict:
    """Every row's Speed, written to `path` (JSON, by row key)."""
    speeds = {}
    for key, runs in grouped.items():
        speeds[key] = time_row(runs, plan, rounds)
        log(f"{key}: {speeds[key].runtime}, " + ", ".join(f"batch {b}: {ms:.3f} ms per image"
                                                          for b, ms in speeds[key].ms_per_image.items()))
    atomic_write_text(path, json.dumps({k: vars(s) for k, s in speeds.items()}, indent=1) + "\n")
    return speeds


def read_speeds(path: Path) -> dict[str, Speed]:
    """The speeds recorded at `path` (none when it is absent)."""
    if not Path(path).is_file():
        return {}
    return {k: Speed(s["runtime"], {int(b): ms for b, ms in s["ms_per_image"].items()}, s["weights"])
            for k, s in json.loads(Path(path).read_text()).items()}


def _dense_architecture(runs: list[RunResult]) -> tuple:
    """What builds a dense row's model: the settings TrainConfig.model_kwargs reads for one, and the data
    set's shape (its name, and image_size for a folder of images), without reading the data."""
    config = with_defaults(runs[0].config)
    return config["dataset"], config["image_size"], config["model"], config["width"], config["stem"]


def with_dense_alike(grouped: dict[str, list[RunResult]], speeds: dict[str, Speed]) -> dict[str, Speed]:
    """`speeds` and, for each dense row not timed itself, the time of a timed dense row of its architecture
    (a variant with a longer schedule): a dense model's time does not depend on its weights."""
    timed = {_dense_architecture(grouped[k]): speed for k, speed in speeds.items()
             if k in grouped and not grouped[k][0].row.is_moe}
    return speeds | {k: timed[_dense_architecture(runs)] for k, runs in grouped.items()
                     if k not in speeds and not runs[0].row.is_moe and _dense_architecture(runs) in timed}
