"""Exported runtimes vs torch eager, for the dense twin and the sparse MoE, side by side.

    python -m benchmarks.bench_export            # or: advmoe bench export
    python -m benchmarks.bench_export --archs resnet18 --routers shared --batch-sizes 1 64
    python -m benchmarks.bench_export --runtimes torch torchscript   # skip the slow AOTInductor compile

The three models of `bench_sparse` (same weights, calibrated BatchNorm, balanced routers) are
exported as `advmoe export` does: to ONNX (dynamo exporter, sparse dispatch in the graph, run by
onnxruntime on the CPU), to TorchScript (model.pt, run by torch.jit) and to an AOTInductor
package (compiled C++ kernels); each sparse model next to its dense twin exported the same way
(the masked MoE in ONNX only), all in the same process with torch eager, every runtime with
--threads intra-op threads. Every runner is timed in interleaved rounds and the median printed.
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import onnxruntime
import torch

import advmoe
from advmoe.io import atomic_write_text
from advmoe.runtimes import RUNTIMES as ALL_RUNTIMES
from export.aoti import aoti_runner, export_aoti
from export.graph import export_onnx, onnx_runner
from export.torchscript import export_torchscript, torchscript_runner

from .bench_sparse import ROUTERS, build, common_parser, parse, time_interleaved

KINDS = ("dense", "masked", "sparse")
# pt2's module runs the same torch ops from Python as eager does: it would time eager again.
RUNTIMES = tuple(name for name in ALL_RUNTIMES if name != "pt2")


def export_all(models: dict, folder: Path, runtime: str, threads: int) -> dict:
    """Runners of the models exported for `runtime` (masked: ONNX only; TorchScript holds sparse
    execution only, and one more AOTInductor compile would double the benchmark's time)."""
    runners = {}
    for kind, model in models.items():
        if kind == "masked" and runtime != "onnxruntime":
            continue
        if kind != "masked":
            advmoe.set_execution(model, "sparse", channels_last=False)  # NCHW graph: the runtime picks its layout
        if runtime == "onnxruntime":
            runners[kind] = onnx_runner(export_onnx(model, folder / f"{kind}.onnx"), threads)
        elif runtime == "torchscript":
            runners[kind] = torchscript_runner(export_torchscript(model, folder / f"{kind}.pt"))
        else:
            runners[kind] = aoti_runner(export_aoti(model, folder / f"{kind}.aoti.pt2"))
        if kind != "masked":
            advmoe.set_execution(model, "sparse")  # back to the fastest eager setting
    return runners


def run(archs=("resnet18",), routers=ROUTERS, batch_sizes=(1, 64), image_size=32, width=1.0, rounds=5,
        threads=2, runtimes=RUNTIMES) -> list[dict]:
    rows = []
    for arch in archs:
        for router in routers:
            torch.manual_seed(0)
            calib = torch.rand(64, 3, image_size, image_size)
            models = build(arch, router, image_size, width, 3, calib)
            with tempfile.TemporaryDirectory() as folder:
                runners = {f"torch {k}": models[k] for k in KINDS}
                for runtime in runtimes:
                    if runtime != "torch":
                        exported = export_all(models, Path(folder), runtime, threads)
                        runners |= {f"{runtime} {k}": r for k, r in exported.items()}
                for batch in batch_sizes:
                    x = calib[:batch] if batch <= 64 else torch.rand(batch, 3, image_size, image_size)
                    ms = time_interleaved(runners, x, rounds, 10 if batch == 1 else 1, warmup=3)
                    for runtime in runtimes:
                        row = dict(arch=arch, router=router, batch=batch, runtime=runtime,
                                   **{f"{k}_ms": ms.get(f"{runtime} {k}") for k in KINDS})
                        row["speedup_vs_dense"] = row["dense_ms"] / row["sparse_ms"]
                        row["speedup_vs_masked"] = row["masked_ms"] / row["sparse_ms"] if row["masked_ms"] else None
                        row["speedup_vs_torch_sparse"] = ms["torch sparse"] / row["sparse_ms"]
                        rows.append(row)
                        print(format_row(row), flush=True)
    return rows


HEADER = ("| model | router | batch | runtime | dense ms | masked ms | sparse ms | sparse vs dense | sparse vs masked "
          "| sparse vs torch eager sparse |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    masked = f"{r['masked_ms']:.1f}" if r["masked_ms"] else "-"
    vs_masked = f"{r['speedup_vs_masked']:.2f}x" if r["speedup_vs_masked"] else "-"
    return (f"| moe_{r['arch']} | {r['router']} | {r['batch']} | {r['runtime']} | {r['dense_ms']:.1f} "
            f"| {masked} | {r['sparse_ms']:.1f} | {r['speedup_vs_dense']:.2f}x "
            f"| {vs_masked} | {r['speedup_vs_torch_sparse']:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = common_parser("advmoe bench export", __doc__, ["resnet18"])
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads of every runtime: torch (eager, TorchScript, AOTInductor) and onnxruntime")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES,
                        help="torch is eager; aoti compiles each model for about a minute")
    args = parse(parser, argv)
    torch.set_num_threads(args.threads)  # before any AOTInductor compile: its kernels keep the count
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"onnxruntime {onnxruntime.__version__} ({args.threads} intra-op threads), "
          f"{platform.processor() or platform.machine()}, image {args.image_size}x{args.image_size}, "
          f"width {args.width}, {args.rounds} rounds\n")
    print(HEADER, flush=True)
    rows = run(args.archs, args.routers, tuple(args.batch_sizes), args.image_size, args.width, args.rounds, args.threads,
               tuple(args.runtimes))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
