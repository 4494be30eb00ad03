"""Where robust accuracy is lost, class by class: checkpoints side by side on the same test images.

    python -m studies.per_class checkpoints/fmnist-moe RUN/best --examples 1000
    python -m studies.per_class A B --reuse A=A/eval-main/eval.json    # an evaluation already run

Each checkpoint is evaluated on the same first test images (PGD-10 and APGD-CE + APGD-T by
default, `advmoe eval`'s settings otherwise) and the report gives, for every class, each
checkpoint's clean and worst-case accuracy, what each class adds to the difference between the
first checkpoint and the second, and, for a MoE model, the share of the class's clean test images
each expert takes. A router that ties classes to experts (the reference router loss trains it on
y mod N) shows as shares near 0 and 100 %, and the classes that carry the difference then say which
expert carries it. Evaluations are kept under --runs and reused when they are of the same
weights, images and settings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import advmoe
from advmoe.checkpoint import CheckpointError, read_config
from advmoe.settings import ConfigError
from evaluation.cache import evaluated_with

from . import evaluations

ATTACKS = ("pgd", "apgd")
RUNS = Path("runs/per_class")
REPORT = Path("reports/per_class.md")


def matches(checkpoint: Path, n: int, settings: dict):
    return lambda doc: evaluated_with(doc, checkpoint, n, settings, at_least=True)


def expert_shares(checkpoint: Path, config: dict, n: int, data_dir: str | None = None) -> list[list[float]] | None:
    """For each class, the share of its clean images among the first n test images each expert
    takes (averaged over the MoE layers: one route with a shared router); None for a dense model.
    `config`: the checkpoint's config.json, as read_config gives it."""
    if not advmoe.is_moe_model(config["architecture"]):
        return None
    model = advmoe.load_checkpoint(checkpoint)
    data = advmoe.load_dataset(config["dataset"], "test", data_dir)
    labels, routes = [], []
    with torch.no_grad():
        for x, y in DataLoader(Subset(data, range(min(n, len(data)))), batch_size=256):
            model(x)
            labels.append(y)
            routes.append(model.last_routing.reshape(len(y), -1))
    y, routing = torch.cat(labels), torch.cat(routes)
    experts = model.cfg.num_experts
    return [[(routing[y == c] == e).float().mean().item() if (y == c).any() else float("nan")
             for e in range(experts)] for c in range(model.cfg.num_classes)]


def per_class(doc: dict, n: int, classes: int) -> dict:
    """Clean and worst-case ("robust": over every attack the evaluation ran) accuracy per class."""
    per = doc["per_example"]
    label = per["label"][:n]
    out = {}
    for key in ("clean", "robust"):
        hits = [0] * classes
        for i, c in enumerate(label):
            hits[c] += per[key][i] == "1"
        out[key] = hits
    out["count"] = [label.count(c) for c in range(classes)]
    return out


def compare(docs: dict[str, dict], shares: dict[str, list | None], n: int, classes: list[str]) -> dict:
    labels = {tuple(d["per_example"]["label"][:n]) for d in docs.values()}
    if len(labels) != 1:
        raise ValueError("the evaluations are not of the same images")
    table = {name: per_class(d, n, len(classes)) for name, d in docs.items()}
    return {"examples": n, "classes": classes, "per_class": table, "expert_shares": shares,
            "accuracy": {name: {k: sum(t[k]) / n for k in ("clean", "robust")} for name, t in table.items()}}


