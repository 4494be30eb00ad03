"""The methods comparison: dense PGD-AT, MoE-AT and AdvMoE (both router losses) trained at equal
budget over seeds, compared on test clean and PGD accuracy (reports/fmnist_methods.md and its .json).

    python -m studies.methods --preset fmnist-tiny --seeds 0 1 2 --out reports/fmnist_methods.md

Every run uses the preset's data, attack budget (ε, PGD steps, epochs, batch) and the same
architecture family: the dense twin for PGD-AT, the MoE model for MoE-AT and AdvMoE. Runs go
to --runs (one directory each, resumed if cut off); the table reports mean ± standard deviation
of test clean accuracy, test PGD accuracy (through the straight-through router; not the
robust accuracy of a hard-routed model, see docs/evaluation.md) and MACs per image.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import advmoe
from advmoe.checkpoint import read_metrics
from advmoe.stats import mean_std
from training.config import TrainConfig, resolve
from training.methods import METHODS

from .evaluations import write
from .run import train_unless_finished


@dataclass(frozen=True)
class Contender:
    """One method of the comparison: a training.methods entry on the preset's MoE model, or on its
    dense twin, with extra settings; its runs go to RUNS/<prefix>-seed<seed>."""
    method: str
    prefix: str
    dense: bool = False
    extra: dict = field(default_factory=dict)
    variant: str = ""  # what sets it apart from another contender of the same method

    @property
    def label(self) -> str:
        name = ("dense " if self.dense else "") + METHODS[self.method].label
        return f"{name}, {self.variant}" if self.variant else name


CONTENDERS = (
    Contender("pgd-at", "pgd-at", dense=True),
    Contender("moe-at", "moe-at"),
    Contender("advmoe", "advmoe", extra={"router_loss": "reference"}),
    Contender("advmoe", "advmoe-model", extra={"router_loss": "model"}, variant="router loss model"),
)


def run_result(out: Path, seed: int) -> dict:
    """The numbers of a finished run: its best checkpoint's test metrics and mean epoch time."""
    metrics = read_metrics(out / "best")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "clean": metrics["test_clean_accuracy"], "pgd": metrics["test_pgd_accuracy"],
            "macs": metrics["macs_per_image"], "epoch_seconds": statistics.mean(r["epoch_seconds"] for r in history),
            "expert_share": metrics.get("test_expert_share")}


def run_all(preset: str, seeds: list[int], runs: Path, overrides: dict, log=print) -> dict[str, list[dict]]:
    """{contender label: one result per seed}, training the runs that are not finished."""
    results = {}
    base = resolve(preset, **overrides)
    for c in CONTENDERS:
        model = advmoe.dense_twin(base.model) if c.dense else base.model
        results[c.label] = []
        for seed in seeds:
            cfg = resolve(preset, **{**overrides, **c.extra, "method": c.method, "model": model, "seed": seed})
            out = runs / f"{c.prefix}-seed{seed}"
            train_unless_finished(cfg, out, f"{c.label}, seed {seed}", log)
            results[c.label].append(run_result(out, seed))
    return results


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| method | model | seeds | test clean accuracy | test PGD accuracy | MACs per image | s per epoch |",
             "|---|---|---|---|---|---|---|"]
    for c in CONTENDERS:
        rows = results[c.label]
        clean, pgd = mean_std([r["clean"] for r in rows]), mean_std([r["pgd"] for r in rows])
        lines.append(f"| {c.label} | {'dense twin' if c.dense else 'MoE'} | {len(rows)} "
                     f"| {100 * clean[0]:.1f} ± {100 * clean[1]:.1f} % | {100 * pgd[0]:.1f} ± {100 * pgd[1]:.1f} % "
                     f"| {rows[0]['macs'] / 1e6:.2f} M | {statistics.mean(r['epoch_seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


def compare(results: dict[str, list[dict]], first: str, second: str) -> dict[str, float]:
    """Test PGD accuracy of `first` against `second`, in points: both means, their difference and
    the larger of their standard deviations over seeds (the spread a difference should exceed)."""
    (a, sa), (b, sb) = (mean_std([r["pgd"] for r in results[k]]) for k in (first, second))
    return {"first": 100 * a, "second": 100 * b, "difference": 100 * (a - b), "spread": 100 * max(sa, sb)}


def verdict(results: dict[str, list[dict]], first: str = "AdvMoE", second: str = "MoE-AT") -> str:
    c = compare(results, first, second)
    word = "beats" if c["difference"] > 0 else "does not beat"
    where = "outside" if abs(c["difference"]) > c["spread"] else "within"
    return (f"{first} vs {second}, test PGD accuracy: {c['difference']:+.1f} points ({c['first']:.1f} vs "
            f"{c['second']:.1f} %), spread {c['spread']:.1f}: {word}, {where} the spread.")


def render(results: dict[str, list[dict]], cfg: TrainConfig, command: str, seeds: list[int]) -> str:
    per_run = [f"- {label}: " + ", ".join(f"{r['seed']}: {100 * r['clean']:.1f} / {100 * r['pgd']:.1f}" for r in rows)
               for label, rows in results.items()]
    dense, moe_at, advmoe_label, variant = (c.label for c in CONTENDERS)
    return f"""# {dense} vs {moe_at} vs {advmoe_label} on {cfg.dataset}

Produced by `{command}` (studies/methods.py). Equal budget for every method: {cfg.epochs} epochs of
{cfg.train_examples or 'all'} training images, batch {cfg.batch_size}, PGD-{cfg.attack_steps} at ε = {cfg.eps:g}
(step {cfg.attack_step:g}) for training; {cfg.model} at width {cfg.width} (dense twin for PGD-AT); best epoch
chosen on {cfg.val_examples} validation images; test accuracy on the first 2,000 test images. PGD is
PGD-{cfg.eval_steps} (step {cfg.eval_step:g}) through the straight-through router: an upper bound on the
robust accuracy of a hard-routed model, not the robust accuracy itself (AutoAttack: `python -m studies.robustness`).
Mean ± standard deviation over seeds {', '.join(map(str, seeds))}.

{table(results)}

- {verdict(results, advmoe_label, moe_at)}
- {verdict(results, advmoe_label, variant)} ({advmoe_label} uses the reference router loss, the default.)

Per run (seed: test clean / test PGD):
{chr(10).join(per_run)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe study methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fmnist-tiny")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override the preset's epochs (same for every method)")
    parser.add_argument("--train-examples", type=int, help="override the preset's training subset")
    parser.add_argument("--runs", default="runs/report", help="where the runs go")
    parser.add_argument("--out", default="reports/fmnist_methods.md")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_examples", args.train_examples)) if v is not None}
    results = run_all(args.preset, args.seeds, Path(args.runs), overrides)
    command = " ".join(["python -m studies.methods", *(argv if argv is not None else sys.argv[1:])])
    write(Path(args.out), results, render(results, resolve(args.preset, **overrides), command, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
