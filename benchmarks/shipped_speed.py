"""A trained MoE checkpoint against the dense models a user would pick instead, each on its fastest
runtime, as the service would run it: `advmoe bench sparse --checkpoint checkpoints/fmnist-moe`.

Three models: the checkpoint (sparse execution), its dense twin (the same architecture dense at the
same width) and the dense model of its MACs (the narrowest width, in steps of 1/64, whose MACs per
image are at least the checkpoint's). The dense models are untrained with BatchNorm calibrated on
the inputs: their speed does not depend on their weights. Each is exported as `advmoe export`
exports it (ONNX and torch.export), and every runtime the service can run (onnxruntime, eager
torch, the torch.export program) is timed on it, all models and runtimes in interleaved rounds
(medians), on the checkpoint's dataset's test images where they are on this machine. A model's
runtime is the one export's rule picks for it (advmoe.runtime_choice: the lowest geometric mean
over the batches), the one the service runs by default; the per-runtime table is printed too.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

import advmoe
from advmoe.calibrate import untrained
from advmoe.card import read_card
from advmoe.models.base import ModelConfig
from advmoe.runtime_choice import fastest_runtime
from export import export_checkpoint
from export.timing import IMAGES_PER_SAMPLE, ms_per_call, runners, timing_inputs

from .profile_sparse import twin_args

WIDTH_STEP = 1 / 64  # every stage of the registry's models keeps whole channels


def dense_args(moe) -> tuple[str, dict]:
    """The dense twin's architecture and its arguments, from the MoE model."""
    return advmoe.dense_twin(moe.model_name), twin_args(moe.cfg)


def width_of_macs(arch: str, args: dict, target: int, widest: float = 4.0) -> float:
    """The narrowest width in WIDTH_STEP steps at which `arch` costs at least `target` MACs per image."""
    shape = (args["in_channels"], args["image_size"], args["image_size"])

    def macs(steps: int) -> int:
        return advmoe.count_macs(advmoe.create_model(arch, **{**args, "width": steps * WIDTH_STEP}), shape)

    low, high = 0, round(widest / WIDTH_STEP)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if macs(mid) < target else (low, mid)
    return high * WIDTH_STEP


def models(checkpoint: Path, x: torch.Tensor, folder: Path) -> dict[str, tuple[Path, int]]:
    """{name: (checkpoint folder, MACs per image)} of the three models; the dense ones written to `folder`."""
    moe = advmoe.load_checkpoint(checkpoint)
    shape = tuple(x.shape[1:])
    target = advmoe.count_macs(moe, shape)
    arch, args = dense_args(moe)
    widths = {"dense twin": args["width"], "dense, its MACs": width_of_macs(arch, args, target)}
    config = {"dataset": read_card(checkpoint).dataset, "classes": list(read_card(checkpoint).classes)}
    found = {"sparse MoE": (checkpoint, target)}
    for name, width in widths.items():
        dense = untrained(arch, x, **{**args, "width": width})
        path = advmoe.save_checkpoint(dense, folder / name.replace(" ", "-").replace(",", ""), config=config)
        found[f"{name} (width {width:g})"] = (path, advmoe.count_macs(dense, shape))
    return found


def changed(checkpoint: Path, changes: dict, x: torch.Tensor, folder: Path) -> Path:
    """The checkpoint's architecture with `changes` to its arguments (width=0.5, router_stride=2),
    untrained: BatchNorm calibrated and the router balanced on x, as a trained router splits the
    traffic. Written to folder/changed; what a wider or cheaper-routed model would cost to run."""
    config = json.loads((checkpoint / "config.json").read_text())
    args = {k: v for k, v in config["model_args"].items() if k != "blocks"}
    known = set(ModelConfig.field_names())
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown model settings {unknown}; choose from {', '.join(sorted(known))}")
    model = untrained(config["architecture"], x, **{**args, **changes})
    card = read_card(checkpoint)
    return advmoe.save_checkpoint(model, folder / "changed", config={"dataset": card.dataset, "classes": list(card.classes)})


def run(checkpoint: str | Path, batch_sizes=(1, 64), rounds: int = 7, threads: int = 1, changes: dict | None = None) -> dict:
    """{"models": {name: {"macs", "runtime", "ms": {runtime: [ms per batch]}}}, "batches": [...]}; with
    `changes`, of the checkpoint's architecture so changed, untrained (`changed`)."""
    checkpoint = Path(checkpoint)
    pool, inputs = timing_inputs(read_card(checkpoint), max(batch_sizes))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if changes:
                checkpoint = changed(checkpoint, changes, torch.from_numpy(pool), Path(scratch))
            built = models(checkpoint, torch.from_numpy(pool), Path(scratch))
            run_of = {}
            for i, (name, (path, _)) in enumerate(built.items()):
                out = Path(scratch) / f"export-{i}"
                export_checkpoint(path, out, formats=("onnx", "pt2"), time_runtimes=False, log=lambda *a: None)
                run_of |= {(name, runtime): fn for runtime, fn in runners(out, "sparse", threads).items()}
            samples = {(key, b): [] for key in run_of for b in batch_sizes}
            with torch.inference_mode():
                for fn in run_of.values():  # warm-up
                    for b in batch_sizes:
                        fn(pool[:b])
                for _ in range(rounds):
                    for b in batch_sizes:
                        for key, fn in run_of.items():
                            samples[key, b].append(ms_per_call(fn, pool[:b], max(1, IMAGES_PER_SAMPLE // b)))
    finally:
        torch.set_num_threads(previous)
    found = {}
    for name, (_, macs) in built.items():
        ms = {runtime: [statistics.median(samples[(n, runtime), b]) for b in batch_sizes]
              for (n, runtime) in run_of if n == name}
        found[name] = {"macs": macs, "ms": ms, "runtime": fastest_runtime(ms)}
    return {"models": found, "batches": list(batch_sizes), "inputs": inputs, "threads": threads, "rounds": rounds,
            "changes": changes or {}}


def report(result: dict) -> list[str]:
    """Markdown: each model on its runtime, then the MoE model's speed-ups, then every runtime."""
    batches, found = result["batches"], result["models"]
    moe_name = next(iter(found))
    on_own = {name: dict(zip(batches, m["ms"][m["runtime"]])) for name, m in found.items()}
    lines = [f"| model | MACs per image | runtime | " + " | ".join(f"ms at batch {b}" for b in batches)
             + " | " + " | ".join(f"MoE speed-up at batch {b}" for b in batches) + " |",
             "|---|---|---|" + "---|" * 2 * len(batches)]
    for name, m in found.items():
        ms = [f"{on_own[name][b]:.3f}" for b in batches]
        ups = [f"{on_own[name][b] / on_own[moe_name][b]:.2f}x" for b in batches] if name != moe_name else ["-"] * len(batches)
        lines.append(f"| {name} | {m['macs'] / 1e6:.2f} M | {m['runtime']} | " + " | ".join(ms + ups) + " |")
    lines += ["", "| model | runtime | " + " | ".join(f"ms at batch {b}" for b in batches) + " |",
              "|---|---|" + "---|" * len(batches)]
    lines += [f"| {name} | {runtime} | " + " | ".join(f"{t:.3f}" for t in ms) + " |"
              for name, m in found.items() for runtime, ms in m["ms"].items()]
    return lines
