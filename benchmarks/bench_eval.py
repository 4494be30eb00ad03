"""Wall time of one evaluation in one process against the same evaluation sharded over several.

    advmoe bench eval CKPT --n-examples 128 --batch-size 64 --attacks pgd apgd route-fixed router square

One process with --threads torch threads, then --processes processes with --threads split between
them (what `python -m studies.frontier --eval-processes` runs), in alternating rounds on the
same images and settings. Printed: each round's wall seconds (process start-up included), the
median ratio, and whether the per-image verdicts agree, which they must: the images are cut into
the same units whatever the number of processes. Give at least --processes units of
--batch-size images, or a process has nothing to do.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import advmoe
from evaluation.sharding import evaluate_in_processes
from evaluation.suite import ATTACKS


def run(checkpoint: str | Path, processes: int = 2, threads: int = 2, rounds: int = 2, **evaluation) -> dict:
    """evaluation: evaluate_checkpoint's arguments (n_examples, batch_size, attacks, settings)."""
    seconds: dict[int, list[float]] = {1: [], processes: []}
    verdicts = {}
    torch.set_num_threads(threads)  # one process runs in this one, with the caller's threads
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(rounds):
            for shards in (1, processes):
                start = time.perf_counter()
                doc = evaluate_in_processes(shards, checkpoint, max(1, threads // shards), progress=False,
                                            out=Path(scratch) / str(shards), **evaluation)
                seconds[shards].append(time.perf_counter() - start)
                verdicts[shards] = doc["per_example"]
    one, sharded = statistics.median(seconds[1]), statistics.median(seconds[processes])
    return {"seconds": seconds, "speedup": one / sharded, "same_verdicts": verdicts[1] == verdicts[processes],
            "examples": doc["examples"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe bench eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--processes", type=int, default=2, help="processes of the sharded evaluation (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    parser.add_argument("--n-examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="images per unit; the units are dealt to the processes")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=["pgd", "apgd", "route-fixed", "router", "square"])
    parser.add_argument("--data-dir", help="where the dataset files are (see advmoe.data)")
    args = parser.parse_args(argv)
    if min(args.processes, args.threads, args.rounds, args.n_examples, args.batch_size) < 1:
        parser.error("--processes, --threads, --rounds, --n-examples and --batch-size must be positive")
    if args.processes < 2:
        parser.error("--processes: give 2 or more (1 is the baseline every round runs)")
    result = run(args.checkpoint, args.processes, args.threads, args.rounds, n_examples=args.n_examples,
                 batch_size=args.batch_size, attacks=args.attacks, data_dir=args.data_dir)
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__}; {args.checkpoint}, {result['examples']} images in "
          f"units of {args.batch_size}, attacks {' '.join(args.attacks)}; {args.rounds} rounds\n")
    print("| processes x threads | wall seconds per round | median |\n|---|---|---|")
    for shards, times in result["seconds"].items():
        print(f"| {shards} x {max(1, args.threads // shards)} | {', '.join(f'{t:.1f}' for t in times)} "
              f"| {statistics.median(times):.1f} |")
    print(f"\n{args.processes} processes: {result['speedup']:.2f}x the speed of one; per-image verdicts "
          f"{'the same' if result['same_verdicts'] else 'DIFFERENT'}")
    return 0 if result["same_verdicts"] else 1
