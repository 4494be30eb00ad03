"""Dense PGD-AT vs MoE-AT vs AdvMoE (both router losses) at equal budget, over seeds: reports/.

    python -m training.report --preset fmnist-tiny --seeds 0 1 2 --out reports/fmnist_methods.md

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
from pathlib import Path

import advmoe
from advmoe.checkpoint import read_metrics
from advmoe.io import atomic_write_text
from advmoe.stats import mean_std

from .config import resolve, with_defaults
from .trainer import train

# (label, method, dense twin?, extra settings, run directory prefix)
CONTENDERS = (
    ("dense PGD-AT", "pgd-at", True, {}, "pgd-at"),
    ("MoE-AT", "moe-at", False, {}, "moe-at"),
    ("AdvMoE", "advmoe", False, {"router_loss": "reference"}, "advmoe"),
    ("AdvMoE, router loss model", "advmoe", False, {"router_loss": "model"}, "advmoe-model"),
)


def run_all(preset: str, seeds: list[int], runs: Path, overrides: dict, log=print) -> dict[str, list[dict]]:
    results = {}
    for label, method, dense, extra, prefix in CONTENDERS:
        base = resolve(preset, **overrides)
        model = advmoe.dense_twin(base.model) if dense else base.model
        results[label] = []
        for seed in seeds:
            cfg = resolve(preset, **{**overrides, **extra, "method": method, "model": model, "seed": seed})
            out = runs / f"{prefix}-seed{seed}"
            if (out / "config.json").is_file() and with_defaults(json.loads((out / "config.json").read_text())) != cfg.to_dict():
                raise ValueError(f"{out} holds a run of another config; remove it or choose another --runs")
            if not (out / "best" / "metrics.json").is_file() or "test_pgd_accuracy" not in read_metrics(out / "best"):
                log(f"training {label}, seed {seed} -> {out}")
                train(cfg, out, resume=(out / "config.json").is_file(), log=lambda *a: None)
            metrics = read_metrics(out / "best")
            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            results[label].append({"seed": seed, "clean": metrics["test_clean_accuracy"], "pgd": metrics["test_pgd_accuracy"],
                                   "macs": metrics["macs_per_image"], "epoch_seconds": statistics.mean(r["epoch_seconds"] for r in history),
                                   "expert_share": metrics.get("test_expert_share")})
    return results


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| method | model | seeds | test clean accuracy | test PGD accuracy | MACs per image | s per epoch |",
             "|---|---|---|---|---|---|---|"]
    for label, _, dense, _, _ in CONTENDERS:
        rows = results[label]
        clean, pgd = mean_std([r["clean"] for r in rows]), mean_std([r["pgd"] for r in rows])
        lines.append(f"| {label} | {'dense twin' if dense else 'MoE'} | {len(rows)} | {100 * clean[0]:.1f} ± {100 * clean[1]:.1f} % "
                     f"| {100 * pgd[0]:.1f} ± {100 * pgd[1]:.1f} % | {rows[0]['macs'] / 1e6:.2f} M "
                     f"| {statistics.mean(r['epoch_seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


def verdict(results: dict[str, list[dict]], first: str = "AdvMoE", second: str = "MoE-AT") -> str:
    (a, sa), (m, sm) = (mean_std([r["pgd"] for r in results[k]]) for k in (first, second))
    diff = 100 * (a - m)
    spread = 100 * max(sa, sm)
    word = "beats" if diff > 0 else "does not beat"
    exceeds = "exceeds" if abs(diff) > spread else "does not exceed"
    return (f"{first} {word} {second} on test PGD accuracy here: {diff:+.1f} points ({100 * a:.1f} % vs {100 * m:.1f} %); "
            f"the difference {exceeds} the larger standard deviation over seeds ({spread:.1f} points).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fmnist-tiny")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override the preset's epochs (same for every method)")
    parser.add_argument("--train-examples", type=int, help="override the preset's training subset")
    parser.add_argument("--runs", default="runs/report", help="where the runs go")
    parser.add_argument("--out", default="reports/fmnist_methods.md")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_examples", args.train_examples)) if v is not None}
    results = run_all(args.preset, args.seeds, Path(args.runs), overrides)
    cfg = resolve(args.preset, **overrides)
    command = "python -m training.report " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"""# Dense PGD-AT vs MoE-AT vs AdvMoE on {cfg.dataset}

Produced by `{command.strip()}` (training/report.py). Equal budget for every method: {cfg.epochs} epochs of
{cfg.train_examples or 'all'} training images, batch {cfg.batch_size}, PGD-{cfg.attack_steps} at ε = {cfg.eps:g}
(step {cfg.attack_step:g}) for training; {cfg.model} at width {cfg.width} (dense twin for PGD-AT); best epoch
chosen on {cfg.val_examples} validation images; test accuracy on the first 2,000 test images. PGD is
PGD-{cfg.eval_steps} (step {cfg.eval_step:g}) through the straight-through router: an upper bound on the
robust accuracy of a hard-routed model, not the robust accuracy itself (AutoAttack: issue 5).
Mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}.

{table(results)}

{verdict(results)}

{verdict(results, "AdvMoE", "AdvMoE, router loss model")} (AdvMoE above uses the reference
router loss, the default.)

Per run (seed: test clean / test PGD):
{chr(10).join(f"- {label}: " + ", ".join(f"{r['seed']}: {100 * r['clean']:.1f} / {100 * r['pgd']:.1f}" for r in rows) for label, rows in results.items())}
"""
    atomic_write_text(args.out, text)
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
