"""Measuring served efficiency: the MoE model (sparse and masked) and its dense twin exported into a
temporary BentoML store, every variant served at once, and locust load visiting them in
interleaved rounds. The result is a dict of rows (one per variant, request size and level, medians
over rounds) that serve_report renders."""
from __future__ import annotations

import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import advmoe
from advmoe.macs import measure_macs

from .bench_sparse import build
from .serve_targets import TARGET_CONCURRENCY

# (name, model, runtime, execution): the model is the BentoML model the variant serves.
VARIANTS = (
    ("sparse", "sparse", "onnxruntime", "sparse"),
    ("masked", "masked", "onnxruntime", "sparse"),
    ("dense twin", "dense", "onnxruntime", "sparse"),
    ("sparse", "sparse", "torch", "sparse"),
    ("masked", "sparse", "torch", "masked"),
    ("dense twin", "dense", "torch", "sparse"),
)


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



def start_servers(servers: dict, variants: list, tags: dict, workers: int, threads: int, probe_check: bool,
                  log_dir: Path) -> None:
    """Starts one server per variant into `servers` (filled as they start, so that the caller stops
    those already up if a later one fails)."""
    from serving.launch import Server

    for variant in variants:
        name, model, runtime, execution = variant
        env = {"ADVMOE_MODEL_TAG": tags[model], "ADVMOE_RUNTIME": runtime, "ADVMOE_EXECUTION": execution,
               "ADVMOE_WORKERS": str(workers), "ADVMOE_THREADS": str(threads),
               "ADVMOE_PROBE_ENABLED": "1" if probe_check else "0"}
        log = log_dir / f"serve-{name.replace(' ', '-')}-{runtime}.log"
        servers[variant] = Server(env, log_path=log, ready_timeout_s=300).start()
        print(f"serving {variant_label(variant)} at {servers[variant].url}", flush=True)


class Load:
    """Load levels run against the served variants; every round's result kept by (variant, images
    per request, level), in the order the report lists them."""

    def __init__(self, servers: dict, variants: list, images: list[bytes], duration_s: float,
                 images_per_request, levels: list[str]):
        self.servers, self.variants, self.images, self.duration_s = servers, variants, images, duration_s
        self.processes = {variant: server.processes() for variant, server in servers.items()}
        self.samples = {(variant, n, level): [] for variant in variants for n in images_per_request for level in levels}

    def measure(self, variant, n: int, level: str, concurrency: int, warmup: int, round_index: int) -> None:
        result = measured_level(self.servers[variant], self.processes[variant], concurrency, self.duration_s,
                                self.images, n, warmup)
        self.samples.setdefault((variant, n, level), []).append(result)
        print(f"round {round_index + 1} {variant_label(variant):26s} {n} img/req c={level:>9s}: "
              f"{result['images_per_s']:7.1f} img/s, p50 {result['p50_ms'] or 0:6.1f} ms, "
              f"p99 {result['p99_ms'] or 0:7.1f} ms, errors {result['errors']}, "
              f"mean batch {result['mean_batch_size'] or 0:.1f}, server CPU "
              f"{result['cpu_ms_per_image']['server']:.1f} ms/img", flush=True)

    def round(self, round_index: int, concurrency, images_per_request, after_burst: bool) -> None:
        """Every level for every variant; with after_burst, each variant's highest level is followed at
        once (no warm-up requests) by a concurrency-1 level."""
        top = max(concurrency)
        for n in images_per_request:
            for c in concurrency:
                # Rotate the order every round and level: no variant always goes first.
                k = (round_index + c + n) % len(self.variants)
                for variant in self.variants[k:] + self.variants[:k]:
                    self.measure(variant, n, str(c), c, 4, round_index)
                    if after_burst and c == top:
                        self.measure(variant, n, f"1 after {top}", 1, 0, round_index)

    def probe_check(self, n: int, round_index: int, image_size: int) -> dict:
        """The sparse servers at TARGET_CONCURRENCY without, then with, attack probes running."""
        probes = {}
        for variant in (v for v in self.variants if v[0] == "sparse"):
            self.measure(variant, n, f"{TARGET_CONCURRENCY} without probes", TARGET_CONCURRENCY, 4, round_index)
            with ProbeLoad(self.servers[variant].url, image_size) as load:
                self.measure(variant, n, f"{TARGET_CONCURRENCY} with probes", TARGET_CONCURRENCY, 4, round_index)
            probes[variant[2]] = {"probes": load.done, "failed": load.failed, "images_per_probe": 8, "steps": 20,
                                  "median_s": statistics.median(load.seconds) if load.seconds else None}
        return probes


def run(concurrency=(1, 8, 32, 64), duration_s=15.0, rounds=1, runtimes=("onnxruntime", "torch"),
        image_size=32, width=1.0, router_blocks=3, images_per_request=(1, 8), after_burst=True, workers=0,
        threads=0, probe_check=False, workdir: Path | None = None, log_dir: Path | None = None) -> dict:
    """Every variant served at once; per round, per images-per-request and per level, the load visits
    them in a rotating order. With after_burst, each variant's highest level is followed at once
    (no warm-up requests) by a concurrency-1 level: what a lone request gets right after a burst.
    With probe_check, the sparse servers then run concurrency 32 without and with attack probes
    running back to back, one after the other."""
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
    servers = {}
    try:
        start_servers(servers, variants, tags, workers, threads, probe_check, log_dir or workdir)
        load = Load(servers, variants, images, duration_s, images_per_request, levels)
        for round_index in range(rounds):
            load.round(round_index, concurrency, images_per_request, after_burst)
        probes = load.probe_check(images_per_request[0], rounds, image_size) if probe_check else {}
    finally:
        for server in servers.values():
            server.stop()
    rows = [combine(variant, n, level, found) for (variant, n, level), found in load.samples.items() if found]
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
