"""Running a study's runs (train_unless_finished: the one train-or-resume of every study), and the
frontier study's jobs: each (row, seed) is one independent job that trains (resumed if cut
off), evaluates its best checkpoint, and writes its result file last; headline runs then get
AutoAttack. One machine runs the jobs in turn (run_study); a cluster gets one command per missing
run (commands) and the report merges the result files."""
from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import torch

from advmoe.checkpoint import is_checkpoint, read_metrics
from evaluation import sanity
from evaluation.cache import evaluated_with
from training.config import TrainConfig, with_defaults
from training.trainer import train

from . import evaluations
from .cost import PGD_STEPS, ROUTE_ATTACKS, ROUTE_STEPS
from .design import Plan, Row, macs_per_image, run_name
from .record import CURVE_KEYS, RunResult, read, write

MAIN_ATTACKS = ("pgd", "apgd", "route-fixed", "router")
# AutoAttack standard is APGD-CE, APGD-T, FAB-T and Square; the main evaluation has the first two
AUTOATTACK_REST = ("fab", "square")
# where a run found its data and how many loader processes read it: not what the run measured, so a
# result file from another machine (the data in another folder) still stands for its run
WHERE = ("data_dir", "workers")


def result_path(results: Path, row: Row, seed: int, repeat: int = 0) -> Path:
    return Path(results) / f"{run_name(row.key, seed, repeat)}.json"


def finished(results: Path, row: Row, seed: int, cfg: TrainConfig, repeat: int = 0) -> RunResult | None:
    """The run's result if it landed for this config (run_study adds AutoAttack to it later)."""
    path = result_path(results, row, seed, repeat)
    if not path.is_file():
        return None
    result = read(path)
    have, want = ({k: v for k, v in c.items() if k not in WHERE} for c in (with_defaults(result.config), cfg.to_dict()))
    if have != want:  # retraining would overwrite a committed result
        diff = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
        raise ValueError(f"{path} is a result of other settings (they differ in {', '.join(diff)}): to measure "
                         f"these settings beside it, name them with --variant NAME")
    return result


def train_unless_finished(cfg: TrainConfig, out: Path, what: str, log=print) -> None:
    """Train cfg into `out` unless a finished run is there (its best checkpoint tested); a run cut
    off resumes from its last epoch. A run of other settings in `out` is refused, never overwritten
    (where its data was read from does not count)."""
    config = out / "config.json"
    if config.is_file():
        have, want = ({k: v for k, v in c.items() if k not in WHERE}
                      for c in (with_defaults(json.loads(config.read_text())), cfg.to_dict()))
        if have != want:
            raise ValueError(f"{out} holds a run of other settings; remove it or choose another --runs")
    if not (out / "best" / "metrics.json").is_file() or "test_pgd_accuracy" not in read_metrics(out / "best"):
        log(f"training {what} -> {out}")
        train(cfg, out, resume=config.is_file(), log=lambda *a, **k: None)


def attack_settings(plan: Plan, cfg: TrainConfig) -> dict:
    """The attacks' settings. A MoE model trained along another straight-through gradient is
    attacked along "softmax" all the same: the strongest of them (reports/gate_grad.md), so that
    every row meets the same attacks. (Absent when it is the model's own: the evaluations of
    the runs before the option still match.)"""
    gate = {"gate_grad": "softmax"} if cfg.is_moe and cfg.gate_grad != "softmax" else {}
    return {"pgd_steps": PGD_STEPS, "route_steps": ROUTE_STEPS, **gate, **plan.attack_settings}


def main_attacks(cfg: TrainConfig) -> tuple[str, ...]:
    """MAIN_ATTACKS, without the route attacks for a dense model (it has no routes)."""
    return tuple(a for a in MAIN_ATTACKS if cfg.is_moe or a not in ROUTE_ATTACKS)


def evaluate(plan: Plan, best: Path, out: Path, cfg: TrainConfig, n: int, attacks: tuple[str, ...],
             split: str = "test") -> dict:
    """The evaluation of `best` in `out`: kept when it is of these weights, images and settings (a
    study cut off during a later attack does not redo the earlier ones), else run over
    plan.eval_processes processes (their number does not change a result)."""
    settings = {"attacks": attacks, **attack_settings(plan, cfg)}
    return evaluations.kept_or_run(best, out, lambda doc: evaluated_with(doc, best, n, settings, split=split), n,
                                   settings, cfg.data_dir, log=lambda *a: None, processes=plan.eval_processes,
                                   split=split, device=cfg.device)


