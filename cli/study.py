"""`advmoe study NAME [ARGS...]`: a study of studies/, its arguments passed through to the
study's own `main(argv)` (the same as `python -m studies.<module> ARGS...`)."""
from __future__ import annotations

import argparse
import importlib

STUDIES = {"frontier": "studies.frontier", "gate-grad": "studies.gate_grad", "per-class": "studies.per_class",
           "methods": "studies.methods", "robustness": "studies.robustness", "collapse": "studies.collapse",
           "card": "studies.card"}
HELP = "run a study (train, evaluate, report): `advmoe study frontier --help`"
DESCRIPTION = "Run a study; each takes its own arguments (`advmoe study NAME --help`). Studies: " + ", ".join(
    f"{name} ({module})" for name, module in STUDIES.items()) + "."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=STUDIES, metavar="NAME", help="one of: " + ", ".join(STUDIES))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the study")


def run(args: argparse.Namespace) -> int:
    module = STUDIES[args.name]
    try:  # imported here: a study's import cost (and any trouble in it) stays with that study
        study = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # a dependency the study needs: a real error, with its traceback
            raise
        raise RuntimeError(f"study {args.name!r} is not installed here (no module {module})") from None
    return study.main(args.args)
