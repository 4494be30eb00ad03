"""The efficiency report: what a user of the served model gets, end to end, on this machine.

    python -m benchmarks.bench_serve            # or: advmoe bench serve
    python -m benchmarks.bench_serve --concurrency 1 8 32 64 --duration 15 --out reports/efficiency.md
    python -m benchmarks.bench_serve --runtimes onnxruntime --workers 2 --out /tmp/two-workers.md
    python -m benchmarks.bench_serve --report-only --out reports/efficiency.md   # re-render from its .json
    python -m benchmarks.bench_serve --checkpoint checkpoints/fmnist-moe --concurrency 1 8 32   # a trained model

MoE ResNet-18 (N = 2, r = 0.5, shared router) and its dense twin, served by the advmoe BentoML
service with the same settings, through onnxruntime and through torch: the MoE model on the
sparse path, the same weights masked (every expert computed, then selected, as the paper's
reference code runs), and the dense twin. Every server is started first and stays up; the load
(locust, headless, PNG uploads to /predict, closed loop; 1 and 8 images per request) then visits
them in interleaved rounds, so that a noisy machine slows them alike, and each server's highest
level is followed at once by a concurrency-1 level (a lone request right after a burst). Per
level: throughput, latency, the model's own time per call and per image, and the server's CPU
per image (request handling and model threads, without the load generator). Models are untrained
with calibrated BatchNorm and a router balanced on random images (bench_sparse.build): speed does
not depend on what the weights learnt, only on how the router splits the traffic, which the
report measures.

Measuring is serve_measure.py, the targets serve_targets.py, the report (markdown, JSON, plots)
serve_report.py and serve_plots.py; this module is the command line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .serve_report import read_result, write_report
from .serve_targets import checks


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--checkpoint", help="instead: this trained MoE checkpoint against its dense twin and the dense "
                        "model of its MACs, each on its fastest runtime, 1 test image per request (serve_shipped.py; "
                        "--out defaults to reports/efficiency_shipped.md)")
    parser.add_argument("--out", help="the report (default: reports/efficiency.md)")
    parser.add_argument("--logs", help="folder for the servers' logs (default: a temporary folder)")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: re-render --out and its plots from the .json beside it "
                             "(the measuring flags are then ignored)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out = args.out or ("reports/efficiency_shipped.md" if args.checkpoint else "reports/efficiency.md")
    if args.report_only:
        try:
            result, command = read_result(Path(args.out))
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
        report = _shipped() if "checkpoint" in result else None
        (report.write_report if report else write_report)(result, Path(args.out), command)
        print("\n".join(check.line() for check in (report.checks if report else checks)(result)))
        print(f"wrote {args.out} from {Path(args.out).with_suffix('.json')}")
        return 0
    if any(c < 1 for c in args.concurrency + args.images_per_request) or args.duration <= 0 or args.rounds < 1 \
            or args.workers < 0 or args.threads < 0:
        parser.error("--concurrency, --images-per-request, --duration, --rounds and --workers must be positive")
    if args.checkpoint:
        return _checkpoint(args, argv, parser)
    from .serve_measure import run

    start = time.perf_counter()
    result = run(tuple(args.concurrency), args.duration, args.rounds, tuple(args.runtimes), args.image_size,
                 args.width, args.router_blocks, tuple(args.images_per_request), not args.no_after_burst,
                 args.workers, args.threads, args.probe_check, log_dir=Path(args.logs) if args.logs else None)
    command = "advmoe bench serve " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(result, Path(args.out), command.strip())
    print("\n".join(check.line() for check in checks(result)))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f}s")
    return 0


def _shipped():
    from . import serve_shipped

    return serve_shipped


def _checkpoint(args: argparse.Namespace, argv: list[str] | None, parser: argparse.ArgumentParser) -> int:
    shipped = _shipped()
    if not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no checkpoint there (config.json missing)")
    start = time.perf_counter()
    result = shipped.run(Path(args.checkpoint), tuple(args.concurrency), args.duration, args.rounds, args.workers,
                         args.threads, log_dir=Path(args.logs) if args.logs else None)
    command = "advmoe bench serve " + " ".join(argv if argv is not None else sys.argv[1:])
    shipped.write_report(result, Path(args.out), command.strip())
    print("\n".join(check.line() for check in shipped.checks(result)))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
