"""What the attacks find under each straight-through gradient of the gate.

    python -m studies.gate_grad RUN/best --examples 500
    python -m studies.gate_grad RUN/best --reuse softmax=RUN/eval-main/eval.json   # an evaluation already run

The gate's forward pass is a hard choice of expert; its backward pass is a surrogate, either
through the softmax to every expert's logit (`softmax`, ours) or to the chosen expert's logit
only (`chosen`, the reference code's), or none at all (`none`: each input's route is a constant
to the attack, which then follows the experts' gradient along it). The model, and so its verdict
on any image, is the same under each; only the gradients that white-box attacks follow differ.
This evaluates one checkpoint with PGD-10/50 and APGD-CE + APGD-T under each gradient (--grads)
on the same first test images and reports the accuracy under each, and per image under all of
them (an image counts only if it survives the attacks of every evaluation). Evaluations are kept
under --runs and reused when they are of the same weights, images and settings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from advmoe.checkpoint import CheckpointError, read_config
from advmoe.gate import GATE_GRADS
from advmoe.settings import ConfigError
from evaluation.cache import evaluated_with
from evaluation.robustness import EvalSettings

from . import evaluations

ATTACKS = ("pgd", "apgd")
RUNS = Path("runs/gate_grad")
REPORT = Path("reports/gate_grad.md")


def own_gate_grad(checkpoint: Path) -> str:
    return read_config(checkpoint)["model_args"].get("gate_grad", "softmax")


def matches(doc: dict, checkpoint: Path, n: int, grad: str, settings: dict) -> bool:
    """Whether an eval.json is of these weights, at least n images, this gradient and these settings."""
    used = doc["settings"].get("gate_grad") or own_gate_grad(checkpoint)
    return used == grad and evaluated_with(doc, checkpoint, n, settings, at_least=True)


def reused(checkpoint: Path, n: int, grad: str, settings: dict, path: Path, log=print) -> dict:
    """The eval.json given with --reuse, refused unless it can stand in for this evaluation."""
    return evaluations.reused(path, grad, lambda doc: matches(doc, checkpoint, n, grad, settings),
                              f"an evaluation of {checkpoint} on at least {n} images with the {grad} gradient and "
                              f"the settings {settings}", log)


def evaluation(checkpoint: Path, n: int, grad: str, settings: dict, runs: Path, data_dir: str | None = None,
               log=print) -> dict:
    """The eval.json of `grad` kept under `runs` when it matches, or a new one."""
    return evaluations.kept_or_run(checkpoint, runs / grad, lambda doc: matches(doc, checkpoint, n, grad, settings),
                                   n, settings, data_dir, log, gate_grad=grad)


def compare(docs: dict[str, dict], n: int) -> dict:
    """Accuracy per attack under each gradient and under all of them, on the first n images."""
    per = {g: {k: v[:n] for k, v in d["per_example"].items()} for g, d in docs.items()}
    labels = {tuple(p["label"]) for p in per.values()}
    if len(labels) != 1:
        raise ValueError("the evaluations are not of the same images")
    first = next(iter(per.values()))
    if any(p["clean"] != first["clean"] for p in per.values()):
        raise ValueError("the evaluations disagree on clean images: not the same model")
    # the attacks all ran; "robust" is each evaluation's own worst case, over whatever else it ran
    keys = [k for k in first if k not in ("label", "robust") and all(k in p for p in per.values())]
    for p in per.values():  # the worst case over the attacks all ran, per image
        p["worst"] = "".join(str(int(all(p[k][i] == "1" for k in keys))) for i in range(n))
    keys += ["worst", "robust"]
    accuracy = {k: {g: p[k].count("1") / n for g, p in per.items()} for k in keys}
    for k in keys:  # an image counts under all only if it survives the attack under each gradient
        accuracy[k]["all"] = sum(all(p[k][i] == "1" for p in per.values()) for i in range(n)) / n
    return {"examples": n, "accuracy": accuracy,
            "sanity_failed": {g: d["sanity"]["failed"] for g, d in docs.items()},
            "seconds": {g: d["seconds"] for g, d in docs.items()}}


NAMES = {"clean": "clean", "pgd-10": "PGD-10", "pgd-50": "PGD-50", "apgd": "APGD-CE + APGD-T",
         "worst": "worst case of these", "robust": "each evaluation's worst case, over every attack it ran"}


def report(result: dict, checkpoint: Path, command: str) -> str:
    n, acc = result["examples"], result["accuracy"]
    grads = [g for g in next(iter(acc.values())) if g != "all"]
    lines = [
        "# Which straight-through gradient the attacks follow", "",
        f"Produced by `{command}` (studies/gate_grad.py) on `{checkpoint}`, the first {n} test images.",
        "The forward pass is the same under every gradient, so is every clean verdict; `softmax` sends the "
        "gate's gradient through the softmax to every expert's logit (ours), `chosen` to the chosen expert's "
        "logit only (the reference code's), `none` nowhere (the route is a constant to the attack). *All*: an "
        "image counts only if it survives the attack under each gradient.",
        "", "| attack | " + " | ".join(f"`{g}`" for g in grads) + " | all |", "|---" * (len(grads) + 2) + "|"]
    for key, name in NAMES.items():
        if key in acc:
            lines.append(f"| {name} | " + " | ".join(f"{100 * acc[key][g]:.1f}" for g in grads)
                         + f" | {100 * acc[key]['all']:.1f} |")
    lines.append("")
    weaker = max(grads, key=lambda g: acc["worst"][g])
    stronger = min(grads, key=lambda g: acc["worst"][g])
    lines.append(f"- The same attacks leave {100 * (acc['worst'][weaker] - acc['worst'][stronger]):.1f} points more "
                 f"images standing when they follow `{weaker}` than when they follow `{stronger}`. Images that only "
                 f"the other gradients' attacks fool: {100 * (acc['worst'][stronger] - acc['worst']['all']):.1f} points "
                 f"of these attacks' worst case, {100 * (acc['robust'][stronger] - acc['robust']['all']):.1f} points of "
                 f"the `{stronger}` evaluation's whole worst case.")
    for g, failed in result["sanity_failed"].items():
        if failed:
            lines.append(f"- `{g}` evaluation: sanity checks failed: {', '.join(failed)}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe study gate-grad", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="an MoE checkpoint directory")
    parser.add_argument("--examples", type=int, default=500, help="first test images (default: 500)")
    parser.add_argument("--reuse", action="append", default=[], metavar="GRAD=EVAL_JSON",
                        help="an eval.json already run with that gradient (default settings, at least --examples images)")
    parser.add_argument("--grads", nargs="+", choices=list(GATE_GRADS), default=list(GATE_GRADS),
                        help=f"the gradients to compare, two or more (default: {' '.join(GATE_GRADS)})")
    evaluations.add_arguments(parser, RUNS, REPORT, EvalSettings().pgd_steps)
    args = parser.parse_args(argv)
    if len(set(args.grads)) < 2:
        parser.error("--grads: name two gradients or more, to compare")
    reuse = evaluations.reuse_paths(parser, args.reuse, args.grads, "GRAD")
    try:
        if read_config(args.checkpoint)["model_args"].get("num_experts", 0) < 1:
            parser.exit(2, f"{parser.prog}: error: {args.checkpoint} is a dense model: it has no gate\n")
    except CheckpointError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.examples < 1:
        parser.error(f"--examples must be at least 1, got {args.examples}")
    settings = evaluations.settings(args, ATTACKS)
    try:
        # every --reuse is checked before anything runs: a bad one must not cost an evaluation first
        given = {g: reused(args.checkpoint, args.examples, g, settings, path) for g, path in reuse.items()}
        docs = {g: given[g] if g in given else
                evaluation(args.checkpoint, args.examples, g, settings, args.runs, args.data_dir)
                for g in dict.fromkeys(args.grads)}
        result = compare(docs, args.examples)
    except (ValueError, ConfigError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    command = "python -m studies.gate_grad " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(result, args.checkpoint, command)
    evaluations.write(args.report, result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
