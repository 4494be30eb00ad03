"""Served end to end: a trained MoE checkpoint against the dense models a user would serve instead
(`advmoe bench serve --checkpoint checkpoints/fmnist-moe`), each on the runtime its export measured
fastest (ADVMOE_RUNTIME=auto, as `make run` serves). The models are shipped_speed.py's: the
checkpoint, its dense twin and the dense model of its MACs (untrained, BatchNorm calibrated). The
load posts the checkpoint's dataset's test images as PNG files; otherwise the measuring, the
rounds and the rows are serve_measure.py's. The report is its own page (reports/efficiency_shipped.md
by default), beside the width-1.0 report."""
from __future__ import annotations

import io
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import advmoe
from advmoe.card import read_card
from export.timing import timing_inputs

from .serve_measure import Load, combine, start_servers
from .serve_report import cpu_rows, level_rows, ratio, table
from .serve_targets import Check, find, target_concurrency
from .shipped_speed import models

# (name, model, runtime, execution), as serve_measure.VARIANTS; "auto": the export's fastest runtime
VARIANTS = (("sparse", "sparse", "auto", "sparse"), ("dense twin", "twin", "auto", "sparse"),
            ("dense, its MACs", "equal", "auto", "sparse"))
CPU_TARGET = 1.6  # the dense twin's server CPU per image over the MoE model's, 1 image per request
EQUAL_MACS_TARGET = 1.0  # the MoE model's images/s over the dense model of its MACs: no slower


def test_images(checkpoint: Path, n: int = 64) -> list[bytes]:
    """The checkpoint's dataset's test images (noise where they are not on this machine), as PNG files."""
    x, _ = timing_inputs(read_card(checkpoint), n)
    pixels = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    images = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def export_all(built: dict, folder: Path) -> dict[str, str]:
    """Each model exported as `advmoe export` does (its runtimes timed) into the BentoML store: {model: tag}."""
    from export import export_checkpoint

    tags = {}
    for (_, model, _, _), (path, _) in zip(VARIANTS, built.values()):
        result = export_checkpoint(path, folder / f"export-{model}", ["onnx", "pt2", "bento"], name=f"bench-{model}",
                                   log=lambda *a: None)
        tags[model] = result.bento_tag
        print(f"exported {model}: {result.bento_tag}", flush=True)
    return tags


def served_runtimes(servers: dict) -> dict[str, str]:
    """What each server runs, from its /model_info."""
    import httpx

    return {variant[0]: httpx.get(f"{server.url}/model_info", timeout=30).json()["runtime"]
            for variant, server in servers.items()}


