"""Shipping the study's answer: the best MoE run, copied to a checkpoint folder with its study
numbers in metrics.json, so the model card and /model_info report them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import advmoe
from advmoe.checkpoint import WEIGHTS, is_checkpoint, update_metrics
from advmoe.io import atomic_directory
from evaluation.cache import file_sha256
from training.config import resolve
from training.trainer import COLLAPSE_SHARE

from .curves import dense_at
from .design import Plan, macs_per_image
from .record import RunResult, best_row, load_results, router_collapsed
from .run import evaluate, main_attacks

SHIP_MAX_MACS = 0.40  # of the dense twin's: the shipped model must be really sparse


def candidates(grouped: dict[str, list[RunResult]], log=print) -> dict[str, list[RunResult]]:
    """The MoE rows that may ship: at most SHIP_MAX_MACS of their dense twin's MACs, and a router that
    has not collapsed (one that sends nearly every image to one expert makes a dense model of the
    expert's width, carrying dead experts)."""
    found = {}
    for key, runs in grouped.items():
        row = runs[0].row
        if not row.is_moe:
            continue
        twin = macs_per_image(advmoe.dense_twin(row.model), row.width, resolve(None, **runs[0].config))
        busiest = router_collapsed(runs)
        if busiest is not None:
            log(f"not shipping {key}: its busiest expert takes {busiest:.0%} of the clean test routes (collapsed)")
        elif runs[0].macs_per_image <= SHIP_MAX_MACS * twin:
            found[key] = runs
    return found


def evaluated_weights(result: RunResult, best: Path, key: str) -> str:
    """The digest of the weights the study's numbers are of, after checking that `best` still holds
    them: the numbers go with the weights they were measured on, or not at all (a run trained again
    after its evaluation, say). A result recorded before digests were finds it in its evaluation."""
    measured = result.checkpoint_sha256
    if measured is None:
        evaluation = best.parent / "eval-main" / "eval.json"
        if not evaluation.is_file():
            raise ValueError(f"{evaluation} is gone, and with it the digest of the weights the study evaluated; "
                             f"run `advmoe study frontier --rows {key}` again to evaluate them")
        measured = json.loads(evaluation.read_text())["checkpoint_sha256"]
    if file_sha256(best / WEIGHTS) != measured:
        raise ValueError(f"{best} is not the checkpoint the study evaluated (its weights changed since); "
                         f"run `advmoe study frontier --rows {key}` again to evaluate them")
    return measured


def card_values(result: RunResult, digest: str, validation: dict[str, dict], dense: float | None = None) -> dict:
    """What the shipped model's metrics.json gets from the study; `dense`: the dense worst case at its MACs."""
    chosen = validation[result.name]
    values = {"clean_accuracy": result.accuracy["clean"], "robust_accuracy": result.worst_case,
              "robust_examples": result.examples,  # "robust" is the worst case over the others, not an attack
              "robust_attacks": sorted(k for k in result.accuracy if k not in ("clean", "robust")),
              "route_flip_rate": result.route_flip_rate, "route_flip_attack": "router attack",
              "study_run": result.name, "study_checkpoint_sha256": digest,
              "selected_on": "validation worst case", "validation_robust_accuracy": chosen["robust_accuracy"],
              "validation_examples": chosen["examples"],
              "validation_robust_accuracy_by_run": {run: v["robust_accuracy"] for run, v in validation.items()},
              "dense_robust_accuracy": dense}
    if result.autoattack:
        values |= {"autoattack_accuracy": result.autoattack["accuracy"], "autoattack_examples": result.autoattack["examples"]}
    return values


def ship(results: Path, runs: Path, dest: Path, log=print, plan: Plan | None = None) -> dict:
    """Copy the best MoE run of the study to `dest` as the model to serve.

    The row is the shippable MoE row (`candidates`) with the best mean worst case (`best_row`).
    Within it, of the runs whose checkpoint is still in `runs`, the one with the best *validation
    worst case*: the study's main attacks on the first plan.select_examples images its training
    held out. Choosing a seed by its test results would be selecting on the test set; choosing it
    by validation PGD alone favours the seed whose hard routes mislead PGD most."""
    plan = plan or Plan()
    grouped = load_results(results)
    if not grouped:
        raise ValueError(f"no study results in {results}: run `advmoe study frontier` first")
    shippable = candidates(grouped, log)
    if not shippable:
        raise ValueError(f"no finished MoE run in {results} both costs at most {SHIP_MAX_MACS:.2f}x its dense twin's "
                         f"MACs and keeps its experts in use (busiest expert at most {COLLAPSE_SHARE:.0%} of the routes)")
    key = best_row(shippable)

    def source(r: RunResult) -> Path:
        return runs / r.name / "best"

    # a run whose folder is gone (the result file came from another machine) cannot be copied
    at_hand = [r for r in shippable[key] if is_checkpoint(source(r))]
    if not at_hand:
        raise ValueError(f"{key} is the row to ship, but no run of it ({', '.join(r.name for r in shippable[key])}) "
                         f"holds a checkpoint in {runs}; pass the study's --runs folder, or train a seed of it again "
                         f"beside the others (the flags it was trained with, and --repeat 1)")
    for gone in (r for r in shippable[key] if r not in at_hand):
        log(f"not shipping {key} seed {gone.run_label}: its checkpoint is not in {runs} any more")
    digests = {r.name: evaluated_weights(r, source(r), key) for r in at_hand}  # before any slow work
    validation = {}
    for r in at_hand:
        cfg = resolve(None, **r.config)
        validation[r.name] = evaluate(plan, source(r), source(r).parent / "eval-select", cfg, plan.select_examples,
                                      main_attacks(cfg), split="val")
        log(f"{key} seed {r.run_label}: validation worst case {100 * validation[r.name]['robust_accuracy']:.1f} % "
            f"on {validation[r.name]['examples']} held-out images")
    result = max(at_hand, key=lambda r: validation[r.name]["robust_accuracy"])
    values = card_values(result, digests[result.name], validation, dense_at(grouped, key))
    with atomic_directory(dest, may_replace=is_checkpoint) as tmp:  # dest appears whole, numbers included
        # copies dated now, not the run's: `make run` exports again only when the weights are newer
        # than its last export, which may be of the model shipped before
        shutil.copytree(source(result), tmp, dirs_exist_ok=True, copy_function=shutil.copy)
        card = update_metrics(tmp, **values)
    log(f"shipped {result.name} ({result.row.label}, seed {result.run_label}) to {dest}: clean "
        f"{100 * card.clean_accuracy:.1f} %, worst case {100 * card.robust_accuracy:.1f} % on {result.examples} test images")
    return values
