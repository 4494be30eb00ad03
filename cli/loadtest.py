"""`advmoe loadtest`: `clients.loadtest.run_loadtest` against a running server, or against one
it starts for the test (`serving.launch.Server`) and stops by PID after."""
from __future__ import annotations

import argparse
import contextlib
import sys

from clients.loadtest import PAYLOAD_NAMES, run_loadtest
from serving.config import RUNTIMES, ServingConfig

from .flags import default_of

HELP = "locust load test of a server: throughput, latency, batching, experts"
DESCRIPTION = ("Ramp the concurrency against a server and write loadtest.json and loadtest.md: throughput, "
               "p50/p95/p99 latency, error rate, mean adaptive batch size and expert usage per level. Bounded in "
               "time and requests.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def default(parameter: str):
        return default_of(run_loadtest, parameter)

    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (loopback only, unless --allow-remote)")
    target.add_argument("--model-tag", help="start a server of this BentoML model for the test, stop it after")
    parser.add_argument("--runtime", choices=RUNTIMES, default=ServingConfig.runtime,
                        help="with --model-tag: the server's runtime (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(default("concurrency")),
                        help="users (requests in flight) per level (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=default("duration_s"),
                        help="seconds per level (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=default("max_requests"),
                        help="at most this many requests per level")
    parser.add_argument("--payload", choices=PAYLOAD_NAMES, default=default("payload"),
                        help="; ".join(f"{k}: {v}" for k, v in PAYLOAD_NAMES.items()) + " (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=default("batch_size"),
                        help="inputs per request (default: %(default)s)")
    parser.add_argument("--inputs", help="a .npy [N, C, H, W] in [0, 1] to send in turn (e.g. test images; "
                                         "routing depends on them); default: uniform noise")
    parser.add_argument("--top-k", type=int, default=default("top_k"), help="classes per input (default: %(default)s)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a server on another host")
    parser.add_argument("--out", default="reports/loadtest", help="report folder (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from clients.client import ClientError

    if args.model_tag:  # start a server of our own, stopped by PID at the end
        from serving.config import environment
        from serving.launch import Server

        server = Server(environment(model_tag=args.model_tag, runtime=args.runtime), log_path=f"{args.out}/serve.log")
    with server if args.model_tag else contextlib.nullcontext() as running:
        url = running.url if args.model_tag else args.url
        try:
            result = run_loadtest(url, args.concurrency, args.duration, args.max_requests, payload=args.payload,
                                  batch_size=args.batch_size, top_k=args.top_k, inputs=args.inputs,
                                  allow_remote=args.allow_remote, out_dir=args.out, log=print)
        except ClientError as e:
            print(f"advmoe loadtest: error: {e}", file=sys.stderr)
            return 2
    print(f"report: {args.out}/loadtest.md, {args.out}/loadtest.json")
    if result.errors:
        print(f"advmoe loadtest: {result.errors} requests failed (see the report)", file=sys.stderr)
        return 1
    return 0