def run(checkpoint: Path, concurrency=(1, 8, 32), duration_s=15.0, rounds=1, workers=0, threads=0,
        workdir: Path | None = None, log_dir: Path | None = None) -> dict:
    """Every model served at once, the load visiting them in rotating order, as serve_measure.run."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="advmoe-bench-shipped-"))
    os.environ["BENTOML_HOME"] = str(workdir / "bentoml")  # never the user's model store
    pool, _ = timing_inputs(read_card(checkpoint), 64)
    built = models(Path(checkpoint), torch.from_numpy(pool), workdir)
    tags = export_all(built, workdir)
    names = {variant[0]: name for variant, name in zip(VARIANTS, built)}
    levels = [str(c) for c in concurrency]
    servers = {}
    try:
        start_servers(servers, list(VARIANTS), tags, workers, threads, False, log_dir or workdir)
        runtimes = served_runtimes(servers)
        load = Load(servers, list(VARIANTS), test_images(Path(checkpoint)), duration_s, (1,), levels)
        for round_index in range(rounds):
            load.round(round_index, concurrency, (1,), after_burst=False)
    finally:
        for server in servers.values():
            server.stop()
    rows = [combine(variant, n, level, found) for (variant, n, level), found in load.samples.items() if found]
    return {"checkpoint": str(checkpoint), "rows": rows, "models": names, "served_runtime": runtimes,
            "macs": {variant[0]: macs for variant, (_, macs) in zip(VARIANTS, built.values())},
            "concurrency": list(concurrency), "levels": levels, "images_per_request": [1], "duration_s": duration_s,
            "rounds": rounds, "workers": workers, "threads": threads, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "advmoe": advmoe.__version__}


def checks(result: dict) -> list[Check]:
    """The served targets of a shipped model, at the target concurrency, 1 image per request."""
    rows, c = result["rows"], target_concurrency(result)
    sparse, twin, equal = (find(rows, name, "auto", c) for name, _, _, _ in VARIANTS)
    return [Check("auto", 1, f"dense twin / sparse server CPU per image, concurrency {c}",
                  twin["cpu_ms_per_image"]["server"] / sparse["cpu_ms_per_image"]["server"], CPU_TARGET, "x"),
            Check("auto", 1, f"sparse / dense of its MACs images/s, concurrency {c}",
                  sparse["images_per_s"] / equal["images_per_s"], EQUAL_MACS_TARGET, "x"),
            Check("auto", 1, f"errors over all models, concurrency {max(result['concurrency'])}",
                  sum(r["errors"] for r in rows if r["level"] == str(max(result["concurrency"]))), 0, "errors",
                  at_most=True)]


def cpu_ceiling(result: dict) -> tuple[float, float, float]:
    """The most the CPU target's ratio can be, from each side of the MoE server's CPU: (ms per image outside
    the MoE model, the ratio if the MoE model cost nothing, the ratio if nothing outside the models cost
    anything, i.e. the twin's model CPU over the MoE model's). Handling costs both servers alike, so cutting
    it only brings the ratio nearer the models' own."""
    rows, c = result["rows"], target_concurrency(result)
    sparse, twin = (find(rows, name, "auto", c)["cpu_ms_per_image"] for name in ("sparse", "dense twin"))
    outside = sparse["server"] - sparse["model"]
    return outside, twin["server"] / outside, twin["model"] / sparse["model"]


def markdown(result: dict, command: str) -> str:
    c = target_concurrency(result)
    model_rows = [[name, result["models"][name], f"{result['macs'][name] / 1e6:.2f} M",
                   ratio(result["macs"][name] / result["macs"]["sparse"]), result["served_runtime"][name]]
                  for name, _, _, _ in VARIANTS]
    return "\n".join([
        f"# Served efficiency of `{result['checkpoint']}` against the dense models of its cost", "",
        f"`{command}` (benchmarks/serve_shipped.py) on {result['cpus']} CPU cores ({result['machine']}), torch "
        f"{result['torch']}, advmoe {result['advmoe']}; {result['duration_s']:g} s per level and model, "
        f"{result['rounds']} interleaved round(s), 1 test image per request. Each model runs on the runtime its "
        "export measured fastest.", "",
        *table(["variant", "model", "MACs per image", "MACs vs sparse", "served runtime"], model_rows), "",
        "## Targets", "",
        *table(["runtime", "images/request", "target", "measured", "bound", "met"], [k.cells() for k in checks(result)]),
        "", "The MoE server spends {:.1f} ms of CPU per image outside its model: if the model cost nothing, the "
        "first ratio would be {:.2f}x; if nothing outside the models cost anything, {:.2f}x (the models' own "
        "CPU ratio at the batches served).".format(*cpu_ceiling(result)),
        "", "## Throughput, latency and server CPU", "",
        *table(["runtime", "images/request", "variant", "concurrency", "images/s", "p50 ms", "p95 ms", "p99 ms",
                "errors", "mean batch", "model ms per call", "server CPU ms per image", "expert 0 share"],
               level_rows(result["rows"])),
        "", f"## Where the time goes (concurrency {c})", "",
        *table(["runtime", "images/request", "variant", "images/s", "model wall ms", "model CPU ms",
                "request handling CPU ms", "server CPU ms", "locust CPU ms", "all CPU ms"], cpu_rows(result["rows"], c)),
        ""])


def write_report(result: dict, out: Path, command: str) -> None:
    """out (.md) and out.json beside it, each written whole."""
    from advmoe.io import atomic_write_text

    atomic_write_text(Path(out).with_suffix(".json"), json.dumps({**result, "command": command}, indent=2) + "\n")
    atomic_write_text(Path(out), markdown(result, command))