def report(result: dict, checkpoints: dict[str, Path], command: str) -> str:
    n, classes, table = result["examples"], result["classes"], result["per_class"]
    names = list(table)
    first, second = names[0], names[1]

    def pct(hits: int, count: int) -> str:
        return f"{100 * hits / count:.1f}" if count else "-"

    moe = [name for name in names if result["expert_shares"][name] is not None]
    lines = ["# Where robust accuracy is lost, class by class", "",
             f"Produced by `{command}` (studies/per_class.py), the first {n} test images. Worst case: an image "
             "counts only if it survives every attack its evaluation ran. *Adds*: what the class adds to the "
             f"difference in worst-case accuracy, {first} minus {second}, in points of the whole test set "
             "(the column sums to that difference).", ""]
    lines += [f"- `{name}`: `{checkpoints[name]}`, clean {100 * result['accuracy'][name]['clean']:.1f} %, "
              f"worst case {100 * result['accuracy'][name]['robust']:.1f} %" for name in names]
    head = ["class", "images"] + [f"{name} {k}" for name in names for k in ("clean", "worst")] + ["adds (worst)"]
    head += [f"{name}: expert {e}" for name in moe for e in range(len(result["expert_shares"][name][0]))]
    lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    adds = []
    for c, label in enumerate(classes):
        count = table[first]["count"][c]
        add = 100 * (table[first]["robust"][c] - table[second]["robust"][c]) / n
        adds.append((add, label))
        cells = [label, str(count)] + [pct(table[name][k][c], count) for name in names for k in ("clean", "robust")]
        cells.append(f"{add:+.1f}")
        cells += [f"{100 * s:.0f} %" for name in moe for s in result["expert_shares"][name][c]]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(a for a, _ in adds)
    worst = [(add, label) for add, label in sorted(adds, reverse=total > 0) if round(add, 1) and (add < 0) == (total < 0)][:3]
    lines += ["", f"- {first} minus {second}, worst case: {total:+.1f} points" + (
        "; the classes that add most to it: " + ", ".join(f"{label} ({add:+.1f})" for add, label in worst) if worst else "")
              + "."]
    for name in moe:
        shares = result["expert_shares"][name]
        by_expert = {e: [label for label, s in zip(classes, shares) if max(s) >= 0.9 and s.index(max(s)) == e]
                     for e in range(len(shares[0]))}
        tied = "; ".join(f"expert {e}: {', '.join(labels)}" for e, labels in by_expert.items() if labels)
        lines.append(f"- {name}: {sum(map(len, by_expert.values()))} of {len(classes)} classes send at least 90 % of "
                     f"their clean images to one expert{': ' + tied if tied else ''}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe study per-class", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs=2, metavar="CHECKPOINT",
                        help="two checkpoint directories of the same dataset; the report gives the first minus the second")
    parser.add_argument("--names", nargs=2, help="what the report calls them (default: their folder names)")
    parser.add_argument("--examples", type=int, default=1000, help="first test images (default: 1000)")
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME=EVAL_JSON",
                        help="an eval.json already run on that checkpoint (at least --examples images and these attacks)")
    evaluations.add_arguments(parser, RUNS, REPORT, pgd_steps=(10,))
    args = parser.parse_args(argv)
    names = args.names or [p.name if p.name != "best" else p.parent.name for p in args.checkpoints]
    if len(set(names)) != 2:
        parser.error(f"both checkpoints are called {names[0]!r}: pass --names")
    checkpoints = dict(zip(names, args.checkpoints))
    reuse = evaluations.reuse_paths(parser, args.reuse, names)
    if args.examples < 1:
        parser.error(f"--examples must be at least 1, got {args.examples}")
    try:
        configs = {name: read_config(path) for name, path in checkpoints.items()}
    except CheckpointError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    datasets = {c.get("dataset") for c in configs.values()}
    if len(datasets) != 1 or None in datasets:
        parser.exit(2, f"{parser.prog}: error: the checkpoints must name the same dataset in their "
                       f"config.json (got {', '.join(map(str, (c.get('dataset') for c in configs.values())))})\n")
    settings = evaluations.settings(args, ATTACKS)
    n = args.examples
    try:
        # every --reuse is checked before anything runs: a bad one must not cost an evaluation first
        given = {name: evaluations.reused(path, name, matches(checkpoints[name], n, settings),
                                          f"an evaluation of {checkpoints[name]} on at least {n} test images with "
                                          f"the settings {settings}") for name, path in reuse.items()}
        docs = {name: given[name] if name in given else
                evaluations.kept_or_run(path, args.runs / name, matches(path, n, settings), n, settings, args.data_dir)
                for name, path in checkpoints.items()}
        shares = {name: expert_shares(path, configs[name], n, args.data_dir) for name, path in checkpoints.items()}
        classes = list(advmoe.get_dataset_info(datasets.pop()).classes)
        result = compare(docs, shares, args.examples, classes)
    except (ValueError, ConfigError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    command = "python -m studies.per_class " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(result, checkpoints, command)
    evaluations.write(args.report, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
