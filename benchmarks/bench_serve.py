"""The efficiency report: what a user of the served model gets, end to end, on this machine.

    python -m benchmarks.bench_serve            # or: advmoe bench serve
    python -m benchmarks.bench_serve --concurrency 1 8 32 64 --duration 15 --out reports/efficiency.md

MoE ResNet-18 (N = 2, r = 0.5, shared router) and its dense twin, served by the advmoe BentoML
service with the same settings, through onnxruntime and through torch: the MoE model on the
sparse path, the same weights masked (every expert computed, then selected, as the paper's
reference code runs), and the dense twin. Every server is started first and stays up; the load
(locust, headless, PNG uploads to /predict, closed loop) then visits them in interleaved rounds,
so that a noisy machine slows them alike. Models are untrained with calibrated BatchNorm and a
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
TARGETS = {"dense twin": 2.0, "masked": 1.5}  # sparse throughput at least this times theirs


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


def worker_roles(server) -> dict[str, list]:
    """The server's worker processes by role: the API, the model and the probe worker."""
    import psutil

    roles = {"api": [], "model": [], "probe": []}
    for process in psutil.Process(server.process.pid).children(recursive=True):
        cmdline = " ".join(process.cmdline())
        if "_bentoml_impl.worker.service" not in cmdline:
            continue
        role = "model" if "advmoe-model" in cmdline else "probe" if "advmoe-probe" in cmdline else "api"
        roles[role].append(process)
    return roles


