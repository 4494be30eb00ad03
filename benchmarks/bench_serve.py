"""The efficiency report: what a user of the served model gets, end to end, on this machine.

    python -m benchmarks.bench_serve            # or: advmoe bench serve
    python -m benchmarks.bench_serve --concurrency 1 8 32 64 --duration 15 --out reports/efficiency.md
    python -m benchmarks.bench_serve --runtimes onnxruntime --workers 2 --out /tmp/two-workers.md

MoE ResNet-18 (N = 2, r = 0.5, shared router) and its dense twin, served by the advmoe BentoML
service with the same settings, through onnxruntime and through torch: the MoE model on the
sparse path, the same weights masked (every expert computed, then selected, as the paper's
reference code runs), and the dense twin. Every server is started first and stays up; the load
(locust, headless, PNG uploads to /predict, closed loop; 1 and 8 images per request) then visits
them in interleaved rounds, so that a noisy machine slows them alike, and each server's highest
level is followed at once by a concurrency-1 level (a lone request right after a burst). Per
level: throughput, latency, the model's own time per call and per image, and the server's CPU
per image (request handling and model threads, without the load generator). Models are untrained with calibrated BatchNorm and a
router balanced on random images (bench_sparse.build): speed does not depend on what the
weights learnt, only on how the router splits the traffic, which the report measures.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import advmoe
from advmoe.macs import measure_macs
from serving.config import PROBE_NICENESS

from .bench_sparse import build


# (name, model, runtime, execution): the model is the BentoML model the variant serves.
VARIANTS = (
    ("sparse", "sparse", "onnxruntime", "sparse"),
    ("masked", "masked", "onnxruntime", "sparse"),
    ("dense twin", "dense", "onnxruntime", "sparse"),
    ("sparse", "sparse", "torch", "sparse"),
    ("masked", "sparse", "torch", "masked"),
    ("dense twin", "dense", "torch", "sparse"),
)
TARGET_CONCURRENCY = 32
# Issue 14's targets, by images per request: sparse throughput at least this times theirs, the
# dense twin's server CPU per image at least this times sparse's, and a lone request's p50 within
# the model's time for it plus this.
THROUGHPUT_TARGETS = {1: {"dense twin": 1.8, "masked": 1.5}, 8: {"dense twin": 2.0}}
CPU_TARGETS = {1: 1.9, 8: 2.1}
LONE_SLACK_MS = 5.0


def export_models(models: dict, folder: Path, image_size: int) -> dict[str, str]:
    """Checkpoints of the MoE model and the dense twin, exported as `advmoe export` does into the
    (temporary) BentoML store: the MoE model twice, sparse and masked. {model: tag}."""
    from export import export_checkpoint

    calib = {"dataset": "random", "classes": [f"class {i}" for i in range(10)]}
    moe = advmoe.save_checkpoint(models["masked"], folder / "moe", config=calib)
    dense = advmoe.save_checkpoint(models["dense"], folder / "dense", config=calib)
    tags = {}
    for kind, checkpoint, execution in (("sparse", moe, "sparse"), ("masked", moe, "masked"),
                                        ("dense", dense, "sparse")):
        result = export_checkpoint(checkpoint, folder / f"export-{kind}", ["onnx", "bento"], name=f"bench-{kind}",
                                   execution=execution, log=lambda *a: None)
        tags[kind] = result.bento_tag
        print(f"exported {kind}: {result.bento_tag}", flush=True)
    return tags


def png_images(n: int, image_size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def cpu_seconds(processes: list) -> dict[str, float]:
    """CPU seconds so far: the server's request handling (each worker's main thread: the event loop
    that parses, decodes and answers), its model (every other thread: the runtime's compute threads
    and the thread that calls it), and the load generator (locust children that have exited)."""
    import resource

    import psutil

    handling = model = 0.0
    for process in processes:
        try:
            for thread in process.threads():
                if thread.id == process.pid:
                    handling += thread.user_time + thread.system_time
                else:
                    model += thread.user_time + thread.system_time
        except psutil.NoSuchProcess:
            pass
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"request handling": handling, "model": model, "load generator": children.ru_utime + children.ru_stime}


def _summed(scraped: dict, name: str) -> float:
    return sum(v for (n, labels), v in scraped.items() if n == name and ("endpoint", "predict") in labels)


def measured_level(server, processes, concurrency: int, duration_s: float, images: list[bytes],
                   images_per_request: int, warmup_requests: int = 4) -> dict:
    """One load level with where the CPU went (CPU ms per served image) and the model's own time:
    per image, and per model call (its mean batch) from /metrics."""
    from clients.loadtest import run_level, scrape

    before_cpu, before = cpu_seconds(processes), scrape(server.url)
    result = run_level(server.url, concurrency, duration_s, images, batch_size=images_per_request,
                       warmup_requests=warmup_requests)
    after_cpu, after = cpu_seconds(processes), scrape(server.url)
    served = max(result["images"], 1)
    cpu = {part: (after_cpu[part] - before_cpu[part]) * 1e3 / served for part in after_cpu}
    cpu["server"] = cpu["request handling"] + cpu["model"]
    result["cpu_ms_per_image"] = cpu
    compute = _summed(after, "advmoe_model_compute_seconds_sum") - _summed(before, "advmoe_model_compute_seconds_sum")
    calls = _summed(after, "advmoe_model_compute_seconds_count") - _summed(before, "advmoe_model_compute_seconds_count")
    inputs = _summed(after, "advmoe_batch_size_sum") - _summed(before, "advmoe_batch_size_sum")
    result["compute_ms_per_image"] = compute * 1e3 / max(inputs, 1)
    result["compute_ms_per_call"] = compute * 1e3 / calls if calls else float("nan")
    return result


class ProbeLoad:
    """/attack_probe requests back to back from a thread (PGD, the server's cap on steps and inputs)
    while a /predict level runs: what a running probe costs /predict."""

    def __init__(self, url: str, image_size: int, n: int = 8, steps: int = 20):
        import threading

        rng = np.random.default_rng(0)
        self.url, self.stop = url, threading.Event()
        self.body = {"inputs": rng.random((n, 3, image_size, image_size)).round(3).tolist(),
                     "labels": [int(i) % 10 for i in range(n)], "attack": "pgd", "eps": 0.03, "steps": steps}
        self.done, self.failed, self.seconds = 0, 0, []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import httpx

        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                ok = client.post(f"{self.url}/attack_probe", json=self.body).status_code == 200
                self.done, self.failed = self.done + ok, self.failed + (not ok)
                self.seconds.append(time.perf_counter() - start)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=180)


def variant_label(variant) -> str:
    name, _, runtime, _ = variant
    return f"{name}, {runtime}"


def run(concurrency=(1, 8, 32, 64), duration_s=15.0, rounds=1, runtimes=("onnxruntime", "torch"),
        image_size=32, width=1.0, router_blocks=3, images_per_request=(1, 8), after_burst=True, workers=0,
        threads=0, probe_check=False, workdir: Path | None = None, log_dir: Path | None = None) -> dict:
    """Every variant served at once; per round, per images-per-request and per level, the load visits
    them in a rotating order. With after_burst, each variant's highest level is followed at once
    (no warm-up requests) by a concurrency-1 level: what a lone request gets right after a burst.
    With probe_check, the sparse servers then run concurrency 32 without and with attack probes
    running back to back, one after the other."""
    from serving.launch import Server

    variants = [v for v in VARIANTS if v[2] in runtimes]
    workdir = Path(workdir or tempfile.mkdtemp(prefix="advmoe-bench-serve-"))
    os.environ["BENTOML_HOME"] = str(workdir / "bentoml")  # never the user's model store
    torch.manual_seed(0)
    calib = torch.rand(64, 3, image_size, image_size)
    models = build("resnet18", "shared", image_size, width, router_blocks, calib)
    macs = {kind: measure_macs(model, calib[:8]) for kind, model in models.items()}
    tags = export_models(models, workdir, image_size)
    images = png_images(64, image_size)
    top = max(concurrency)
    levels = [str(c) for c in concurrency] + ([f"1 after {top}"] if after_burst else [])
    servers, processes = {}, {}
    try:
        for variant in variants:
            name, model, runtime, execution = variant
            env = {"ADVMOE_MODEL_TAG": tags[model], "ADVMOE_RUNTIME": runtime, "ADVMOE_EXECUTION": execution,
                   "ADVMOE_WORKERS": str(workers), "ADVMOE_THREADS": str(threads),
                   "ADVMOE_PROBE_ENABLED": "1" if probe_check else "0"}
            log = (log_dir or workdir) / f"serve-{name.replace(' ', '-')}-{runtime}.log"
            servers[variant] = Server(env, log_path=log, ready_timeout_s=300).start()
            processes[variant] = servers[variant].processes()
            print(f"serving {variant_label(variant)} at {servers[variant].url}", flush=True)
        samples = {(variant, n, level): [] for variant in variants for n in images_per_request for level in levels}

        def measure(variant, n, level, c, warmup):
            result = measured_level(servers[variant], processes[variant], c, duration_s, images, n, warmup)
            samples[(variant, n, level)].append(result)
            print(f"round {round_index + 1} {variant_label(variant):26s} {n} img/req c={level:>9s}: "
                  f"{result['images_per_s']:7.1f} img/s, p50 {result['p50_ms'] or 0:6.1f} ms, "
                  f"p99 {result['p99_ms'] or 0:7.1f} ms, errors {result['errors']}, "
                  f"mean batch {result['mean_batch_size'] or 0:.1f}, server CPU "
                  f"{result['cpu_ms_per_image']['server']:.1f} ms/img", flush=True)

        for round_index in range(rounds):
            for n in images_per_request:
                for c in concurrency:
                    # Rotate the order every round and level: no variant always goes first.
                    k = (round_index + c + n) % len(variants)
                    for variant in variants[k:] + variants[:k]:
                        measure(variant, n, str(c), c, 4)
                        if after_burst and c == top:
                            measure(variant, n, f"1 after {top}", 1, 0)
        probes = {}
        if probe_check:
            n, round_index = images_per_request[0], rounds
            for variant in (v for v in variants if v[0] == "sparse"):
                for level in ("without probes", "with probes"):
                    samples.setdefault((variant, n, f"{TARGET_CONCURRENCY} {level}"), [])
                measure(variant, n, f"{TARGET_CONCURRENCY} without probes", TARGET_CONCURRENCY, 4)
                with ProbeLoad(servers[variant].url, image_size) as load:
                    measure(variant, n, f"{TARGET_CONCURRENCY} with probes", TARGET_CONCURRENCY, 4)
                probes[variant[2]] = {"probes": load.done, "failed": load.failed, "images_per_probe": 8, "steps": 20,
                                      "median_s": statistics.median(load.seconds) if load.seconds else None}
    finally:
        for server in servers.values():
            server.stop()
    rows = [combine(variant, n, level, found) for (variant, n, level), found in samples.items() if found]
    return {"rows": rows, "macs": dict(macs), "probe_check": probes, "concurrency": list(concurrency), "levels": levels,
            "images_per_request": list(images_per_request), "duration_s": duration_s, "rounds": rounds,
            "workers": workers, "threads": threads, "image_size": image_size, "width": width,
            "router_blocks": router_blocks, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "advmoe": advmoe.__version__}


def combine(variant, images_per_request: int, level: str, results: list[dict]) -> dict:
    """Medians over rounds: a round that something else on the machine slowed does not count double."""
    name, model, runtime, execution = variant

    def median(key):
        return statistics.median(r[key] if r[key] is not None else float("nan") for r in results)

    return {
        "variant": name, "runtime": runtime, "model": model, "execution": execution,
        "images_per_request": images_per_request, "level": level, "concurrency": results[0]["concurrency"],
        "requests": sum(r["requests"] for r in results), "errors": sum(r["errors"] for r in results),
        "images_per_s": median("images_per_s"), "images_per_s_rounds": [r["images_per_s"] for r in results],
        # Each round's percentile is over its own requests.
        **{p: median(p) for p in ("p50_ms", "p95_ms", "p99_ms")},
        "mean_batch_size": statistics.mean(r["mean_batch_size"] or 0 for r in results),
        "expert_share": results[-1].get("expert_share"),
        "compute_ms_per_image": median("compute_ms_per_image"), "compute_ms_per_call": median("compute_ms_per_call"),
        "cpu_ms_per_image": {part: statistics.median(r["cpu_ms_per_image"][part] for r in results)
                             for part in results[0]["cpu_ms_per_image"]},
    }


def find(rows, variant, runtime, level, images_per_request=1) -> dict:
    return next(r for r in rows if (r["variant"], r["runtime"], r["level"], r["images_per_request"])
                == (variant, runtime, str(level), images_per_request))


def _judge(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else f"MISS by {target - ratio:.2f}x ({ratio / target - 1:+.0%})"


def verdicts(result: dict) -> list[str]:
    """The issue's targets, each with PASS or MISS and by how much."""
    lines, rows = [], result["rows"]
    c = TARGET_CONCURRENCY if TARGET_CONCURRENCY in result["concurrency"] else max(result["concurrency"])
    top = max(result["concurrency"])
    for runtime in sorted({r["runtime"] for r in rows}):
        for n in result["images_per_request"]:
            sparse, dense = find(rows, "sparse", runtime, c, n), find(rows, "dense twin", runtime, c, n)
            target = CPU_TARGETS.get(n)
            if target:
                ratio = dense["cpu_ms_per_image"]["server"] / sparse["cpu_ms_per_image"]["server"]
                lines.append(f"{runtime}, {n} image(s)/request, concurrency {c}: server CPU per image, dense twin / "
                             f"sparse {ratio:.2f}x ({dense['cpu_ms_per_image']['server']:.1f} vs "
                             f"{sparse['cpu_ms_per_image']['server']:.1f} ms; target {target:.1f}x): "
                             f"{_judge(ratio, target)}")
            for other, target in THROUGHPUT_TARGETS.get(n, {}).items():
                ratio = sparse["images_per_s"] / find(rows, other, runtime, c, n)["images_per_s"]
                lines.append(f"{runtime}, {n} image(s)/request, concurrency {c}: sparse throughput {ratio:.2f}x "
                             f"the {other} (target {target:.1f}x): {_judge(ratio, target)}")
            if f"1 after {top}" in result["levels"]:
                lone = find(rows, "sparse", runtime, f"1 after {top}", n)
                bound = lone["compute_ms_per_call"] + LONE_SLACK_MS
                status = "PASS" if lone["p50_ms"] <= bound else f"MISS by {lone['p50_ms'] - bound:.1f} ms"
                lines.append(f"{runtime}, {n} image(s)/request, concurrency 1 right after {top}: sparse p50 "
                             f"{lone['p50_ms']:.1f} ms vs the model's {lone['compute_ms_per_call']:.1f} ms per call "
                             f"+ {LONE_SLACK_MS:g} ms: {status}")
            worse = [(r["level"], r["p99_ms"], find(rows, "dense twin", runtime, r["level"], n)["p99_ms"])
                     for r in rows if (r["variant"], r["runtime"], r["images_per_request"]) == ("sparse", runtime, n)
                     and r["level"] in result["levels"]]
            worse = [w for w in worse if w[1] > w[2]]
            lines.append(f"{runtime}, {n} image(s)/request: sparse p99 no worse than the dense twin's at every level: "
                         + ("PASS" if not worse else "MISS at " + ", ".join(
                             f"concurrency {level} ({s:.0f} vs {d:.0f} ms)" for level, s, d in worse)))
            errors = sum(r["errors"] for r in rows if (r["runtime"], r["images_per_request"], r["level"])
                         == (runtime, n, str(top)))
            lines.append(f"{runtime}, {n} image(s)/request, concurrency {top}: {errors} errors over all variants "
                         f"(target 0): {'PASS' if errors == 0 else 'MISS'}")
    return lines


def markdown(result: dict, command: str) -> str:
    rows, macs = result["rows"], result["macs"]
    c = TARGET_CONCURRENCY if TARGET_CONCURRENCY in result["concurrency"] else max(result["concurrency"])
    workers = f"{result['workers']} API worker(s)" if result["workers"] else "one API worker per core"
    threads = f"{result['threads']} model thread(s) each" if result["threads"] else \
        "the cores shared out over the workers as model threads"
    lines = [
        "# Served efficiency: sparse MoE vs masked MoE vs dense twin",
        "",
        f"Produced by `{command}` (benchmarks/bench_serve.py) on {result['cpus']} CPU cores "
        f"({result['machine']}), torch {result['torch']}, advmoe {result['advmoe']}.",
        "",
        f"MoE ResNet-18 (2 experts, ratio 0.5, shared ResNet router with {result['router_blocks']} blocks per stage) "
        f"and its dense twin at width {result['width']:g}, {result['image_size']}x{result['image_size']} RGB input, "
        f"served by the advmoe BentoML service ({workers}, each decoding requests and running the model behind its "
        f"batcher, up to 64 inputs a call; {threads}) with identical settings. Load: locust, headless, closed loop, each user posting PNG images "
        f"({' or '.join(map(str, result['images_per_request']))} per request) to /predict, {result['duration_s']:g} s per "
        f"level and variant, {result['rounds']} interleaved round(s), medians over rounds, loopback; locust runs on the "
        "same cores as the server. `1 after N`: concurrency 1 measured right after concurrency N on the same server, "
        "without warm-up requests. Untrained weights with calibrated BatchNorm and a router balanced on random "
        "images: speed depends on the traffic split, not on what the weights learnt.",
        "",
        "## Targets",
        "",
        *[f"- {line}" for line in verdicts(result)],
        "",
        "## MACs per image (measured with torch's FLOP counter)",
        "",
        "| model | GMACs | vs dense twin |",
        "|---|---|---|",
        *[f"| {name} | {macs[key] / 1e9:.3f} | {macs[key] / macs['dense']:.2f}x |"
          for name, key in (("sparse MoE", "sparse"), ("masked MoE", "masked"), ("dense twin", "dense"))],
        "",
        "## Throughput, latency and server CPU",
        "",
        "Server CPU: the server's processes (request handling and model), without the load generator, per served "
        "image. Model ms per call: the model call's wall time (`advmoe_model_compute_seconds`) over its mean batch.",
        "",
        "| runtime | images/request | variant | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors | mean batch "
        "| model ms per call | server CPU ms per image | expert 0 share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["expert_share"][0] if r.get("expert_share") else float("nan")
        lines.append(f"| {r['runtime']} | {r['images_per_request']} | {r['variant']} | {r['level']} "
                     f"| {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} "
                     f"| {r['errors']} | {r['mean_batch_size']:.1f} | {r['compute_ms_per_call']:.1f} "
                     f"| {r['cpu_ms_per_image']['server']:.1f} | {share:.2f} |")
    lines += ["", "## Speed-up of sparse: served, model only, and what the MACs promise", "",
              "Served: images/s end to end. Model only: the model's own time per image "
              "(`advmoe_model_compute_seconds` over the images, at that level's batches). Server CPU: CPU ms per image.",
              "",
              "| runtime | images/request | concurrency | served vs dense twin | model only vs dense twin "
              "| server CPU vs dense twin | MACs dense/sparse | served vs masked | model only vs masked "
              "| MACs masked/sparse |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for runtime in sorted({r["runtime"] for r in rows}):
        for n in result["images_per_request"]:
            for level in result["levels"]:
                sparse, dense, masked = (find(rows, v, runtime, level, n) for v in ("sparse", "dense twin", "masked"))
                lines.append(
                    f"| {runtime} | {n} | {level} | {sparse['images_per_s'] / dense['images_per_s']:.2f}x "
                    f"| {dense['compute_ms_per_image'] / sparse['compute_ms_per_image']:.2f}x "
                    f"| {dense['cpu_ms_per_image']['server'] / sparse['cpu_ms_per_image']['server']:.2f}x "
                    f"| {macs['dense'] / macs['sparse']:.2f}x "
                    f"| {sparse['images_per_s'] / masked['images_per_s']:.2f}x "
                    f"| {masked['compute_ms_per_image'] / sparse['compute_ms_per_image']:.2f}x "
                    f"| {macs['masked'] / macs['sparse']:.2f}x |")
    lines += ["", f"## Where the time goes (concurrency {c})", "",
              "CPU milliseconds per served image: the server's request handling (each worker's event-loop thread: "
              "HTTP, multipart, PNG decoding, JSON answer), its model (the runtime's threads and the thread calling "
              "it), and locust (the exited load-generator child's rusage); and the model call's own wall time per "
              "image:", "",
              "| runtime | images/request | variant | images/s | model wall ms | model CPU ms | request handling "
              "CPU ms | server CPU ms | locust CPU ms | all CPU ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["level"] != str(c):
            continue
        cpu = r["cpu_ms_per_image"]
        lines.append(f"| {r['runtime']} | {r['images_per_request']} | {r['variant']} | {r['images_per_s']:.1f} "
                     f"| {r['compute_ms_per_image']:.1f} | {cpu['model']:.1f} | {cpu['request handling']:.1f} "
                     f"| {cpu['server']:.1f} | {cpu['load generator']:.1f} "
                     f"| {cpu['server'] + cpu['load generator']:.1f} |")
    lines += ["", *explain(result, c)]
    if result.get("probe_check"):
        n = result["images_per_request"][0]
        lines += ["", "## What a running attack probe costs /predict", "",
                  f"The sparse server at concurrency {TARGET_CONCURRENCY} ({n} image(s)/request), measured without "
                  f"probes and right after with /attack_probe requests sent back to back from one client thread "
                  f"(PGD, 20 steps, 8 images each; the probe worker runs at niceness {PROBE_NICENESS}):", "",
                  "| runtime | probes | images/s | p50 ms | p99 ms | server CPU ms per image | probes done | "
                  "median probe s |", "|---|---|---|---|---|---|---|---|"]
        for runtime, probe in result["probe_check"].items():
            for level in ("without probes", "with probes"):
                r = find(result["rows"], "sparse", runtime, f"{TARGET_CONCURRENCY} {level}", n)
                done = probe["probes"] if level == "with probes" else 0
                median = f"{probe['median_s']:.1f}" if level == "with probes" and probe["median_s"] else "-"
                lines.append(f"| {runtime} | {level} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                             f"| {r['cpu_ms_per_image']['server']:.1f} | {done} | {median} |")
    lines += ["", "Plots: `efficiency_throughput.png` (throughput vs concurrency), `efficiency_latency.png` "
              f"(latency percentiles at concurrency {c}), `efficiency_macs.png` (MAC ratio vs measured speed-up).", ""]
    return "\n".join(lines)


def explain(result: dict, c: int) -> list[str]:
    """Why the end-to-end speed-up is what it is: the same per-image work outside the model (the
    server's request handling, locust) is added to a smaller and a larger model time."""
    rows, lines = result["rows"], []
    for runtime in sorted({r["runtime"] for r in rows}):
        for n in result["images_per_request"]:
            sparse, dense = find(rows, "sparse", runtime, c, n), find(rows, "dense twin", runtime, c, n)
            model = {k: r["cpu_ms_per_image"]["model"] for k, r in (("sparse", sparse), ("dense", dense))}
            around = {k: r["cpu_ms_per_image"]["request handling"] + r["cpu_ms_per_image"]["load generator"]
                      for k, r in (("sparse", sparse), ("dense", dense))}
            lines.append(
                f"- {runtime}, {n} image(s)/request: the model costs {model['dense']:.1f} CPU ms per dense-twin image "
                f"and {model['sparse']:.1f} per sparse image ({model['dense'] / max(model['sparse'], 1e-9):.2f}x); "
                f"request handling and locust add {around['sparse']:.1f} (sparse) and {around['dense']:.1f} (dense) "
                f"CPU ms per image on the same {result['cpus']} cores, whatever the model: end to end "
                f"{sparse['images_per_s'] / dense['images_per_s']:.2f}x.")
    return lines


def plot(result: dict, folder: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = result["images_per_request"][0]  # the plots show one request size: the first
    rows = [r for r in result["rows"] if r["images_per_request"] == n]
    macs, files = result["macs"], []
    keys = sorted({(r["variant"], r["runtime"]) for r in rows}, key=lambda k: (k[1], k[0]))

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, runtime in keys:
        points = [r for r in rows if (r["variant"], r["runtime"]) == (variant, runtime) and r["level"].isdigit()]
        ax.plot([r["concurrency"] for r in points], [r["images_per_s"] for r in points], marker="o",
                linestyle="-" if runtime == "onnxruntime" else "--", label=f"{variant}, {runtime}")
    ax.set(xscale="log", xlabel="concurrent users", ylabel="images / s",
           title=f"Served throughput, {n} image(s) per request")
    ax.legend(fontsize=7)
    files.append(_save(fig, folder / f"{stem}_throughput.png"))

    c = TARGET_CONCURRENCY if TARGET_CONCURRENCY in result["concurrency"] else max(result["concurrency"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(keys)
    for i, (variant, runtime) in enumerate(keys):
        r = find(rows, variant, runtime, c, n)
        ax.bar(np.arange(3) + i * width, [r["p50_ms"], r["p95_ms"], r["p99_ms"]], width, label=f"{variant}, {runtime}")
    ax.set_xticks(np.arange(3) + width * (len(keys) - 1) / 2, ["p50", "p95", "p99"])
    ax.set(ylabel="ms", title=f"Latency at concurrency {c}")
    ax.legend(fontsize=7)
    files.append(_save(fig, folder / f"{stem}_latency.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    top = max(macs["dense"], macs["masked"]) / macs["sparse"] * 1.1
    ax.plot([1, top], [1, top], color="grey", linewidth=1, label="speed-up = MAC ratio")
    for runtime in sorted({r["runtime"] for r in rows}):
        for other, key in (("dense twin", "dense"), ("masked", "masked")):
            sparse = find(rows, "sparse", runtime, c, n)["images_per_s"]
            ax.scatter(macs[key] / macs["sparse"], sparse / find(rows, other, runtime, c, n)["images_per_s"],
                       label=f"vs {other}, {runtime}")
    ax.set(xlabel="MAC ratio (other / sparse)", ylabel=f"measured speed-up at concurrency {c}",
           title="What the MACs promise vs what serving gives")
    ax.legend(fontsize=7)
    files.append(_save(fig, folder / f"{stem}_macs.png"))
    return files


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out: Path, command: str) -> None:
    """out (.md) with out.json and the PNG plots beside it; each file appears whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        tmp = Path(tmp)
        (tmp / out.name).write_text(markdown(result, command))
        (tmp / f"{out.stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        plot(result, tmp, out.stem)
        for file in sorted(tmp.iterdir()):
            os.replace(file, out.parent / file.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--images-per-request", nargs="+", type=int, default=[1, 8],
                        help="PNG images in each request (each size is measured at every level)")
    parser.add_argument("--no-after-burst", action="store_true",
                        help="skip the concurrency-1 level measured right after the highest level")
    parser.add_argument("--probe-check", action="store_true",
                        help="then measure the sparse server at concurrency 32 without and with attack probes running")
    parser.add_argument("--workers", type=int, default=0,
                        help="API workers per server (ADVMOE_WORKERS; 0: one per core, the service's default)")
    parser.add_argument("--threads", type=int, default=0,
                        help="model threads per worker (ADVMOE_THREADS; 0: the cores shared out over the workers)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per level and variant")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all variants")
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "torch"], choices=["onnxruntime", "torch"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's model)")
    parser.add_argument("--router-blocks", type=int, default=3)
    parser.add_argument("--out", default="reports/efficiency.md")
    parser.add_argument("--logs", help="folder for the servers' logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency + args.images_per_request) or args.duration <= 0 or args.rounds < 1 \
            or args.workers < 0 or args.threads < 0:
        parser.error("--concurrency, --images-per-request, --duration, --rounds and --workers must be positive")
    start = time.perf_counter()
    result = run(tuple(args.concurrency), args.duration, args.rounds, tuple(args.runtimes), args.image_size,
                 args.width, args.router_blocks, tuple(args.images_per_request), not args.no_after_burst,
                 args.workers, args.threads, args.probe_check, log_dir=Path(args.logs) if args.logs else None)
    command = "advmoe bench serve " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(result, Path(args.out), command.strip())
    print("\n".join(verdicts(result)))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
