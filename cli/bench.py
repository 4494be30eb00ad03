"""`advmoe bench NAME [ARGS...]`: a speed benchmark of benchmarks/, its arguments passed through."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {"sparse": "benchmarks.bench_sparse", "export": "benchmarks.bench_export",
              "methods": "benchmarks.bench_methods", "serve": "benchmarks.bench_serve", "eval": "benchmarks.bench_eval",
              "profile": "benchmarks.profile_sparse", "folder-memory": "benchmarks.folder_memory",
              "gpu": "benchmarks.bench_gpu"}
HELP = "speed benchmarks: `advmoe bench sparse --help`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark")


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.name]).main(args.args)