def cpu_seconds(roles: dict[str, list]) -> dict[str, float]:
    import resource

    seconds = {role: sum(sum(p.cpu_times()[:2]) for p in processes) for role, processes in roles.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generator, once it has exited
    seconds["load generator"] = children.ru_utime + children.ru_stime
    return seconds


def measured_level(server, roles, concurrency: int, duration_s: float, images: list[bytes]) -> dict:
    """One load level with where the CPU went: seconds of CPU per image in each worker and in the
    load generator (locust), and the model's own compute time per image (from /metrics)."""
    from clients.loadtest import run_level, scrape

    compute = ("advmoe_model_compute_seconds_sum", (("endpoint", "predict"),))
    before_cpu, before = cpu_seconds(roles), scrape(server.url)
    result = run_level(server.url, concurrency, duration_s, images)
    after_cpu, after = cpu_seconds(roles), scrape(server.url)
    served = max(result["images"], 1)
    result["cpu_ms_per_image"] = {role: (after_cpu[role] - before_cpu[role]) * 1e3 / served for role in after_cpu}
    result["compute_ms_per_image"] = (sum(v for (name, labels), v in after.items() if (name, labels[:1]) == compute)
                                      - sum(v for (name, labels), v in before.items()
                                            if (name, labels[:1]) == compute)) * 1e3 / served
    return result


def variant_label(variant) -> str:
    name, _, runtime, _ = variant
    return f"{name}, {runtime}"


def run(concurrency=(1, 8, 32, 64), duration_s=15.0, rounds=1, runtimes=("onnxruntime", "torch"),
        image_size=32, width=1.0, router_blocks=3, workdir: Path | None = None, log_dir: Path | None = None) -> dict:
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
    servers = {}
    try:
        for variant in variants:
            name, model, runtime, execution = variant
            env = {"ADVMOE_MODEL_TAG": tags[model], "ADVMOE_RUNTIME": runtime, "ADVMOE_EXECUTION": execution}
            log = (log_dir or workdir) / f"serve-{name.replace(' ', '-')}-{runtime}.log"
            servers[variant] = Server(env, log_path=log, ready_timeout_s=300).start()
            print(f"serving {variant_label(variant)} at {servers[variant].url}", flush=True)
        roles = {variant: worker_roles(server) for variant, server in servers.items()}
        samples = {(variant, c): [] for variant in variants for c in concurrency}
        for round_index in range(rounds):
            for c in concurrency:
                # Rotate the order every round and level: no variant always goes first.
                order = variants[(round_index + c) % len(variants):] + variants[:(round_index + c) % len(variants)]
                for variant in order:
                    result = measured_level(servers[variant], roles[variant], c, duration_s, images)
                    samples[(variant, c)].append(result)
                    print(f"round {round_index + 1} {variant_label(variant):26s} c={c:3d}: "
                          f"{result['images_per_s']:7.1f} img/s, p99 {result['p99_ms']:7.1f} ms, "
                          f"errors {result['errors']}, mean batch {result['mean_batch_size'] or 0:.1f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    rows = [combine(variant, c, samples[(variant, c)]) for variant in variants for c in concurrency]
    return {"rows": rows, "macs": {k: v for k, v in macs.items()}, "concurrency": list(concurrency),
            "duration_s": duration_s, "rounds": rounds, "image_size": image_size, "width": width,
            "router_blocks": router_blocks, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "advmoe": advmoe.__version__}


def combine(variant, concurrency: int, results: list[dict]) -> dict:
    """Medians over rounds: a round that something else on the machine slowed does not count double."""
    name, model, runtime, execution = variant
    return {
        "variant": name, "runtime": runtime, "model": model, "execution": execution, "concurrency": concurrency,
        "requests": sum(r["requests"] for r in results), "errors": sum(r["errors"] for r in results),
        "images_per_s": statistics.median(r["images_per_s"] for r in results),
        "images_per_s_rounds": [r["images_per_s"] for r in results],
        # Each round's percentile is over its own requests.
        **{p: statistics.median(r[p] if r[p] is not None else float("nan") for r in results)
           for p in ("p50_ms", "p95_ms", "p99_ms")},
        "mean_batch_size": statistics.mean(r["mean_batch_size"] or 0 for r in results),
        "expert_share": results[-1].get("expert_share"),
        "compute_ms_per_image": statistics.median(r["compute_ms_per_image"] for r in results),
        "cpu_ms_per_image": {role: statistics.median(r["cpu_ms_per_image"][role] for r in results)
                             for role in results[0]["cpu_ms_per_image"]},
    }


def find(rows, variant, runtime, concurrency) -> dict:
    return next(r for r in rows if (r["variant"], r["runtime"], r["concurrency"]) == (variant, runtime, concurrency))


def verdicts(result: dict) -> list[str]:
    """The issue's targets at concurrency 32, each with PASS or MISS and by how much."""
    lines, rows = [], result["rows"]
    c = TARGET_CONCURRENCY if TARGET_CONCURRENCY in result["concurrency"] else max(result["concurrency"])
    for runtime in sorted({r["runtime"] for r in rows}):
        sparse = find(rows, "sparse", runtime, c)
        for other, target in TARGETS.items():
            ratio = sparse["images_per_s"] / find(rows, other, runtime, c)["images_per_s"]
            status = "PASS" if ratio >= target else f"MISS by {target - ratio:.2f}x ({ratio / target - 1:+.0%})"
            lines.append(f"{runtime}, concurrency {c}: sparse throughput {ratio:.2f}x the {other} "
                         f"(target {target:.1f}x): {status}")
        dense = find(rows, "dense twin", runtime, c)
        status = "PASS" if sparse["p99_ms"] <= dense["p99_ms"] else \
            f"MISS by {sparse['p99_ms'] - dense['p99_ms']:.0f} ms"
        lines.append(f"{runtime}, concurrency {c}: sparse p99 {sparse['p99_ms']:.0f} ms vs dense twin "
                     f"{dense['p99_ms']:.0f} ms (target: no worse): {status}")
    return lines


def markdown(result: dict, command: str) -> str:
    rows, macs = result["rows"], result["macs"]
    lines = [
        "# Served efficiency: sparse MoE vs masked MoE vs dense twin",
        "",
        f"Produced by `{command}` (benchmarks/bench_serve.py) on {result['cpus']} CPU cores "
        f"({result['machine']}), torch {result['torch']}, advmoe {result['advmoe']}.",
        "",
        f"MoE ResNet-18 (2 experts, ratio 0.5, shared ResNet router with {result['router_blocks']} blocks per stage) "
        f"and its dense twin at width {result['width']:g}, {result['image_size']}x{result['image_size']} RGB input, "
        "served by the advmoe BentoML service (one API worker, one model worker with adaptive batching "
        "up to 64) with identical settings. Load: locust, headless, closed loop, each user posting one "
        f"PNG image to /predict, {result['duration_s']:g} s per level and variant, {result['rounds']} interleaved "
        "round(s), medians over rounds, loopback; locust runs on the same cores as the server. Untrained weights with calibrated "
        "BatchNorm and a router balanced on random images: speed depends on the traffic split, not on "
        "what the weights learnt.",
        "",
        "## Targets (concurrency 32)",
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
        "## Throughput and latency",
        "",
        "| runtime | variant | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors | mean batch | expert 0 share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["expert_share"][0] if r.get("expert_share") else float("nan")
        lines.append(f"| {r['runtime']} | {r['variant']} | {r['concurrency']} | {r['images_per_s']:.1f} "
                     f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} "
                     f"| {r['mean_batch_size']:.1f} | {share:.2f} |")
    lines += ["", "## Speed-up of sparse, measured vs what the MACs promise", "",
              "| runtime | concurrency | vs dense twin | MAC ratio dense/sparse | vs masked | MAC ratio masked/sparse |",
              "|---|---|---|---|---|---|"]
    for runtime in sorted({r["runtime"] for r in rows}):
        for c in result["concurrency"]:
            sparse = find(rows, "sparse", runtime, c)["images_per_s"]
            lines.append(f"| {runtime} | {c} | {sparse / find(rows, 'dense twin', runtime, c)['images_per_s']:.2f}x "
                         f"| {macs['dense'] / macs['sparse']:.2f}x "
                         f"| {sparse / find(rows, 'masked', runtime, c)['images_per_s']:.2f}x "
                         f"| {macs['masked'] / macs['sparse']:.2f}x |")
    c = TARGET_CONCURRENCY if TARGET_CONCURRENCY in result["concurrency"] else max(result["concurrency"])
    lines += ["", f"## Where the time goes (concurrency {c})", "",
              "CPU milliseconds per served image in each process (psutil; the load generator from the "
              "exited locust child's rusage), and the model's own compute per image (wall time of the "
              "model call, `advmoe_model_compute_seconds`, over 2 cores):", "",
              "| runtime | variant | images/s | model compute ms (wall) | model worker CPU ms | API worker CPU ms "
              "| locust CPU ms | all CPU ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["concurrency"] != c or "cpu_ms_per_image" not in r:
            continue
        cpu = r["cpu_ms_per_image"]
        lines.append(f"| {r['runtime']} | {r['variant']} | {r['images_per_s']:.1f} | {r['compute_ms_per_image']:.1f} "
                     f"| {cpu['model']:.1f} | {cpu['api']:.1f} | {cpu['load generator']:.1f} "
                     f"| {sum(cpu.values()):.1f} |")
    lines += ["", *explain(result, c)]
    lines += ["", "Plots: `efficiency_throughput.png` (throughput vs concurrency), `efficiency_latency.png` "
              "(latency percentiles at concurrency 32), `efficiency_macs.png` (MAC ratio vs measured speed-up).", ""]
    return "\n".join(lines)


def explain(result: dict, c: int) -> list[str]:
    """Why the end-to-end speed-up is what it is: the same per-request work (the API worker's
    request handling, the model worker's, locust's) is added to a smaller and a larger compute."""
    rows, lines = result["rows"], []
    for runtime in sorted({r["runtime"] for r in rows}):
        sparse, dense = find(rows, "sparse", runtime, c), find(rows, "dense twin", runtime, c)
        if "cpu_ms_per_image" not in sparse:
            continue
        compute = {k: r["compute_ms_per_image"] for k, r in (("sparse", sparse), ("dense", dense))}
        around = {k: r["cpu_ms_per_image"]["api"] + r["cpu_ms_per_image"]["load generator"]
                  for k, r in (("sparse", sparse), ("dense", dense))}
        lines.append(f"- {runtime}: the model call takes {compute['dense']:.1f} ms per dense-twin image and "
                     f"{compute['sparse']:.1f} ms per sparse image ({compute['dense'] / compute['sparse']:.2f}x), "
                     f"but the API worker and locust alone burn {around['sparse']:.1f} (sparse) and "
                     f"{around['dense']:.1f} (dense) CPU ms per image on the same 2 cores, whatever the model, "
                     f"plus the model worker's own request handling: end to end, "
                     f"{sparse['images_per_s'] / dense['images_per_s']:.2f}x.")
    return lines


def plot(result: dict, folder: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, macs, files = result["rows"], result["macs"], []
    keys = sorted({(r["variant"], r["runtime"]) for r in rows}, key=lambda k: (k[1], k[0]))

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, runtime in keys:
        points = [r for r in rows if (r["variant"], r["runtime"]) == (variant, runtime)]
        ax.plot([r["concurrency"] for r in points], [r["images_per_s"] for r in points], marker="o",
                linestyle="-" if runtime == "onnxruntime" else "--", label=f"{variant}, {runtime}")
    ax.set(xscale="log", xlabel="concurrent users", ylabel="images / s", title="Served throughput")
    ax.legend(fontsize=7)
    files.append(_save(fig, folder / f"{stem}_throughput.png"))

    c = TARGET_CONCURRENCY if TARGET_CONCURRENCY in result["concurrency"] else max(result["concurrency"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(keys)
    for i, (variant, runtime) in enumerate(keys):
        r = find(rows, variant, runtime, c)
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
            sparse = find(rows, "sparse", runtime, c)["images_per_s"]
            ax.scatter(macs[key] / macs["sparse"], sparse / find(rows, other, runtime, c)["images_per_s"],
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
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per level and variant")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all variants")
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "torch"], choices=["onnxruntime", "torch"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's model)")
    parser.add_argument("--router-blocks", type=int, default=3)
    parser.add_argument("--out", default="reports/efficiency.md")
    parser.add_argument("--logs", help="folder for the servers' logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.duration <= 0 or args.rounds < 1:
        parser.error("--concurrency, --duration and --rounds must be positive")
    start = time.perf_counter()
    result = run(tuple(args.concurrency), args.duration, args.rounds, tuple(args.runtimes), args.image_size,
                 args.width, args.router_blocks, log_dir=Path(args.logs) if args.logs else None)
    command = "advmoe bench serve " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(result, Path(args.out), command.strip())
    print("\n".join(verdicts(result)))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