def curve_of(history: list[dict]) -> list[dict]:
    """One row per epoch from a run's metrics.jsonl: the last time it was trained. An epoch trained
    again after the collapse guard rolled back keeps the guard's event, so the curve says why."""
    rows: dict[int, dict] = {}
    for r in history:
        event = r.get("collapse_guard") or rows.get(r["epoch"], {}).get("collapse_guard")
        rows[r["epoch"]] = {**{k: r.get(k) for k in CURVE_KEYS}, "collapse_guard": event}
    return [rows[e] for e in sorted(rows)]


def summarise(row: Row, seed: int, cfg: TrainConfig, main: dict, history: list[dict], repeat: int = 0) -> RunResult:
    """The run's result from its main evaluation (eval.json) and its training history."""
    acc = main["accuracy"]
    pgd = min((k for k in acc if k.startswith("pgd-")), key=lambda k: int(k[4:]))  # PGD-10 with the defaults
    router = main["attacks"].get("router")
    return RunResult(
        row=row, seed=seed, repeat=repeat, config=cfg.to_dict(), macs_per_image=macs_per_image(row.model, row.width, cfg),
        checkpoint_sha256=main["checkpoint_sha256"], examples=main["examples"], accuracy=acc,
        worst_case=main["robust_accuracy"], pgd=pgd, pgd_minus_worst=acc[pgd] - main["robust_accuracy"],
        sanity_passed=main["sanity"]["passed"], sanity_failed=main["sanity"]["failed"],
        curve=curve_of(history),
        # what the work took (the training epochs with their validation, and the evaluation), however
        # often it was resumed; runs from before validation was timed count their epochs only
        seconds={"train": round(sum(r["epoch_seconds"] + r.get("validation_seconds", 0.0) for r in history), 1),
                 "eval": main["seconds"]},
        apgd_components=({c["name"]: c["accuracy_after"] for c in main["attacks"]["apgd"]["components"]}
                         if "apgd" in main["attacks"] else None),  # what APGD-CE finds alone, before APGD-T
        route_flip_rate=router["route_flip_rate"] if router else None,
        prediction_flip_given_route_flip=router["prediction_flip_given_route_flip"] if router else None,
        expert_share=main["experts"]["clean_share"] if router else None)


def run_one(plan: Plan, row: Row, seed: int, results: Path, log=print) -> RunResult:
    """Train and evaluate one (row, seed) with the main attacks; its result file is written last."""
    cfg, name = plan.config(row, seed), run_name(row.key, seed, plan.repeat)
    out = Path(plan.runs) / name
    best = out / "best"
    train_unless_finished(cfg, out, name, log)
    attacks = main_attacks(cfg)
    log(f"evaluating {name} on {plan.eval_examples} test images: {', '.join(attacks)}")
    main = evaluate(plan, best, out / "eval-main", cfg, plan.eval_examples, attacks)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = summarise(row, seed, cfg, main, history, plan.repeat)
    write(result_path(results, row, seed, plan.repeat), result)
    return result


def add_autoattack(plan: Plan, result: RunResult, results: Path, log=print) -> RunResult | None:
    """Full AutoAttack (standard) on a headline run's first --autoattack-examples, added to its
    result. Its first two attacks, APGD-CE and APGD-T, are the main evaluation's (the same
    package, settings and images); FAB-T and Square run here, each on every clean-correct image.
    Per image that is AutoAttack's cascade, without running APGD twice (a third of its cost).

    None when the run's checkpoint or main evaluation is gone (a result file that outlived its run
    folder, as on a fresh machine): the row's AutoAttack then comes from its other seeds."""
    cfg, out = plan.config(result.row, result.seed), Path(plan.runs) / result.name
    if not is_checkpoint(out / "best") or not (out / "eval-main" / "eval.json").is_file():
        log(f"no AutoAttack on {result.name}: its checkpoint or main evaluation is not in {out} any more; "
            "the row's AutoAttack comes from its other seeds")
        return None
    log(f"AutoAttack on {result.name}, {plan.autoattack_examples} test images: FAB-T and Square "
        "(APGD-CE and APGD-T from the main evaluation)")
    rest = evaluate(plan, out / "best", out / "eval-autoattack", cfg, plan.autoattack_examples, AUTOATTACK_REST)
    main = json.loads((out / "eval-main" / "eval.json").read_text())
    result = replace(result, autoattack=compose_autoattack(main, rest),
                     seconds={**result.seconds, "autoattack": rest["seconds"]})
    write(result_path(results, result.row, result.seed, result.repeat), result)
    log(f"done AutoAttack on {result.name}: its result file updated (commit it)")
    return result


