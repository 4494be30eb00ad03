"""What every study shares about evaluations: their command-line settings, and the one way an
evaluation is taken from --reuse, kept from an earlier call (a study cut off resumes without
redoing it), or run, in one process or sharded over several."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from advmoe.io import atomic_write_text
from evaluation.cache import kept_evaluation
from evaluation.robustness import EvalSettings
from evaluation.sharding import evaluate_in_processes


def add_arguments(parser: argparse.ArgumentParser, runs: Path, report: Path, pgd_steps: tuple[int, ...]) -> None:
    parser.add_argument("--runs", type=Path, default=runs, help=f"where new evaluations go (default: {runs})")
    parser.add_argument("--report", type=Path, default=report, help=f"(default: {report}; its .json beside it)")
    parser.add_argument("--data-dir", help="where the test set is (default: the dataset's usual place)")
    parser.add_argument("--pgd-steps", type=int, nargs="+", default=list(pgd_steps))
    parser.add_argument("--apgd-iterations", type=int, default=EvalSettings().apgd_iterations)
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def settings(args: argparse.Namespace, attacks: tuple[str, ...]) -> dict:
    """The EvalSettings fields the evaluations run with (the others at their defaults); sets --threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = EvalSettings()
    return {"attacks": attacks, "pgd_steps": tuple(args.pgd_steps), "apgd_iterations": args.apgd_iterations,
            "step": defaults.step, "seed": defaults.seed}


def reused(path: Path, name: str, accept: Callable[[dict], bool], wanted: str, log=print) -> dict:
    """The eval.json given with --reuse NAME=PATH, refused unless `accept` takes it; `wanted` says
    what it should have been, for the error."""
    if not path.is_file():
        raise ValueError(f"--reuse {name}={path}: no such file")
    if (doc := kept_evaluation(path, accept)) is None:
        raise ValueError(f"{path} is not {wanted}")
    log(f"{name}: reusing {path}")
    return doc


def kept_or_run(checkpoint: Path, out: Path, accept: Callable[[dict], bool], n: int, settings: dict,
                data_dir: str | None = None, log=print, processes: int = 1, **extra) -> dict:
    """The eval.json kept in `out` when `accept` takes it, or a new evaluation of the first n images
    written there (`extra`: more evaluate_checkpoint arguments), sharded over `processes` CPU
    processes with the threads split between them (the same per-image results)."""
    if (doc := kept_evaluation(out / "eval.json", accept)) is not None:
        log(f"{out.name}: reusing {out / 'eval.json'}")
        return doc
    log(f"{out.name}: evaluating {checkpoint} on {n} images ({', '.join(settings['attacks'])})")
    threads = max(1, torch.get_num_threads() // processes)
    return evaluate_in_processes(processes, checkpoint, threads, data_dir=data_dir, n_examples=n, out=out,
                                 progress=False, **settings, **extra)


def write(report: Path, result: dict, text: str) -> None:
    """The report and its numbers (REPORT.json beside it), each written whole, and the report printed."""
    atomic_write_text(report.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(report, text)
    print(text)


def reuse_paths(parser: argparse.ArgumentParser, items: list[str], names, what: str = "NAME") -> dict[str, Path]:
    """--reuse NAME=PATH items as {name: path}, NAME one of `names`; a malformed one is a usage error."""
    reuse = {}
    for item in items:
        name, _, path = item.partition("=")
        if name not in names or not path:
            parser.error(f"--reuse {item!r}: write {what}=PATH with {what} one of {', '.join(names)}")
        reuse[name] = Path(path)
    return reuse
