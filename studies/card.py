"""A model card's robustness figures from the whole test set, as RobustBench reports them: clean
accuracy, worst case and route flips over every test image under the frontier study's main
attacks, and AutoAttack (standard) on N test images drawn at random with a fixed seed. Figures from
the first images of a test set can mislead: on other slices of 200 and 300 images the shipped
model measured 5 to 6 points under its first 1,000's.

    advmoe study card checkpoints/fmnist-moe --plan              # the parts and what is done
    nice advmoe study card checkpoints/fmnist-moe --eval-processes 2   # evaluate, then write the card

Each evaluation runs in parts of --part images, each part's eval.json kept (under --runs, by the
weights' digest) and reused, so a cut-off call resumes from the parts it finished. The parts are
merged image by image; the card (metrics.json and card.json) is written once all are in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import advmoe
from advmoe.checkpoint import WEIGHTS, is_checkpoint, read_config, update_metrics
from evaluation.cache import evaluated_with, file_sha256, kept_evaluation
from training.config import resolve
from training.validate import pgd_description

from . import evaluations
from .design import Plan
from .run import attack_settings, main_attacks

PART = 1000


def parts(total: int, part: int) -> list[tuple[int, int]]:
    """(start, count) of each part of `total` images."""
    return [(start, min(part, total - start)) for start in range(0, total, part)]


def _kept(checkpoint: Path, count: int, settings: dict, draw_seed: int | None, start: int):
    return lambda doc: evaluated_with(doc, checkpoint, count, settings, draw_seed=draw_seed, start=start)


def evaluation(checkpoint: Path, folder: Path, total: int, settings: dict, draw_seed: int | None, part: int,
               processes: int, data_dir: str | None = None, log=print) -> list[dict]:
    """Every part of one evaluation, kept or run, in order."""
    return [evaluations.kept_or_run(checkpoint, folder / f"{start:06d}",
                                    _kept(checkpoint, count, settings, draw_seed, start), count, settings,
                                    data_dir, log=log, processes=processes, draw_seed=draw_seed, start=start)
            for start, count in parts(total, part)]


def merged(docs: list[dict]) -> dict:
    """The parts as one: per-image accuracies pooled, the route flip rate weighted by images."""
    bits = {name: "".join(d["per_example"][name] for d in docs) for name in docs[0]["per_example"] if name != "label"}
    n = sum(d["examples"] for d in docs)
    routers = [d["attacks"]["router"] for d in docs if "router" in d["attacks"]]
    return {"examples": n, "accuracy": {name: b.count("1") / len(b) for name, b in bits.items()},
            "route_flip_rate": (sum(r["route_flip_rate"] * d["examples"] for r, d in zip(routers, docs)) / n
                                if routers else None),
            "eps": docs[0]["eps"], "norm": docs[0]["norm"], "settings": docs[0]["settings"]}  # alike in every part


def pgd_values(main: dict) -> dict:
    """The card's PGD figure, its shortest PGD over every test image, described as training describes
    its own, so the card's `pgd_accuracy` is not left from training's smaller test evaluation."""
    settings = main["settings"]
    steps = min(settings["pgd_steps"]) if "pgd" in settings["attacks"] else None
    if steps is None or f"pgd-{steps}" not in main["accuracy"]:
        return {}
    eps = main["eps"]
    return {"pgd_accuracy": main["accuracy"][f"pgd-{steps}"],
            "pgd": pgd_description(steps, eps, settings["step"] * eps, main["norm"])}


def card_values(main: dict, autoattack: dict, draw_seed: int) -> dict:
    """What metrics.json gets: the whole test set's figures and AutoAttack's on the drawn images."""
    return {"clean_accuracy": main["accuracy"]["clean"], "robust_accuracy": main["accuracy"]["robust"],
            "robust_examples": main["examples"], "robust_attacks": sorted(set(main["accuracy"]) - {"clean", "robust"}),
            "route_flip_rate": main["route_flip_rate"], "route_flip_attack": "router attack",
            "autoattack_accuracy": autoattack["accuracy"]["robust"], "autoattack_examples": autoattack["examples"],
            "autoattack_images": f"drawn at random from the test set with seed {draw_seed}"} | pgd_values(main)


def jobs(checkpoint: Path, examples: int | None, autoattack_examples: int, draw_seed: int, data_dir: str | None,
         attack_settings_override: dict | None = None) -> list[tuple[str, int, dict, int | None]]:
    """(name, images, settings, draw seed) of the two evaluations, with the frontier study's settings."""
    config = read_config(checkpoint)
    training = {k: v for k, v in (config.get("training") or {}).items() if k != "data_dir"}
    cfg = resolve(None, **{**training, "dataset": config.get("dataset") or training.get("dataset"),
                           "model": config["architecture"], "gate_grad": config["model_args"].get("gate_grad", "softmax")})
    test_size = len(advmoe.load_dataset(cfg.dataset, "test", data_dir))
    plan = Plan(attack_settings=attack_settings_override or {})
    return [("main", min(examples or test_size, test_size), {"attacks": main_attacks(cfg), **attack_settings(plan, cfg)}, None),
            ("autoattack", min(autoattack_examples, test_size), {"attacks": ("autoattack",), **attack_settings(plan, cfg)},
             draw_seed)]


