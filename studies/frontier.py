"""The robustness-cost frontier: dense PGD-AT at several widths against the MoE methods,
worst-case robust accuracy against MACs per image; on Fashion-MNIST (--preset fmnist-tiny), or on
any data set of a preset, read from --data-dir. `advmoe study frontier` runs it (as does
`python -m studies.frontier`).

    advmoe study frontier --plan            # the rows, seeds and the estimated cost; starts nothing
    advmoe study frontier --commands        # one command per missing run, for a scheduler
    nice advmoe study frontier              # run every missing run in turn (resumes)
    advmoe study frontier --report-only     # the report from the result files there are
    advmoe study frontier --curves --plan   # the curves: dense and MoE rows over a range of widths
    advmoe study frontier --time-rows       # each row's ms per image on its fastest runtime, for the report
    advmoe study frontier --ship checkpoints/fmnist-moe   # the best MoE run, as the model to serve

The design is studies/design.py, the runs studies/run.py, the report studies/report.py.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

import advmoe
from advmoe.settings import ConfigError

from .design import MOE_SETTINGS, Plan, default_paths, default_rows, parse_settings, variant_rows
from .estimate import estimate, estimate_table
from .record import load_results
from .report import speed_path, write_report
from .run import commands, run_study
from .ship import ship
from .speed import time_rows

PROG = "advmoe study frontier"
# flags a job of --commands repeats (the rest pick its run, or are this call's)
JOB_FLAGS = ("--preset", "--moe-width", "--epochs", "--train-examples", "--eval-examples", "--autoattack-examples",
             "--data-dir", "--runs", "--results", "--report", "--threads", "--eval-processes", "--set", "--variant",
             "--repeat", "--curves", "--dense-widths", "--moe-widths", "--experts")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plan", action="store_true", help="print the rows and the estimated cost, start nothing")
    what.add_argument("--commands", action="store_true", help="print one command per missing run, start nothing")
    what.add_argument("--report-only", action="store_true", help="write the report from the results there are")
    what.add_argument("--time-rows", action="store_true", help="time every row that has results: ms per image at "
                      "batch 1 and 64 on its fastest runtime (on a quiet machine), for the report; trains nothing")
    what.add_argument("--ship", metavar="DEST", help="copy the best MoE run to DEST (e.g. checkpoints/fmnist-moe) with "
                      "its study numbers in metrics.json; trains nothing")
    p.add_argument("--preset", default=Plan.preset)
    p.add_argument("--moe-width", type=float, default=Plan.moe_width)
    p.add_argument("--epochs", type=int, default=Plan.epochs)
    p.add_argument("--train-examples", type=int, help="default: the full training set")
    p.add_argument("--eval-examples", type=int, default=Plan.eval_examples)
    p.add_argument("--autoattack-examples", type=int, default=Plan.autoattack_examples)
    p.add_argument("--select-examples", type=int, default=Plan.select_examples,
                   help="--ship: the validation images per seed its choice of seed is made on")
    p.add_argument("--seeds", type=int, nargs="+", default=list(Plan.seeds))
    p.add_argument("--headline-seeds", type=int, nargs="+", default=list(Plan.headline_seeds))
    p.add_argument("--repeat", type=int, default=Plan.repeat, metavar="K",
                   help="train the runs again as ROW-seedS-repeatK, beside the first (another draw of the row)")
    p.add_argument("--rows", nargs="+", help="only these rows (keys from --plan)")
    p.add_argument("--data-dir", metavar="DIR", help="the data set's folder: CIFAR-10/100, SVHN and Tiny ImageNet "
                   "need it (nothing is downloaded); Fashion-MNIST defaults to Debian's files")
    p.add_argument("--runs", help=f"the run folders (default: {Plan.runs}, {Plan.runs}_DATASET for another data set)")
    p.add_argument("--results", help="the result files' folder (default: reports/robustness_frontier[_DATASET])")
    p.add_argument("--report", help="the report (default: reports/robustness_frontier[_DATASET].md)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--eval-processes", type=int, default=Plan.eval_processes, metavar="P",
                   help="shard each evaluation over P CPU processes, --threads split between them; CPU only")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="training settings for every run of this call (TOML values: attack_steps=3); give them a "
                   "--variant name to measure them beside the study's runs")
    p.add_argument("--curves", action="store_true", help="add the curves' rows: dense PGD-AT at --dense-widths, "
                   "the MoE method at --moe-widths with each of --experts, and a larger router at the narrowest")
    p.add_argument("--dense-widths", type=float, nargs="+", default=list(Plan.dense_widths), metavar="W")
    p.add_argument("--moe-widths", type=float, nargs="+", default=list(Plan.moe_widths), metavar="W")
    p.add_argument("--experts", type=int, nargs="+", default=list(Plan.experts), metavar="N")
    p.add_argument("--variant", metavar="NAME", help="run the rows as rows of their own, ROW-NAME, trained with "
                   "the --set settings and --epochs")
    return p


def plan_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Plan, list, Path, Path]:
    """The plan, its rows and its result and report paths, from the flags; a bad flag is a usage error."""
    try:
        settings = parse_settings(args.set)
    except ValueError as e:
        parser.error(str(e))
    if args.eval_processes < 1:
        parser.error(f"--eval-processes {args.eval_processes}: give 1 or more")
    if args.repeat < 0:
        parser.error(f"--repeat {args.repeat}: give 1, 2, ... to train the runs again (0 is the first runs)")
    if "method" in settings and not args.variant:  # the rows' own methods would win without a word
        parser.error("--set method: another method makes rows of their own; name them with --variant NAME")
    if args.curves and set(settings) & set(MOE_SETTINGS):  # each curve row sets its own
        parser.error(f"--set {', '.join(sorted(set(settings) & set(MOE_SETTINGS)))}: the curves' rows set it; "
                     "choose them with --experts")
    if min(args.dense_widths + args.moe_widths) <= 0 or min(args.experts) < 2:
        parser.error("--dense-widths and --moe-widths must be positive, --experts 2 or more")
    where = {"data_dir": args.data_dir} if args.data_dir else {}  # where the data is: no setting of the runs
    plan = Plan(preset=args.preset, moe_width=args.moe_width, epochs=args.epochs, train_examples=args.train_examples,
                eval_examples=args.eval_examples, autoattack_examples=args.autoattack_examples,
                select_examples=args.select_examples, seeds=tuple(args.seeds), headline_seeds=tuple(args.headline_seeds),
                overrides={**settings, **where}, repeat=args.repeat, eval_processes=args.eval_processes,
                curves=args.curves, dense_widths=tuple(args.dense_widths), moe_widths=tuple(args.moe_widths),
                experts=tuple(args.experts))
    try:
        rows = default_rows(plan)
        base = plan.base()
        runs, results, report = default_paths(base.dataset)
        plan = replace(plan, runs=args.runs or str(runs))
    except ConfigError as e:
        parser.error(str(e))
    if plan.eval_processes > 1 and base.device != "cpu":
        parser.error(f"--eval-processes shards evaluations over CPU processes; the runs use {base.device}: drop it")
    if args.rows:
        unknown = sorted(set(args.rows) - {r.key for r in rows})
        if unknown:
            parser.error(f"unknown rows {unknown}; rows: {', '.join(r.key for r in rows)}")
        rows = [r for r in rows if r.key in args.rows]
    if args.variant:
        changed = {**settings, **({"epochs": args.epochs} if args.epochs != Plan.epochs else {})}
        if not changed:
            parser.error("--variant runs the rows with other settings: give them with --set KEY=VALUE or --epochs")
        try:
            rows = variant_rows(rows, args.variant, changed)
        except ValueError as e:
            parser.error(str(e))
    return plan, rows, Path(args.results or results), Path(args.report or report)


def job_flags(argv: list[str]) -> list[str]:
    """The flags of this call that every job of --commands repeats, as given."""
    kept, keep = [], False
    for arg in argv:
        if arg.startswith("--"):
            keep = arg.split("=")[0] in JOB_FLAGS
        if keep:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan, rows, results, report = plan_from(args, parser)
    command = shlex.join([*PROG.split(), *argv])
    try:
        if args.ship:
            ship(results, Path(plan.runs), Path(args.ship), plan=plan)
        elif args.time_rows:
            time_rows(load_results(results), plan, speed_path(report))
            print(write_report(results, report, plan, command) or f"no results in {results}")
        elif args.report_only:
            print(write_report(results, report, plan, command) or f"no results in {results}")
        elif args.commands:
            print("\n".join(commands(plan, rows, results, job_flags(argv))))
        else:
            done = {p.stem for p in results.glob("*.json")}
            print(estimate_table(estimate(plan, rows, results), done, rows, plan.repeat))  # checks every result file
            if not args.plan:
                run_study(plan, rows, results, on_result=lambda: write_report(results, report, plan))
                write_report(results, report, plan, command)
    except (ValueError, FileExistsError, advmoe.DatasetNotFoundError) as e:
        parser.exit(2, f"{PROG}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
