"""Whether a run's validation robustness collapsed, and why: each run's validation accuracies by
epoch (clean, PGD, the run's own training attack, and APGD where the run validated with it), with
the collapse guard's events, from the runs' metrics.jsonl. An epoch whose PGD accuracy falls while
clean accuracy holds and the training attack's accuracy stands far above PGD's is catastrophic
overfitting of the training attack; APGD far under PGD is gradient masking that PGD cannot see.

    advmoe study collapse RUN [RUN ...] --report reports/collapse_guard.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from . import evaluations
from .report import markdown, percent_cell

KEYS = ("val_clean_accuracy", "val_pgd_accuracy", "val_train_attack_accuracy", "val_apgd_accuracy",
        "val_worst_accuracy", "val_route_flip_rate")


def read_run(run: Path) -> dict:
    """A run's settings and its rows of metrics.jsonl, in the order they were trained."""
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())
    return {"run": run.name, "method": config["method"], "seed": config["seed"],
            "collapse_guard": config.get("collapse_guard", "off"),
            "rows": [{"epoch": r["epoch"], **{k: r.get(k) for k in KEYS},
                      "training_attack_steps": r.get("training_attack_steps"),
                      "collapse_guard": r.get("collapse_guard")} for r in history]}


def table(runs: list[dict]) -> str:
    rows = [[run["run"], run["collapse_guard"], str(r["epoch"]), *(percent_cell(r[k]) for k in KEYS),
             str(r["training_attack_steps"] or "-"), (r["collapse_guard"] or {}).get("action", "")]
            for run in runs for r in run["rows"]]
    return markdown(["run", "guard", "epoch", "val clean (%)", "val PGD (%)", "val training attack (%)", "val APGD (%)",
                     "val worst case (%)", "routes PGD flips (%)", "training attack steps", "collapse guard"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe study collapse", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with config.json and metrics.jsonl)")
    parser.add_argument("--report", type=Path, default=Path("reports/collapse_guard.md"))
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        parser.exit(2, f"{parser.prog}: error: no metrics.jsonl in {', '.join(missing)}: give run folders of advmoe train\n")
    runs = [read_run(r) for r in args.runs]
    command = shlex.join(["advmoe", "study", "collapse", *(argv if argv is not None else sys.argv[1:])])
    text = (f"# Validation robustness by epoch, and the collapse guard\n\nProduced by `{command}` (studies/collapse.py) "
            f"from the runs' metrics.jsonl. Rows in the order they were trained: an epoch trained again after a "
            f"rollback appears twice.\n\n{table(runs)}\n")
    evaluations.write(args.report, {"command": command, "runs": runs}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
