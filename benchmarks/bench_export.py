"""onnxruntime vs torch eager, for the dense twin, the masked MoE and the sparse MoE, side by side.

    python -m benchmarks.bench_export            # or: advmoe bench export
    python -m benchmarks.bench_export --archs resnet18 --routers shared --batch-sizes 1 64

The three models of `bench_sparse` (same weights, calibrated BatchNorm, balanced routers) are
exported to ONNX as `advmoe export` does (dynamo exporter, sparse dispatch in the graph) and
run by onnxruntime on the CPU with 2 intra-op threads, next to torch eager in the same
process; every runner is timed in interleaved rounds and the median is printed.
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
from export.graph import export_onnx, onnx_runner

from .bench_sparse import ROUTERS, build, common_parser, parse, time_interleaved

KINDS = ("dense", "masked", "sparse")


def export_all(models: dict, folder: Path, threads: int) -> dict:
    sessions = {}
    for kind, model in models.items():
        if kind != "masked":
            advmoe.set_execution(model, "sparse", channels_last=False)  # NCHW graph: onnxruntime picks its layout
        sessions[kind] = onnx_runner(export_onnx(model, folder / f"{kind}.onnx"), threads)
        if kind != "masked":
            advmoe.set_execution(model, "sparse")  # back to the fastest eager setting
    return sessions


def run(archs=("resnet18",), routers=ROUTERS, batch_sizes=(1, 64), image_size=32, width=1.0, rounds=5,
        threads=2) -> list[dict]:
    rows = []
    for arch in archs:
        for router in routers:
            torch.manual_seed(0)
            calib = torch.rand(64, 3, image_size, image_size)
            models = build(arch, router, image_size, width, 3, calib)
            with tempfile.TemporaryDirectory() as folder:
                sessions = export_all(models, Path(folder), threads)
                for batch in batch_sizes:
                    x = calib[:batch] if batch <= 64 else torch.rand(batch, 3, image_size, image_size)
                    runners = {f"torch {k}": models[k] for k in KINDS} | {f"onnxruntime {k}": sessions[k] for k in KINDS}
                    ms = time_interleaved(runners, x, rounds, 10 if batch == 1 else 1)
                    for runtime in ("torch", "onnxruntime"):
                        row = dict(arch=arch, router=router, batch=batch, runtime=runtime,
                                   **{f"{k}_ms": ms[f"{runtime} {k}"] for k in KINDS})
                        row["speedup_vs_dense"] = row["dense_ms"] / row["sparse_ms"]
                        row["speedup_vs_masked"] = row["masked_ms"] / row["sparse_ms"]
                        row["onnxruntime_vs_torch_sparse"] = ms["torch sparse"] / ms["onnxruntime sparse"]
                        rows.append(row)
                        print(format_row(row), flush=True)
    return rows


HEADER = ("| model | router | batch | runtime | dense ms | masked ms | sparse ms | sparse vs dense | sparse vs masked "
          "| onnxruntime vs torch (sparse) |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| moe_{r['arch']} | {r['router']} | {r['batch']} | {r['runtime']} | {r['dense_ms']:.1f} "
            f"| {r['masked_ms']:.1f} | {r['sparse_ms']:.1f} | {r['speedup_vs_dense']:.2f}x "
            f"| {r['speedup_vs_masked']:.2f}x | {r['onnxruntime_vs_torch_sparse']:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = common_parser("advmoe bench export", __doc__, ["resnet18"])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parse(parser, argv)
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"onnxruntime {onnxruntime.__version__} ({args.threads} intra-op threads), "
          f"{platform.processor() or platform.machine()}, image {args.image_size}x{args.image_size}, "
          f"width {args.width}, {args.rounds} rounds\n")
    print(HEADER, flush=True)
    rows = run(args.archs, args.routers, tuple(args.batch_sizes), args.image_size, args.width, args.rounds, args.threads)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