def compose_autoattack(main: dict, rest: dict) -> dict:
    """AutoAttack per image from the main evaluation's APGD-CE + APGD-T and `rest`'s FAB-T and
    Square on the same first images: an image survives it when none of the four fools it."""
    n = rest["examples"]
    if main["checkpoint_sha256"] != rest["checkpoint_sha256"] or main["per_example"]["label"][:n] != rest["per_example"]["label"]:
        raise ValueError("AutoAttack's parts come from different weights or images")
    bits = [main["per_example"][k][:n] for k in ("clean", "apgd")] + [rest["per_example"][k] for k in AUTOATTACK_REST]
    survives = [set(b) == {"1"} for b in zip(*bits)]
    worst = [a and r == "1" for a, r in zip(survives, main["per_example"]["robust"][:n])]
    standard = (main["settings"]["apgd_iterations"] == rest["settings"]["apgd_iterations"] == 100
                and rest["settings"]["square_queries"] == 5000)
    # the masking check against every white-box attack of both evaluations (rest's own eval.json
    # can only set Square against FAB-T)
    white_box = torch.tensor([r == f == "1" for r, f in zip(main["per_example"]["robust"][:n], rest["per_example"]["fab"])])
    square = torch.tensor([b == "1" for b in rest["per_example"]["square"]])
    check = sanity.square_vs_white_box(square, white_box, square.float().mean().item(), white_box.float().mean().item())
    return {"examples": n, "accuracy": sum(survives) / n, "worst_case_with_main": sum(worst) / n,
            "standard": standard, "flags": sorted(set(main["autoattack_flags"]) | set(rest["autoattack_flags"])),
            "square_check": check,
            "composed_of": "APGD-CE and APGD-T from the main evaluation, FAB-T and Square on every clean-correct image"}


def jobs(rows: list[Row]) -> list[tuple[Row, int]]:
    """The study's runs in the order they land: the headline rows first, seed by seed, then the
    other rows, seed by seed, so the runs the verdicts rest on come before the ones that fill in
    the frontier."""
    order = []
    for headline in (True, False):
        for i in range(max(len(row.seeds) for row in rows)):
            order += [(row, row.seeds[i]) for row in rows if row.headline == headline and i < len(row.seeds)]
    return order


def run_study(plan: Plan, rows: list[Row], results: Path, on_result=lambda: None, log=print) -> list[RunResult]:
    """Every job in turn, resuming from the result files that landed; a headline run gets its
    AutoAttack right after its main evaluation, while its checkpoint is at hand. `on_result` is
    called whenever a result file changed (the report is rewritten)."""
    Path(results).mkdir(parents=True, exist_ok=True)
    done = {}
    for row, seed in jobs(rows):
        result = finished(results, row, seed, plan.config(row, seed), plan.repeat)
        if result is None:
            result = run_one(plan, row, seed, results, log)
            log(f"done {result.name}: worst case {100 * result.worst_case:.1f} %; "
                f"{result_path(results, row, seed, plan.repeat)} written (commit it)")
            on_result()
        if row.headline and result.autoattack is None:
            with_autoattack = add_autoattack(plan, result, results, log)
            if with_autoattack:
                result = with_autoattack
                on_result()
        done[row.key, seed] = result
    return [done[row.key, seed] for row in rows for seed in row.seeds]


def commands(plan: Plan, rows: list[Row], results: Path, flags: list[str]) -> list[str]:
    """One command per run whose result (or, for a headline run, whose AutoAttack) is missing, each
    a job a scheduler can run on its own (a Slurm array, Kubernetes Jobs); `flags` are the
    study's flags that every job repeats (preset, width, settings, folders)."""
    out = []
    for row, seed in jobs(rows):
        result = finished(results, row, seed, plan.config(row, seed), plan.repeat)
        if result is None or (row.headline and result.autoattack is None):
            # --rows takes a variant row by the key it extends; a curve row's own key names it
            base = row.key.removesuffix(f"-{row.variant}") if row.variant and not row.settings else row.key
            one = ["--rows", base, "--seeds", str(seed), "--headline-seeds", str(seed)]
            out.append(shlex.join(["advmoe", "study", "frontier", *flags, *one]))
    return out
