"""The efficiency report of `advmoe bench serve`, rendered from its result (the JSON it writes):
the targets, tables of the measured rows and of the ratios derived from them, and the plots."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from serving.config import PROBE_NICENESS

from .serve_plots import plot
from .serve_targets import TARGET_CONCURRENCY, checks, find, target_concurrency

METHOD = """\
- Every variant is served by the advmoe BentoML service with the same settings: each API worker decodes the
  requests and runs the model behind its batcher, up to 64 inputs a call.
- Load: locust, headless, closed loop, each user posting PNG images to /predict over loopback; locust runs on
  the same cores as the server. Medians over rounds.
- `1 after N`: concurrency 1 measured right after concurrency N on the same server, without warm-up requests.
- Untrained weights with calibrated BatchNorm and a router balanced on random images: speed depends on the
  traffic split, not on what the weights learnt.
- Server CPU: the server's processes (request handling and model) per served image, without the load
  generator. Model ms: the model call's wall time (`advmoe_model_compute_seconds`), per call or per image."""


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def setup_rows(result: dict, command: str) -> list[list]:
    size, workers, threads = result["image_size"], result["workers"], result["threads"]
    return [
        ["command", f"`{command}` (benchmarks/bench_serve.py)"],
        ["machine", f"{result['cpus']} CPU cores ({result['machine']}), torch {result['torch']}, "
                    f"advmoe {result['advmoe']}"],
        ["models", f"MoE ResNet-18 (2 experts, ratio 0.5, shared router, {result['router_blocks']} blocks per "
                   f"stage) and its dense twin, width {result['width']:g}, {size}x{size} RGB"],
        ["API workers", workers or "one per core"],
        ["model threads per worker", threads or "the cores shared out over the workers"],
        ["images per request", " or ".join(map(str, result["images_per_request"]))],
        ["seconds per level and variant", f"{result['duration_s']:g}"],
        ["interleaved rounds", result["rounds"]],
    ]


def macs_rows(macs: dict) -> list[list]:
    return [[name, f"{macs[key] / 1e9:.3f}", ratio(macs[key] / macs["dense"])]
            for name, key in (("sparse MoE", "sparse"), ("masked MoE", "masked"), ("dense twin", "dense"))]


def level_rows(rows: list[dict]) -> list[list]:
    found = []
    for r in rows:
        share = r["expert_share"][0] if r.get("expert_share") else float("nan")
        found.append([r["runtime"], r["images_per_request"], r["variant"], r["level"], f"{r['images_per_s']:.1f}",
                      f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", r["errors"],
                      f"{r['mean_batch_size']:.1f}", f"{r['compute_ms_per_call']:.1f}",
                      f"{r['cpu_ms_per_image']['server']:.1f}", f"{share:.2f}"])
    return found


def speedups(result: dict) -> list[dict]:
    """Sparse against the dense twin and the masked model at each level: served (images/s), model only
    (model ms per image), server CPU per image, beside the MAC ratios."""
    rows, macs, found = result["rows"], result["macs"], []
    for runtime in sorted({r["runtime"] for r in rows}):
        for n in result["images_per_request"]:
            for level in result["levels"]:
                sparse, dense, masked = (find(rows, v, runtime, level, n) for v in ("sparse", "dense twin", "masked"))
                found.append({
                    "runtime": runtime, "images_per_request": n, "level": level,
                    "served_vs_dense": sparse["images_per_s"] / dense["images_per_s"],
                    "model_vs_dense": dense["compute_ms_per_image"] / sparse["compute_ms_per_image"],
                    "cpu_vs_dense": dense["cpu_ms_per_image"]["server"] / sparse["cpu_ms_per_image"]["server"],
                    "macs_dense_vs_sparse": macs["dense"] / macs["sparse"],
                    "served_vs_masked": sparse["images_per_s"] / masked["images_per_s"],
                    "model_vs_masked": masked["compute_ms_per_image"] / sparse["compute_ms_per_image"],
                    "macs_masked_vs_sparse": macs["masked"] / macs["sparse"]})
    return found


def cpu_rows(rows: list[dict], c: int) -> list[list]:
    """Where the time goes at concurrency c: CPU ms per served image by part, and the model's wall time."""
    found = []
    for r in (r for r in rows if r["level"] == str(c)):
        cpu = r["cpu_ms_per_image"]
        found.append([r["runtime"], r["images_per_request"], r["variant"], f"{r['images_per_s']:.1f}",
                      f"{r['compute_ms_per_image']:.1f}", f"{cpu['model']:.1f}", f"{cpu['request handling']:.1f}",
                      f"{cpu['server']:.1f}", f"{cpu['load generator']:.1f}",
                      f"{cpu['server'] + cpu['load generator']:.1f}"])
    return found