def card(checkpoint: Path, runs: Path, examples: int | None = None, autoattack_examples: int = 2000, draw_seed: int = 0,
         part: int = PART, processes: int = 1, data_dir: str | None = None, attack_settings_override: dict | None = None,
         log=print) -> dict:
    """Run (or reuse) both evaluations part by part, then write their figures into the checkpoint's card."""
    folder = runs / file_sha256(checkpoint / WEIGHTS)[:12]
    found = {name: merged(evaluation(checkpoint, folder / name, n, settings, seed, part, processes, data_dir, log))
             for name, n, settings, seed in jobs(checkpoint, examples, autoattack_examples, draw_seed, data_dir,
                                                 attack_settings_override)}
    values = card_values(found["main"], found["autoattack"], draw_seed)
    update_metrics(checkpoint, **values)
    log(f"{checkpoint}: clean {100 * values['clean_accuracy']:.1f} %, worst case {100 * values['robust_accuracy']:.1f} % "
        f"on {values['robust_examples']} test images; AutoAttack {100 * values['autoattack_accuracy']:.1f} % on "
        f"{values['autoattack_examples']}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advmoe study card", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="the model whose card gets the figures (e.g. checkpoints/fmnist-moe)")
    p.add_argument("--plan", action="store_true", help="print the parts and which are done; evaluate nothing")
    p.add_argument("--runs", type=Path, default=Path("runs/card"), help="where the parts' evaluations go")
    p.add_argument("--data-dir", help="where the test set is (default: the dataset's usual place)")
    p.add_argument("--examples", type=int, help="test images of the main evaluation (default: all)")
    p.add_argument("--autoattack-examples", type=int, default=2000)
    p.add_argument("--draw-seed", type=int, default=0, help="seed of AutoAttack's random images")
    p.add_argument("--part", type=int, default=PART, help="images per part (each kept on its own)")
    p.add_argument("--eval-processes", type=int, default=1, metavar="P")
    p.add_argument("--threads", type=int, help="torch CPU threads, split between the processes")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not is_checkpoint(args.checkpoint):
        parser.error(f"{args.checkpoint}: no checkpoint there")
    if min(args.autoattack_examples, args.part, args.eval_processes, args.examples or 1) < 1:
        parser.error("--examples, --autoattack-examples, --part and --eval-processes must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan:
        folder = args.runs / file_sha256(args.checkpoint / WEIGHTS)[:12]
        for name, n, settings, seed in jobs(args.checkpoint, args.examples, args.autoattack_examples, args.draw_seed,
                                            args.data_dir):
            for start, count in parts(n, args.part):
                done = kept_evaluation(folder / name / f"{start:06d}" / "eval.json",
                                       _kept(args.checkpoint, count, settings, seed, start)) is not None
                print(f"{name} images {start}-{start + count - 1}: {'done' if done else 'to do'}")
        return 0
    card(args.checkpoint, args.runs, args.examples, args.autoattack_examples, args.draw_seed, args.part,
         args.eval_processes, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