def outside_model_rows(result: dict, c: int) -> list[list]:
    """Dense twin vs sparse at concurrency c: the model's CPU per image and its ratio, the CPU outside
    the model (request handling + locust) that both pay on the same cores, and the served speed-up."""
    rows, found = result["rows"], []
    for runtime in sorted({r["runtime"] for r in rows}):
        for n in result["images_per_request"]:
            sparse, dense = (find(rows, v, runtime, c, n)["cpu_ms_per_image"] for v in ("sparse", "dense twin"))
            served = find(rows, "sparse", runtime, c, n)["images_per_s"] / find(rows, "dense twin", runtime, c, n)[
                "images_per_s"]
            found.append([runtime, n, f"{dense['model']:.1f}", f"{sparse['model']:.1f}",
                          ratio(dense["model"] / max(sparse["model"], 1e-9)),
                          f"{sparse['request handling'] + sparse['load generator']:.1f}",
                          f"{dense['request handling'] + dense['load generator']:.1f}", ratio(served)])
    return found


def probe_rows(result: dict) -> list[list]:
    n, found = result["images_per_request"][0], []
    for runtime, probe in result["probe_check"].items():
        for level in ("without probes", "with probes"):
            r = find(result["rows"], "sparse", runtime, f"{TARGET_CONCURRENCY} {level}", n)
            probing = level == "with probes"
            median = f"{probe['median_s']:.1f}" if probing and probe["median_s"] else "-"
            found.append([runtime, level, f"{r['images_per_s']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                          f"{r['cpu_ms_per_image']['server']:.1f}", probe["probes"] if probing else 0, median])
    return found


def markdown(result: dict, command: str) -> str:
    c, n = target_concurrency(result), result["images_per_request"][0]
    speedup_cells = [[s["runtime"], s["images_per_request"], s["level"],
                      *(ratio(s[key]) for key in ("served_vs_dense", "model_vs_dense", "cpu_vs_dense",
                                                  "macs_dense_vs_sparse", "served_vs_masked", "model_vs_masked",
                                                  "macs_masked_vs_sparse"))] for s in speedups(result)]
    lines = [
        "# Served efficiency: sparse MoE vs masked MoE vs dense twin", "",
        *table(["setting", "value"], setup_rows(result, command)), "", METHOD, "",
        "## Targets", "",
        *table(["runtime", "images/request", "target", "measured", "bound", "met"],
               [check.cells() for check in checks(result)]),
        "", "## MACs per image (measured with torch's FLOP counter)", "",
        *table(["model", "GMACs", "vs dense twin"], macs_rows(result["macs"])),
        "", "## Throughput, latency and server CPU", "",
        *table(["runtime", "images/request", "variant", "concurrency", "images/s", "p50 ms", "p95 ms", "p99 ms",
                "errors", "mean batch", "model ms per call", "server CPU ms per image", "expert 0 share"],
               level_rows(result["rows"])),
        "", "## Speed-up of sparse: served, model only, and what the MACs promise", "",
        *table(["runtime", "images/request", "concurrency", "served vs dense twin", "model only vs dense twin",
                "server CPU vs dense twin", "MACs dense/sparse", "served vs masked", "model only vs masked",
                "MACs masked/sparse"], speedup_cells),
        "", f"## Where the time goes (concurrency {c})", "",
        "CPU ms per served image; request handling is each worker's event-loop thread (HTTP, multipart, PNG "
        "decoding, JSON answer), locust the exited load-generator child's rusage.", "",
        *table(["runtime", "images/request", "variant", "images/s", "model wall ms", "model CPU ms",
                "request handling CPU ms", "server CPU ms", "locust CPU ms", "all CPU ms"],
               cpu_rows(result["rows"], c)), "",
        *table(["runtime", "images/request", "model CPU ms, dense twin", "model CPU ms, sparse",
                "model CPU dense/sparse", "handling + locust CPU ms, sparse", "handling + locust CPU ms, dense twin",
                "served sparse/dense twin"], outside_model_rows(result, c)),
    ]
    if result.get("probe_check"):
        lines += ["", "## What a running attack probe costs /predict", "",
                  f"Sparse server, concurrency {TARGET_CONCURRENCY}, {n} image(s)/request, without and then with "
                  f"/attack_probe requests back to back from one client thread (PGD, 20 steps, 8 images each; the "
                  f"probe worker runs at niceness {PROBE_NICENESS}).", "",
                  *table(["runtime", "probes", "images/s", "p50 ms", "p99 ms", "server CPU ms per image",
                          "probes done", "median probe s"], probe_rows(result))]
    lines += ["", f"Plots: `efficiency_throughput.png` (throughput vs concurrency), `efficiency_latency.png` "
              f"(latency percentiles at concurrency {c}), `efficiency_macs.png` (MAC ratio vs measured speed-up).", ""]
    return "\n".join(lines)


def write_report(result: dict, out: Path, command: str) -> None:
    """out (.md) with out.json (the result and the command) and the PNG plots beside it; each file
    appears whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        tmp = Path(tmp)
        (tmp / out.name).write_text(markdown(result, command))
        (tmp / f"{out.stem}.json").write_text(json.dumps({**result, "command": command}, indent=2, default=str) + "\n")
        plot(result, tmp, out.stem)
        for file in sorted(tmp.iterdir()):
            os.replace(file, out.parent / file.name)


def read_result(out: Path) -> tuple[dict, str]:
    """The result and command that write_report left beside out (out.json)."""
    path = Path(out).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: measure first (without --report-only)")
    result = json.loads(path.read_text())
    if "command" not in result:
        raise ValueError(f"{path} has no 'command': it was written before the command was kept; measure again")
    return result, result.pop("command")
