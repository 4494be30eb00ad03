"""The robustness-cost frontier: dense PGD-AT at several widths against the MoE methods,
worst-case robust accuracy against MACs per image; on Fashion-MNIST (--preset fmnist-tiny), or on
any data set of a preset, read from --data-dir.

    python -m studies.frontier --plan            # the rows, seeds and the estimated cost; starts nothing
    nice python -m studies.frontier               # run (resumes: finished runs are skipped)
    python -m studies.frontier --report-only      # the report from the results there are
    python -m studies.frontier --ship checkpoints/fmnist-moe   # the best MoE run, as the model to serve
    nice python -m studies.frontier --rows advmoe-w0.25 --variant steps3 --set attack_steps=3   # a lever, beside
    nice python -m studies.frontier --rows advmoe-w0.25 --repeat 1   # the same runs trained again, beside
    python -m studies.frontier --preset cifar10-resnet18 --data-dir ~/data --moe-width 1.0 --epochs 100   # CIFAR-10, GPU

Each (row, seed) is one run: train (runs/frontier/ROW-seedS, resumed if cut off), evaluate its
best checkpoint (selected on validation PGD accuracy, never on test images) on the first
--eval-examples test images with PGD-10/50, APGD-CE + APGD-T, the route-fixed and the router
attack, and, for the headline rows, full AutoAttack on the first --autoattack-examples (its
APGD-CE and APGD-T are the main evaluation's; FAB-T and Square are added). Its
summary goes to reports/robustness_frontier/ROW-seedS.json as soon as it is done, so a study cut
off resumes from the results that were kept (commit them as they come). The report,
reports/robustness_frontier.md with a PNG of worst-case robust accuracy against MACs, is written
from whatever results exist.

Training on a CPU is not bitwise reproducible (the same seed and settings give other weights), so
a seed trained again is another draw of its row: --repeat K trains the runs again as
ROW-seedS-repeatK, beside the first, and the report pools every run of a row.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import advmoe
from advmoe.checkpoint import WEIGHTS, is_checkpoint, read_metrics, update_metrics
from advmoe.device import synchronizer
from advmoe.io import atomic_directory, atomic_write_text
from advmoe.settings import ConfigError, number_text
from advmoe.stats import mean_std, percent
from evaluation import sanity
from evaluation.robustness import evaluate_in_processes, evaluated_with, file_sha256, kept_evaluation
from training.config import TrainConfig, resolve, with_defaults
from training.methods import METHODS, Step
from training.trainer import COLLAPSE_SHARE, make_optimizers, train

RESULTS = Path("reports/robustness_frontier")
REPORT = Path("reports/robustness_frontier.md")
MAIN_ATTACKS = ("pgd", "apgd", "route-fixed", "router")
PGD_STEPS = (10, 50)
BUDGET_HOURS = 12  # what the study at its defaults was sized for on a 2-core CPU
ROUTE_STEPS = 50
# Gradient passes (forward + input gradient) per image of each evaluation, at the defaults above;
# APGD-T runs on the survivors only (SURVIVE of the images); FAB-T and Square on the clean-correct
# ones (CLEAN), Square using all its queries on the robust ones only.
SURVIVE, CLEAN = 0.6, 0.85
EVAL_PASSES = {"pgd": sum(PGD_STEPS), "apgd-ce": 100, "apgd-t": 9 * 100 * SURVIVE, "route-fixed": 2 * ROUTE_STEPS,
               "router": ROUTE_STEPS, "sanity sweep": 5 * 10 * 200 / 1000}
# AutoAttack standard is APGD-CE, APGD-T, FAB-T and Square; the main evaluation has the first two
AUTOATTACK_REST = ("fab", "square")
AUTOATTACK_PASSES = {"fab-t": 2 * 9 * 100 * CLEAN,  # a gradient and a forward per iteration
                     "square": 5000 * SURVIVE / 2}  # a forward per query (about half a gradient pass)


@dataclass(frozen=True)
class Row:
    key: str  # run folder and result file prefix
    label: str
    method: str
    model: str
    width: float
    seeds: tuple[int, ...]
    headline: bool = False
    variant: str | None = None  # the --variant name of a row run with other settings beside the study's


# how the table names each method ("dense PGD-AT, width 0.15625", "AdvMoE, width 0.25")
METHOD_LABELS = {"pgd-at": "PGD-AT", "trades": "TRADES", "moe-at": "MoE-AT", "advmoe": "AdvMoE",
                 "route-aware": "route-aware AT"}
# where a run found its data and how many loader processes read it: not what the run measured, so a
# result file from another machine (the data in another folder) still stands for its run
WHERE = ("data_dir", "workers")
# the dense rows' widths go in steps of 1/64: every stage of ResNet-18 (64 to 512 channels) keeps whole channels
WIDTH_STEP = 1 / 64
# settings a row or a flag of its own sets: --set would be overridden by them without a word
ROW_SETTINGS = {"model": "the rows set it (--rows)", "width": "the rows set it (--moe-width, --rows)",
                "seed": "give seeds with --seeds and --headline-seeds", "epochs": "give it with --epochs"}


@dataclass
class Plan:
    """What the study trains and evaluates; the training settings start from --preset."""

    preset: str = "fmnist-tiny"
    # 0.25: experts of 8 to 64 channels (0.125 gave 4 in the first stage); the dense rows at and
    # above the experts' own width say whether that is enough (the report's verdicts). 0.5 would
    # cost 55 hours on 2 cores, far over the study's 12.
    moe_width: float = 0.25
    epochs: int = 5
    train_examples: int | None = None  # None: the full training set (55,000 after validation)
    eval_examples: int = 1000
    autoattack_examples: int = 500
    select_examples: int = 500  # validation images per seed for --ship's choice between seeds
    seeds: tuple[int, ...] = (0, 1)
    # Two: a third for the headline rows would take the study from about 14 to 19 hours of this
    # machine (--plan), over its budget of 12; --headline-seeds 0 1 2 adds it, resuming.
    headline_seeds: tuple[int, ...] = (0, 1)
    overrides: dict = field(default_factory=dict)  # more TrainConfig settings for every run
    attack_settings: dict = field(default_factory=dict)  # EvalSettings changes (tests: fewer steps)
    runs: str = "runs/frontier"
    repeat: int = 0  # K > 0: the runs trained again, beside the first (run_name)
    # Evaluations sharded over this many CPU processes, the threads split between them: on this
    # 2-core CPU two one-thread processes run APGD 1.18x faster than one two-thread process
    # (docs/evaluation.md), with the same per-image results. Training stays in one process.
    eval_processes: int = 1

    def config(self, row: Row, seed: int) -> TrainConfig:
        cfg = resolve(self.preset, **{**self.overrides, "method": row.method, "model": row.model, "width": row.width,
                                      "seed": seed, "epochs": self.epochs})
        return replace(cfg, train_examples=self.train_examples).validate()  # None: every training image


def parse_settings(pairs: list[str]) -> dict:
    """KEY=VALUE pairs as TrainConfig overrides, each value read as TOML (3, 0.1, true, "name")."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise ValueError(f"--set {pair!r}: write KEY=VALUE, e.g. attack_steps=3")
        if key in ROW_SETTINGS:
            raise ValueError(f"--set {key}: {ROW_SETTINGS[key]}")
        try:
            settings[key] = tomllib.loads(f"value = {value.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"--set {pair!r}: {value.strip()!r} is not a TOML value (quote a string: "
                             f"{key}=\"...\")") from None
    return settings


def variant_rows(rows: list[Row], name: str, settings: dict) -> list[Row]:
    """The rows again, as rows of their own (run folders, result files, table lines) trained with
    `settings` changed: a lever such as more epochs or a stronger training attack is measured
    beside the study's runs instead of over them. A `method` setting changes the rows' method (dense
    TRADES beside dense PGD-AT, say), and their labels name it."""
    if not name or not all(c.isalnum() or c in "._" for c in name):
        raise ValueError(f"variant name {name!r}: use letters, digits, '.' and '_' (it goes into file names)")
    method = settings.get("method")  # a known one: the settings were resolved before
    changed = ", ".join(f"{k}={v}" for k, v in settings.items())

    def label(row: Row) -> str:
        if method is None or method == row.method:
            return row.label
        named = METHOD_LABELS.get(method, method)
        if advmoe.is_moe_model(row.model) and "MoE" not in named:  # PGD-AT of the MoE model is no dense row
            named = f"MoE {named}"
        return row.label.replace(METHOD_LABELS[row.method], named, 1)
    return [replace(row, key=f"{row.key}-{name}", label=f"{label(row)} ({name}: {changed})",
                    method=method or row.method, variant=name) for row in rows]


def is_moe_row(row: dict) -> bool:
    return advmoe.is_moe_model(row["model"])


def is_dense_line(row: dict) -> bool:
    """The study's own dense PGD-AT rows: the line of the plot and of the verdict on width. Dense
    rows of another method or variant are weighed against the MoE rows but not drawn into it."""
    return not is_moe_row(row) and row["method"] == "pgd-at" and not row.get("variant")


def macs_per_image(model: str, width: float, cfg: TrainConfig) -> int:
    """MACs per image of the path sparse execution runs (router included)."""
    info = advmoe.get_dataset_info(cfg.dataset)
    cfg = replace(cfg, model=model, width=width)
    built = advmoe.create_model(model, **cfg.model_kwargs(info))
    return advmoe.count_macs(built, (info.in_channels, info.image_size, info.image_size))


def width_for_macs(target: int, model: str, cfg: TrainConfig, widest: float = 2.0) -> float:
    """The narrowest width, in steps of WIDTH_STEP, at which `model` costs at least `target` MACs
    per image: a dense row "of the MoE model's MACs" is never given fewer than the MoE model has
    (bisection over the steps; MACs grow with width)."""
    low, high = 0, round(widest / WIDTH_STEP)  # MACs at low steps < target <= MACs at high steps
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if macs_per_image(model, mid * WIDTH_STEP, cfg) < target else (low, mid)
    return high * WIDTH_STEP


def default_rows(plan: Plan) -> list[Row]:
    """Dense PGD-AT at the MoE model's MACs, in between and at the MoE model's own width (its
    full-width twin; where no whole-channel width lies in between, at twice the twin's width, so
    there are still three); MoE-AT, AdvMoE and route-aware training at the MoE width."""
    base = resolve(plan.preset, **plan.overrides)
    moe, dense = base.model, advmoe.dense_twin(base.model)
    equal = width_for_macs(macs_per_image(moe, plan.moe_width, base), dense, base)
    middle = round((equal + plan.moe_width) / 2 / WIDTH_STEP) * WIDTH_STEP
    if middle in (equal, plan.moe_width):  # no whole-channel width between them: one wider than the twin instead
        middle = 2 * plan.moe_width
    rows = [Row(f"pgd-at-w{equal:g}", f"dense PGD-AT, width {equal:g} (the MoE model's MACs)", "pgd-at", dense, equal,
                plan.headline_seeds, headline=True),
            Row(f"pgd-at-w{middle:g}", f"dense PGD-AT, width {middle:g}", "pgd-at", dense, middle, plan.seeds),
            Row(f"pgd-at-w{plan.moe_width:g}", f"dense PGD-AT, width {plan.moe_width:g} (the MoE model's full-width twin)",
                "pgd-at", dense, plan.moe_width, plan.seeds)]
    for method in ("moe-at", "advmoe", "route-aware"):
        if method in METHODS:
            rows.append(Row(f"{method}-w{plan.moe_width:g}", f"{METHOD_LABELS[method]}, width {plan.moe_width:g}", method, moe,
                            plan.moe_width, plan.headline_seeds, headline=True))
    return rows


# -- cost -----------------------------------------------------------------------------------------
def _fastest(run, repeats: int = 3, device: torch.device = torch.device("cpu")) -> float:
    """Seconds of the fastest of `repeats` calls of run(): the one other work on the machine
    slowed least (timeit's rule); the first call, a warm-up, is not timed."""
    synchronize = synchronizer(device)
    run()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _step_seconds(cfg: TrainConfig) -> float:
    """Seconds of one training step of cfg's method on random data, on cfg's device."""
    info, device = advmoe.get_dataset_info(cfg.dataset), torch.device(cfg.device)
    torch.manual_seed(0)
    model = advmoe.create_model(cfg.model, **cfg.model_kwargs(info)).to(device).train()
    step = Step(model, cfg, make_optimizers(cfg, model))
    x = torch.rand(cfg.batch_size, info.in_channels, info.image_size, info.image_size, device=device)
    y = torch.randint(0, info.num_classes, (cfg.batch_size,), device=device)
    return _fastest(lambda: METHODS[cfg.method].step(step, x, y), device=device)


def _pass_seconds(cfg: TrainConfig, batch: int = 64) -> float:
    """Seconds per image of a forward and input-gradient pass (masked execution), on cfg's device."""
    info, device = advmoe.get_dataset_info(cfg.dataset), torch.device(cfg.device)
    model = advmoe.create_model(cfg.model, **cfg.model_kwargs(info)).to(device).eval().requires_grad_(False)
    x = torch.rand(batch, info.in_channels, info.image_size, info.image_size, device=device, requires_grad=True)
    return _fastest(lambda: torch.autograd.grad(model(x).sum(), x), device=device) / batch


def estimate(plan: Plan, rows: list[Row], results: Path | None = None) -> list[dict]:
    """Hours per row (all its seeds). A row with finished runs in `results` costs what they took
    (their mean; a repeat costs what the first runs took); otherwise training comes from a measured
    step and evaluation from counted passes."""
    out = []
    for row in rows:
        cfg = plan.config(row, row.seeds[0])
        landed = [d for s in row.seeds for r in sorted({0, plan.repeat})
                  if (d := finished(results, row, s, plan.config(row, s), r))] if results else []
        took = {k: [d["seconds"][k] / 3600 for d in landed if k in d["seconds"]] for k in ("train", "eval", "autoattack")}
        per_pass = functools.cache(lambda: _pass_seconds(cfg))  # timed only if something needs it
        if took["train"]:
            train_h = sum(took["train"]) / len(took["train"])
        else:
            train_size = cfg.train_examples or len(advmoe.load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.val_size))
            batches = math.ceil(train_size / cfg.batch_size)
            val_passes = cfg.val_examples * (1 + cfg.eval_steps)
            train_h = cfg.epochs * (batches * _step_seconds(cfg) + val_passes * per_pass()) / 3600
        if took["eval"]:
            eval_h = sum(took["eval"]) / len(took["eval"])
        else:
            passes = {k: v for k, v in EVAL_PASSES.items() if cfg.is_moe or k not in ("route-fixed", "router")}
            eval_h = plan.eval_examples * sum(passes.values()) * per_pass() / 3600
        if row.headline:
            eval_h += (sum(took["autoattack"]) / len(took["autoattack"]) if took["autoattack"] else
                       plan.autoattack_examples * sum(AUTOATTACK_PASSES.values()) * per_pass() / 3600)
        out.append({"row": row.key, "seeds": len(row.seeds), "train_hours": train_h * len(row.seeds),
                    "eval_hours": eval_h * len(row.seeds), "macs": macs_per_image(row.model, row.width, cfg),
                    "measured_runs": len(landed)})
    return out


def print_estimate(costs: list[dict], done: set[str], rows: list[Row], log=print, repeat: int = 0) -> None:
    log("| row | MACs per image | seeds | training (h) | evaluation (h) | from |\n|---|---|---|---|---|---|")
    for c in costs:
        source = f"{c['measured_runs']} finished run(s)" if c["measured_runs"] else "a measured step"
        log(f"| {c['row']} | {c['macs'] / 1e6:.2f} M | {c['seeds']} | {c['train_hours']:.1f} | {c['eval_hours']:.1f} "
            f"| {source} |")
    remaining = sum((c["train_hours"] + c["eval_hours"]) * sum(run_name(r.key, s, repeat) not in done for s in r.seeds)
                    / len(r.seeds) for c, r in zip(costs, rows))
    total = sum(c["train_hours"] + c["eval_hours"] for c in costs)
    log(f"\nestimated: {total:.1f} hours in all on this machine, {remaining:.1f} hours for the runs not done yet "
        f"({len(done)} done); rows with finished runs at what those took, the others with training from a "
        "measured step and evaluation from counted attack passes")


# -- one run ----------------------------------------------------------------------------------------
def run_name(key: str, seed: int, repeat: int = 0) -> str:
    """The run folder and result file name of a row's seed; a repeat (the seed trained again) gets
    its own, beside the first."""
    return f"{key}-seed{seed}" + (f"-repeat{repeat}" if repeat else "")


def doc_run_name(doc: dict) -> str:
    """run_name of a result file's run (result files from before repeats are each seed's first)."""
    return run_name(doc["row"]["key"], doc["seed"], doc.get("repeat", 0))


def run_label(doc: dict) -> str:
    """How the report names a run among its row's: its seed, and its repeat when it is one."""
    return f"{doc['seed']}" + (f" (repeat {doc['repeat']})" if doc.get("repeat") else "")


def result_path(results: Path, row: Row, seed: int, repeat: int = 0) -> Path:
    return results / f"{run_name(row.key, seed, repeat)}.json"


def finished(results: Path, row: Row, seed: int, cfg: TrainConfig, repeat: int = 0) -> dict | None:
    """The run's summary if it landed for this config (run_study adds AutoAttack to it later)."""
    path = result_path(results, row, seed, repeat)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    have, want = ({k: v for k, v in c.items() if k not in WHERE} for c in (with_defaults(doc.get("config") or {}), cfg.to_dict()))
    if have != want:  # retraining would overwrite a committed result
        diff = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
        raise ValueError(f"{path} is a result of other settings (they differ in {', '.join(diff)}): to measure "
                         f"these settings beside it, name them with --variant NAME")
    return doc


def _evaluate(plan: Plan, best: Path, out: Path, cfg: TrainConfig, n: int, attacks: tuple[str, ...],
              settings: dict, split: str = "test") -> dict:
    """evaluate_checkpoint (over plan.eval_processes processes), or the eval.json already in `out`
    when it is of these weights, images and settings (a study cut off during a later attack does
    not redo the earlier ones; the number of processes does not change a result)."""
    kept = kept_evaluation(out / "eval.json",
                           lambda doc: evaluated_with(doc, best, n, {"attacks": attacks, **settings}, split=split))
    if kept:
        return kept
    threads = max(1, torch.get_num_threads() // plan.eval_processes)
    return evaluate_in_processes(plan.eval_processes, best, threads, data_dir=cfg.data_dir, n_examples=n, out=out,
                                 progress=False, attacks=attacks, split=split, device=cfg.device, **settings)


def _settings(plan: Plan, cfg: TrainConfig) -> dict:
    """The attacks' settings. A MoE model trained along another straight-through gradient is
    attacked along "softmax" all the same: the strongest of them (reports/gate_grad.md), so that
    every row meets the same attacks. (Absent when it is the model's own: the evaluations of
    the runs before the option still match.)"""
    gate = {"gate_grad": "softmax"} if cfg.is_moe and cfg.gate_grad != "softmax" else {}
    return {"pgd_steps": PGD_STEPS, "route_steps": ROUTE_STEPS, **gate, **plan.attack_settings}


def main_attacks(cfg: TrainConfig) -> tuple[str, ...]:
    """MAIN_ATTACKS, without the route attacks for a dense model (it has no routes)."""
    return tuple(a for a in MAIN_ATTACKS if cfg.is_moe or a not in ("route-fixed", "router"))


def run_one(plan: Plan, row: Row, seed: int, results: Path, log=print) -> dict:
    """Train and evaluate one (row, seed) with the main attacks; its summary file is written last."""
    cfg, name = plan.config(row, seed), run_name(row.key, seed, plan.repeat)
    out = Path(plan.runs) / name
    best = out / "best"
    if not (best / "metrics.json").is_file() or "test_pgd_accuracy" not in read_metrics(best):
        log(f"training {name} -> {out}")
        train(cfg, out, resume=(out / "config.json").is_file(), log=lambda *a, **k: None)
    attacks = main_attacks(cfg)
    log(f"evaluating {name} on {plan.eval_examples} test images: {', '.join(attacks)}")
    main = _evaluate(plan, best, out / "eval-main", cfg, plan.eval_examples, attacks, _settings(plan, cfg))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    doc = summarise(row, seed, cfg, main, history, plan.repeat)
    atomic_write_text(result_path(results, row, seed, plan.repeat), json.dumps(doc, indent=1) + "\n")
    return doc


def add_autoattack(plan: Plan, row: Row, seed: int, results: Path, doc: dict, log=print) -> dict | None:
    """Full AutoAttack (standard) on a headline run's first --autoattack-examples, added to its
    summary. Its first two attacks, APGD-CE and APGD-T, are the main evaluation's (the same
    package, settings and images); FAB-T and Square run here, each on every clean-correct image.
    Per image that is AutoAttack's cascade, without running APGD twice (a third of its cost).

    None when the run's checkpoint or main evaluation is gone (a result file that outlived its run
    folder, as on a fresh machine): the row's AutoAttack then comes from its other seeds, and the
    report says which."""
    cfg, name = plan.config(row, seed), run_name(row.key, seed, plan.repeat)
    path = result_path(results, row, seed, plan.repeat)
    out = Path(plan.runs) / name
    if not is_checkpoint(out / "best") or not (out / "eval-main" / "eval.json").is_file():
        log(f"no AutoAttack on {name}: its checkpoint or main evaluation is not in {out} any more; "
            "the row's AutoAttack comes from its other seeds")
        return None
    log(f"AutoAttack on {name}, {plan.autoattack_examples} test images: FAB-T and Square "
        "(APGD-CE and APGD-T from the main evaluation)")
    rest = _evaluate(plan, out / "best", out / "eval-autoattack", cfg, plan.autoattack_examples, AUTOATTACK_REST,
                     _settings(plan, cfg))
    main = json.loads((out / "eval-main" / "eval.json").read_text())
    doc = {**doc, "autoattack": compose_autoattack(main, rest)}
    doc["seconds"] = {**doc["seconds"], "autoattack": rest["seconds"]}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    log(f"done AutoAttack on {name}: {path} updated (commit it)")
    return doc


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


def summarise(row: Row, seed: int, cfg: TrainConfig, main: dict, history: list[dict], repeat: int = 0) -> dict:
    acc = main["accuracy"]
    pgd = min((k for k in acc if k.startswith("pgd-")), key=lambda k: int(k[4:]))  # PGD-10 with the defaults
    doc = {"row": asdict(row), "seed": seed, "repeat": repeat, "config": cfg.to_dict(),
           "macs_per_image": macs_per_image(row.model, row.width, cfg),
           "checkpoint_sha256": main["checkpoint_sha256"],  # the weights these numbers are of
           "examples": main["examples"], "accuracy": acc, "worst_case": main["robust_accuracy"],
           "pgd": pgd, "pgd_minus_worst": acc[pgd] - main["robust_accuracy"],
           "sanity_passed": main["sanity"]["passed"], "sanity_failed": main["sanity"]["failed"],
           "curve": [{k: r.get(k) for k in ("epoch", "val_clean_accuracy", "val_pgd_accuracy", "val_route_fixed_accuracy",
                                            "val_worst_accuracy", "epoch_seconds")} for r in history],
           # what the work took (the training epochs and the evaluation), however often it was resumed
           "seconds": {"train": round(sum(r["epoch_seconds"] for r in history), 1), "eval": main["seconds"]}}
    if "apgd" in main["attacks"]:  # what APGD-CE finds alone, before APGD-T
        doc["apgd_components"] = {c["name"]: c["accuracy_after"] for c in main["attacks"]["apgd"]["components"]}
    router = main["attacks"].get("router")
    if router:
        doc["route_flip_rate"] = router["route_flip_rate"]
        doc["prediction_flip_given_route_flip"] = router["prediction_flip_given_route_flip"]
        doc["expert_share"] = main["experts"]["clean_share"]
    return doc


def run_study(plan: Plan, rows: list[Row], results: Path = RESULTS, report: Path = REPORT, log=print) -> list[dict]:
    """The headline rows first, seed by seed, then the other rows, seed by seed: the runs the
    verdicts rest on land before the ones that fill in the frontier. A headline run gets its
    AutoAttack right after its main evaluation, while its checkpoint is at hand. The study resumes
    from the result files that landed."""
    results.mkdir(parents=True, exist_ok=True)
    docs = {}
    for headline in (True, False):
        for i in range(max(len(row.seeds) for row in rows)):
            for row in (r for r in rows if r.headline == headline and i < len(r.seeds)):
                seed = row.seeds[i]
                doc = finished(results, row, seed, plan.config(row, seed), plan.repeat)
                if doc is None:
                    doc = run_one(plan, row, seed, results, log)
                    log(f"done {run_name(row.key, seed, plan.repeat)}: worst case {100 * doc['worst_case']:.1f} %; "
                        f"{result_path(results, row, seed, plan.repeat)} written (commit it)")
                    write_report(results, report, plan)
                if row.headline and "autoattack" not in doc:
                    with_autoattack = add_autoattack(plan, row, seed, results, doc, log)
                    if with_autoattack:
                        doc = with_autoattack
                        write_report(results, report, plan)
                docs[row.key, seed] = doc
    return [docs[row.key, seed] for row in rows for seed in row.seeds]


# -- shipping ---------------------------------------------------------------------------------------
SHIP_MAX_MACS = 0.40  # of the dense twin's: the shipped model must be really sparse


def collapsed(docs: list[dict]) -> float | None:
    """The busiest expert's mean share of the clean test routes when it is over COLLAPSE_SHARE (a
    router that sends nearly every image to one expert: a dense model of the expert's width
    carrying dead experts), else None."""
    if "expert_share" not in docs[0]:
        return None
    busiest = statistics.mean(max(d["expert_share"]) for d in docs)
    return busiest if busiest > COLLAPSE_SHARE else None


def ship(results: Path, runs: Path, dest: Path, log=print, plan: Plan | None = None) -> dict:
    """Copy the best MoE run of the study to `dest` as the model to serve, its study numbers in
    metrics.json (so the model card and /model_info report them).

    The row is the MoE row with the best mean worst case (`best_row`: of two runs or more, where
    there are such rows) among those at most SHIP_MAX_MACS of their dense twin's MACs whose router
    has not collapsed (a router that sends nearly every image to one expert makes a dense model of
    the expert's width, carrying dead experts). Within it, of
    the runs (seeds and repeats) whose checkpoint is still in `runs`, the one with the best *validation worst case*:
    the study's main attacks on the first plan.select_examples images its training held out.
    Choosing a seed by its test results would be selecting on the test set; choosing it by
    validation PGD alone, as training picks its epochs, favours the seed whose hard routes mislead
    PGD most (docs/frontier.md shows it happen)."""
    plan = plan or Plan()
    grouped = load_results(results)
    if not grouped:
        raise ValueError(f"no study results in {results}: run `python -m studies.frontier` first")
    candidates = {}
    for key, docs in grouped.items():
        row = docs[0]["row"]
        if not is_moe_row(row):
            continue
        cfg = resolve(None, **docs[0]["config"])
        twin = macs_per_image(advmoe.dense_twin(row["model"]), row["width"], cfg)
        busiest = collapsed(docs)
        if busiest is not None:
            log(f"not shipping {key}: its busiest expert takes {busiest:.0%} of the clean test routes (collapsed)")
        elif docs[0]["macs_per_image"] <= SHIP_MAX_MACS * twin:
            candidates[key] = docs
    if not candidates:
        raise ValueError(f"no finished MoE run in {results} both costs at most {SHIP_MAX_MACS:.2f}x its dense twin's "
                         f"MACs and keeps its experts in use (busiest expert at most {COLLAPSE_SHARE:.0%} of the routes)")
    key = best_row(candidates)

    def source(d: dict) -> Path:
        return runs / doc_run_name(d) / "best"

    # a run whose folder is gone (the result file came from another machine) cannot be copied
    at_hand = [d for d in candidates[key] if is_checkpoint(source(d))]
    if not at_hand:
        names = ", ".join(doc_run_name(d) for d in candidates[key])
        raise ValueError(f"{key} is the row to ship, but no run of it ({names}) holds a checkpoint in {runs}; "
                         "pass the study's --runs folder")
    for gone in (d for d in candidates[key] if d not in at_hand):
        log(f"not shipping {key} seed {run_label(gone)}: its checkpoint is not in {runs} any more")
    measured = {doc_run_name(d): evaluated_weights(d, source(d), key) for d in at_hand}  # before any slow work
    validation = {}
    for d in at_hand:
        cfg, name = resolve(None, **d["config"]), doc_run_name(d)
        validation[name] = _evaluate(plan, source(d), source(d).parent / "eval-select", cfg, plan.select_examples,
                                     main_attacks(cfg), _settings(plan, cfg), split="val")
        curve = ", ".join(f"{100 * r['val_pgd_accuracy']:.1f}" for r in d["curve"])
        log(f"{key} seed {run_label(d)}: validation worst case {100 * validation[name]['robust_accuracy']:.1f} % "
            f"on {validation[name]['examples']} held-out images (validation PGD by epoch: {curve} %)")
    doc = max(at_hand, key=lambda d: validation[doc_run_name(d)]["robust_accuracy"])
    name = doc_run_name(doc)
    chosen = validation[name]
    values = {"clean_accuracy": doc["accuracy"]["clean"], "robust_accuracy": doc["worst_case"],
              "robust_examples": doc["examples"],  # "robust" is the worst case over the others, not an attack
              "robust_attacks": sorted(k for k in doc["accuracy"] if k not in ("clean", "robust")),
              "route_flip_rate": doc.get("route_flip_rate"), "route_flip_attack": "router attack",
              "study_run": name, "study_checkpoint_sha256": measured[name],
              "selected_on": "validation worst case", "validation_robust_accuracy": chosen["robust_accuracy"],
              "validation_examples": chosen["examples"],
              "validation_robust_accuracy_by_run": {run: v["robust_accuracy"] for run, v in validation.items()}}
    if "autoattack" in doc:
        values |= {"autoattack_accuracy": doc["autoattack"]["accuracy"], "autoattack_examples": doc["autoattack"]["examples"]}
    with atomic_directory(dest, may_replace=is_checkpoint) as tmp:  # dest appears whole, numbers included
        # copies dated now, not the run's: `make run` exports again only when the weights are newer
        # than its last export, which may be of the model shipped before
        shutil.copytree(source(doc), tmp, dirs_exist_ok=True, copy_function=shutil.copy)
        card = update_metrics(tmp, **values)
    log(f"shipped {name} ({doc['row']['label']}, seed {run_label(doc)}, the best validation worst case) "
        f"to {dest}: clean {100 * card.clean_accuracy:.1f} %, worst case {100 * card.robust_accuracy:.1f} % on "
        f"{doc['examples']} test images")
    return values


def evaluated_weights(doc: dict, best: Path, key: str) -> str:
    """The digest of the weights the study's numbers for `doc` are of, after checking that `best`
    still holds them: the numbers go with the weights they were measured on, or not at all (a run
    trained again after its evaluation, say)."""
    measured = doc.get("checkpoint_sha256")
    if measured is None:  # a result file from before the digest: it is in the run's evaluation
        evaluation = best.parent / "eval-main" / "eval.json"
        if not evaluation.is_file():
            raise ValueError(f"{evaluation} is gone, and with it the digest of the weights the study evaluated; "
                             f"run `python -m studies.frontier --rows {key}` again to evaluate them")
        measured = json.loads(evaluation.read_text())["checkpoint_sha256"]
    if file_sha256(best / WEIGHTS) != measured:
        raise ValueError(f"{best} is not the checkpoint the study evaluated (its weights changed since); "
                         f"run `python -m studies.frontier --rows {key}` again to evaluate them")
    return measured


# -- the report -------------------------------------------------------------------------------------
def default_paths(dataset: str) -> tuple[Path, Path, Path]:
    """Where a study of `dataset` keeps its run folders, result files and report: Fashion-MNIST's
    the project's own, any other data set's beside them, so no run or table mixes data sets."""
    runs = Path(Plan.runs)
    if dataset == "fashion_mnist":
        return runs, RESULTS, REPORT
    return (runs.with_name(f"{runs.name}_{dataset}"), RESULTS.with_name(f"{RESULTS.name}_{dataset}"),
            REPORT.with_name(f"{RESULTS.name}_{dataset}.md"))


def load_results(results: Path) -> dict[str, list[dict]]:
    """{row key: summaries of its runs, by seed and repeat}, the rows by MACs per image."""
    grouped: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        grouped.setdefault(doc["row"]["key"], []).append(doc)
    kinds = sorted({(d["config"]["dataset"], d["config"]["eps"]) for docs in grouped.values() for d in docs})
    if len(kinds) > 1:
        raise ValueError(f"{results} holds results of {len(kinds)} data sets or budgets "
                         f"({', '.join(f'{name} at ε {number_text(eps)}' for name, eps in kinds)}); one table compares one: "
                         "give each study its own --results and --report")
    for docs in grouped.values():
        docs.sort(key=lambda d: (d["seed"], d.get("repeat", 0)))
    return dict(sorted(grouped.items(), key=lambda kv: kv[1][0]["macs_per_image"]))


COLUMNS = (("clean", "clean"), ("pgd-10", "PGD-10"), ("pgd-50", "PGD-50"), ("apgd", "APGD-CE+T"),
           ("route-fixed", "route-fixed"), ("router", "router attack"))


def table(grouped: dict[str, list[dict]]) -> str:
    lines = ["| row | MACs per image | seeds | " + " | ".join(name for _, name in COLUMNS)
             + " | **worst case** | PGD - worst | route flips | busiest expert | AutoAttack (worst with the rest) |",
             "|---" * (len(COLUMNS) + 8) + "|"]
    for key, docs in grouped.items():
        cells = [percent([d["accuracy"].get(k) for d in docs]) if any(k in d["accuracy"] for d in docs) else "-"
                 for k, _ in COLUMNS]
        flips = percent([d.get("route_flip_rate") for d in docs]) if "route_flip_rate" in docs[0] else "-"
        # its share of the clean test routes: 100 % is a collapsed router, a dense model in effect
        busiest = percent([max(d["expert_share"]) for d in docs]) if "expert_share" in docs[0] else "-"
        aa = [d["autoattack"] for d in docs if "autoattack" in d]
        aa_cell = f"{percent([a['accuracy'] for a in aa])} ({percent([a['worst_case_with_main'] for a in aa])})" if aa else "-"
        if aa and len(aa) < len(docs):  # a seed whose checkpoint was gone before its AutoAttack ran
            aa_cell += f", seed {', '.join(run_label(d) for d in docs if 'autoattack' in d)}"
        lines.append(f"| {docs[0]['row']['label']} | {docs[0]['macs_per_image'] / 1e6:.2f} M | "
                     f"{', '.join(run_label(d) for d in docs)} | " + " | ".join(cells)
                     + f" | **{percent([d['worst_case'] for d in docs])}** | {percent([d['pgd_minus_worst'] for d in docs])} "
                     f"| {flips} | {busiest} | {aa_cell} |")
    return "\n".join(lines)


def _mean(docs: list[dict], key: str) -> float:
    return mean_std([d["accuracy"].get(key) for d in docs])[0]


def difference(grouped: dict[str, list[dict]], row: str, other: str) -> tuple[float, float, float, list[str]]:
    """Mean worst cases of two rows, the spread their difference is weighed against (the larger of
    the two rows' standard deviations), and the labels of those of the two rows that have one run:
    a row of one run has no spread yet, and another row's spread does not stand in for it (on this
    CPU two runs of one MoE row differed by 10 points where the dense rows' runs agree within 1.3)."""
    (m, sm), (o, so) = (mean_std([x["worst_case"] for x in grouped[k]]) for k in (row, other))
    single = [grouped[k][0]["row"]["label"] for k in (row, other) if len(grouped[k]) == 1]
    return m, o, max(sm, so), single


def one_run(single: list[str]) -> str:
    return f"one run of {' and of '.join(single)}, so no seed spread to weigh it against yet"


def trained_epochs(docs: list[dict]) -> int:
    """The epochs a row's runs were trained for: its config's, or its curve's length in a result file without one."""
    return docs[0].get("config", {}).get("epochs") or len(docs[0]["curve"])


def best_row(candidates: dict[str, list[dict]]) -> str:
    """The row of the best mean worst case, among the rows of two runs or more where there are any: one
    lucky run of a row must not outrank a row measured several times."""
    weighable = {k: d for k, d in candidates.items() if len(d) > 1} or candidates
    return max(weighable, key=lambda k: mean_std([d["worst_case"] for d in weighable[k]])[0])


def variant_verdict(grouped: dict[str, list[dict]], key: str) -> str | None:
    """What a variant's settings did to the worst case of the row it varies, if that row has results."""
    # the row it varies: the longest other key its own key extends, so a variant of a variant
    # (ce_steps3_e10 of ce_steps3) is weighed against that variant, not against the plain row
    row = grouped[key][0]["row"]
    bases = [k for k in grouped if k != key and key.startswith((f"{k}-", f"{k}_"))]
    if not bases:
        return None
    base = max(bases, key=len)
    m, o, spread, single = difference(grouped, key, base)
    weighed = (one_run(single) if single
               else f"{'more' if abs(m - o) > spread else 'no more'} than the seed spread ({100 * spread:.1f} points)")
    return (f"{row['label']}: worst case {100 * m:.1f} % against {100 * o:.1f} % for {grouped[base][0]['row']['label']}, "
            f"{100 * (m - o):+.1f} points, {weighed}.")


def verdicts(grouped: dict[str, list[dict]]) -> list[str]:
    """Sentences computed from the results (no number typed in); what the issue asks the study to show."""
    dense = {k: d for k, d in grouped.items() if not is_moe_row(d[0]["row"])}
    moe = {k: d for k, d in grouped.items() if is_moe_row(d[0]["row"])}
    if not dense or not moe:
        return ["Not enough rows finished for a verdict yet."]
    worst = {k: mean_std([x["worst_case"] for x in d]) for k, d in grouped.items()}
    epochs = {k: trained_epochs(d) for k, d in grouped.items()}
    # the best MoE row that is still a mixture: a collapsed router makes a dense model of one expert
    mixtures = {k: d for k, d in moe.items() if collapsed(d) is None} or moe
    best = best_row(mixtures)
    b = grouped[best][0]
    # a longer schedule helps every row, so the twin, MoE-AT and the dense rows of another schedule
    # are weighed against the best mixture trained as long as they were, not against the best overall
    best_of = {e: best_row({k: d for k, d in mixtures.items() if epochs[k] == e}) for e in {epochs[k] for k in mixtures}}
    other_schedules = sorted((k for k in best_of.values() if k != best), key=epochs.get)

    def equal_cost(key: str, fallback: bool) -> list[str]:
        """The dense rows of the MACs nearest a MoE row's among those trained as many epochs, the most
        robust first: with several methods at that cost (PGD-AT, TRADES), the MoE row has to beat each.
        A longer schedule helps both sides, so a row is weighed against dense rows of its own epochs;
        only the best MoE row falls back to the others where none has them."""
        pool = {k: d for k, d in dense.items() if epochs[k] == epochs[key]}
        pool = pool or (dense if fallback else {})
        if not pool:
            return []
        macs = grouped[key][0]["macs_per_image"]
        nearest = min(abs(d[0]["macs_per_image"] - macs) for d in pool.values())
        return sorted((k for k, d in pool.items() if abs(d[0]["macs_per_image"] - macs) == nearest),
                      key=lambda k: -worst[k][0])
    lines = [f"{d[0]['row']['label']}: its router collapsed (busiest expert {100 * collapsed(d):.0f} % of the clean "
             f"routes), so it is not a mixture of experts any more and not the best MoE row whatever its accuracy."
             for d in moe.values() if collapsed(d) is not None]
    lines += [f"{d[0]['row']['label']} is above the best MoE row ({b['row']['label']}) on one run ({_pair(worst[k][0], worst[best][0])}"
              f"): a second seed would say whether it is the better row."
              for k, d in mixtures.items() if len(d) == 1 and worst[k][0] > worst[best][0]]

    def compare(other: str, what: str, key: str = best) -> None:
        m, o, spread, single = difference(grouped, key, other)
        beats = not single and m - o > spread
        who = grouped[key][0]["row"]["label"] + (" (the best MoE row)" if key == best else "")

        def said(verb: str) -> str:
            return f"{who} {verb} {what} ({grouped[other][0]['row']['label']}) on worst-case robust accuracy"
        if single and m > o:  # ahead, but not yet weighed: no verdict either way
            line = f"{said('is ahead of')} by {100 * (m - o):.1f} points ({100 * m:.1f} % vs {100 * o:.1f} %), {one_run(single)}."
        else:
            line = (f"{said('beats' if beats else 'does not beat')} by more than the seed spread: {100 * m:.1f} % "
                    f"vs {100 * o:.1f} %, difference {100 * (m - o):+.1f} points, "
                    + (f"{one_run(single)}." if single else f"spread {100 * spread:.1f} points."))
        if not beats:  # where it loses: the difference under each attack both rows ran
            diff = {name: _mean(grouped[key], k) - _mean(grouped[other], k) for k, name in COLUMNS}
            diffs = [f"{name} {100 * v:+.1f}" for name, v in diff.items() if not math.isnan(v)]
            line += f" Difference by attack, in points: {', '.join(diffs)}."
        lines.append(line)

    for other in equal_cost(best, fallback=True):
        compare(other, "the dense model of the same MACs")
    for key in other_schedules:
        for other in equal_cost(key, fallback=False):  # another schedule, against dense rows of that schedule
            compare(other, f"the dense model of the same MACs and {epochs[key]} epochs", key)
    dense_line = {k: d for k, d in dense.items() if is_dense_line(d[0]["row"])}
    if len(dense_line) > 1:  # what capacity buys a dense model here: whether the MoE width starves its experts
        by_cost = sorted(dense_line, key=lambda k: dense_line[k][0]["macs_per_image"])
        cheapest, dearest = by_cost[0], by_cost[-1]
        ratio = dense_line[dearest][0]["macs_per_image"] / dense_line[cheapest][0]["macs_per_image"]
        rise = worst[dearest][0] - worst[cheapest][0]
        spread = max((worst[k][1] for k in by_cost if len(dense_line[k]) > 1), default=0.0)
        if rise > spread:
            bought = f"add {100 * rise:.1f} points."
        else:
            bought = (f"add no more than the seed spread ({100 * rise:+.1f} points, spread {100 * spread:.1f}): capacity "
                      "is not what limits a dense model's robustness at these widths, so the MoE rows' gap to the dense "
                      "row of their MACs is unlikely to come from their width.")
        costs = ", ".join(f"{dense_line[k][0]['macs_per_image'] / 1e6:.1f} M MACs {100 * worst[k][0]:.1f} %" for k in by_cost)
        lines.append(f"Dense PGD-AT's worst case by cost: {costs}: {ratio:.1f}x the MACs {bought}")
    twins = [k for k in dense_line if grouped[k][0]["row"]["width"] == b["row"]["width"]
             and epochs[k] in best_of]
    if twins:  # the sparse model against the dense model it was cut from: what it keeps for what it saves
        key = best_of[epochs[twins[0]]]
        t, sparse, (m, o) = grouped[twins[0]][0], grouped[key][0], (worst[key][0], worst[twins[0]][0])
        kept = f"keeps {100 * m / o:.0f} % of its worst-case accuracy" if o > 0 else "is compared on worst case"
        lines.append(f"{sparse['row']['label']} costs {sparse['macs_per_image'] / t['macs_per_image']:.2f}x the MACs of its "
                     f"full-width twin ({t['row']['label']}) and {kept} ({100 * m:.1f} % vs {100 * o:.1f} %).")
    # MoE-AT: the MoE model adversarially trained as a whole with one optimiser (the paper's TRADES,
    # or PGD-AT's loss as a variant); the best row of their schedule has to beat each of them
    joint = [k for k, d in moe.items() if (m := METHODS[d[0]["row"]["method"]]).groups == ("all",) and m.attacks]
    for other in joint:  # each against the best mixture of its own schedule
        key = best_of.get(epochs[other])
        if key is not None and key != other:
            compare(other, "MoE-AT", key)
    for docs in grouped.values():  # the gradient-masking check of the composed AutoAttack
        for d in docs:
            check = d.get("autoattack", {}).get("square_check")
            if check and not check["passed"]:
                lines.append(f"{d['row']['label']}, seed {d['seed']}: Square found what every white-box attack missed, a "
                             f"sign of gradient masking ({check['detail']}).")
    for key, docs in grouped.items():  # what each lever measured beside the study did
        said = variant_verdict(grouped, key) if docs[0]["row"].get("variant") else None
        lines += [said] if said else []
    lines += [curve_verdict(d) for d in grouped.values()]
    for key in [best, *other_schedules]:  # the targets, for the best row of each schedule
        gap = mean_std([x["pgd_minus_worst"] for x in grouped[key]])[0]
        flips = mean_std([x.get("route_flip_rate") for x in grouped[key]])[0]
        lines.append(f"{grouped[key][0]['row']['label']}: {grouped[key][0]['pgd'].upper()} minus worst case "
                     f"{100 * gap:.1f} points (target at most 5: {'met' if gap <= 0.05 else 'missed'}); route flips under "
                     f"the router attack {100 * flips:.1f} % (target at most 10 %: {'met' if flips <= 0.10 else 'missed'}).")
    return lines


LEVEL_OFF = 0.01  # a last epoch that adds less validation PGD accuracy than this: levelled off
COLLAPSE = 0.2  # a seed's validation PGD accuracy falling this much in one epoch: named, as the row's mean blurs it


def mean_curve(docs: list[dict], key: str = "val_pgd_accuracy") -> list[float]:
    """A validation accuracy per epoch, the mean over the seeds that reached the epoch."""
    epochs = max(len(x["curve"]) for x in docs)
    return [statistics.mean(x["curve"][e][key] for x in docs if e < len(x["curve"])) for e in range(epochs)]


def collapses(docs: list[dict]) -> list[str]:
    """Each epoch where a seed's validation PGD accuracy fell by COLLAPSE or more from the epoch before."""
    found = []
    for x in docs:
        values = [r["val_pgd_accuracy"] for r in x["curve"]]
        run = f"seed {run_label(x)}"
        for e in range(1, len(values)):
            if values[e] <= values[e - 1] - COLLAPSE:
                after = f", {100 * values[e + 1]:.1f} % the next" if e + 1 < len(values) else ""
                found.append(f"{run} fell from {100 * values[e - 1]:.1f} to {100 * values[e]:.1f} % at epoch {e + 1}{after}")
    return found


def curve_verdict(docs: list[dict]) -> str:
    """Whether the row's validation robustness levelled off: the curve's peak, and what its last epoch added;
    then, for a row of several runs, any seed's fall within one epoch, which their mean would blur."""
    fell = collapses(docs) if len(docs) > 1 else []  # one run's curve shows its own fall
    note = f" Behind the mean: {'; '.join(fell)}." if fell else ""
    return _curve_verdict(docs) + note


def _curve_verdict(docs: list[dict]) -> str:
    curve = mean_curve(docs)
    label, peak = docs[0]["row"]["label"], max(range(len(curve)), key=curve.__getitem__)
    text = (f"{label}: validation PGD accuracy by epoch {', '.join(f'{100 * v:.1f}' for v in curve)} %")
    if all(r.get("val_route_fixed_accuracy") is not None for x in docs for r in x["curve"]):  # runs since it was added
        fixed = mean_curve(docs, "val_route_fixed_accuracy")
        text += f" (route-fixed: {', '.join(f'{100 * v:.1f}' for v in fixed)} %)"
    if peak < len(curve) - 1 and curve[-1] < curve[peak] - LEVEL_OFF:
        return text + f"; it peaked at epoch {peak + 1} and fell after it (overfitting; the checkpoint kept is the peak's)."
    if len(curve) > 1 and curve[-1] - curve[-2] >= LEVEL_OFF:
        return text + (f"; still rising ({100 * (curve[-1] - curve[-2]):+.1f} points in the last epoch): more epochs "
                       "would likely raise it.")
    return text + "; levelled off."


def plot(grouped: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (frontier, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = [(d[0]["macs_per_image"], *mean_std([x["worst_case"] for x in d])) for d in grouped.values()
             if is_dense_line(d[0]["row"])]
    if dense:
        macs, mean, std = zip(*sorted(dense))
        frontier.errorbar([m / 1e6 for m in macs], [100 * v for v in mean], yerr=[100 * s for s in std], fmt="o-",
                          color="grey", capsize=3, label="dense PGD-AT")
    for key, d in grouped.items():
        if not is_dense_line(d[0]["row"]):
            m, s = mean_std([x["worst_case"] for x in d])
            frontier.errorbar([d[0]["macs_per_image"] / 1e6], [100 * m], yerr=[100 * s], fmt="s", capsize=3,
                              label=d[0]["row"]["label"])
    frontier.set(xlabel="MACs per image (M)", ylabel="worst-case robust accuracy (%)",
                 title="Robustness against cost (mean ± std over runs)")
    frontier.grid(alpha=0.3)
    frontier.legend(fontsize=7)
    for key, d in grouped.items():
        mean = mean_curve(d)
        curves.plot(range(1, len(mean) + 1), [100 * v for v in mean], marker=".", label=d[0]["row"]["label"])
    curves.set(xlabel="epoch", ylabel="validation PGD accuracy (%)", title="Does validation robustness level off?")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def study_cost(grouped: dict[str, list[dict]], rows: list[Row]) -> str:
    """What the study itself (its rows at their seeds; no variant, extra seed or repeat) has cost:
    the hours its result files record, and those hours again at each row's quickest run, stage by
    stage, which is what a machine with nothing else on it would have taken. The quickest run of
    a stage is sought among every run of the row's own settings, its extra seeds and repeats
    included: each is the same work, one more sample of what the stage costs."""
    runs = {r.key: r for r in rows}
    own = [d for docs in grouped.values() for d in docs
           if d["row"]["key"] in runs and d["seed"] in runs[d["row"]["key"]].seeds and not d.get("repeat")]
    if not own:
        return ""
    planned = sum(len(r.seeds) for r in rows)
    recorded = sum(sum(d["seconds"].values()) for d in own) / 3600
    quickest, started, uncounted = 0.0, 0, []
    for row in rows:
        docs = grouped.get(row.key, [])
        started += bool(docs)
        if docs and row.headline and not any("autoattack" in d["seconds"] for d in docs):
            uncounted.append(row.key)
        for stage in ("train", "eval", "autoattack"):
            times = [d["seconds"][stage] for d in docs if stage in d["seconds"]]
            if times and (stage != "autoattack" or row.headline):
                quickest += min(times) * len(row.seeds) / 3600
    cpu = all(d["config"].get("device", "cpu") == "cpu" for d in own)
    rows_counted = "" if started == len(rows) else f" (the {started} of its {len(rows)} rows with a finished run)"
    text = (f"The study itself, its {len(rows)} rows at their seeds without the variants, extra seeds and "
            f"repeats beside them: {len(own)} of {planned} runs finished, {recorded:.1f} hours recorded"
            + (f" against a budget of {BUDGET_HOURS} hours of a 2-core CPU" if cpu else "")
            + f"; {quickest:.1f} hours{rows_counted} at each row's quickest run, stage by stage (training, "
              f"evaluation, AutoAttack; among every run of the row's settings, its extra seeds and repeats "
              f"included), as a machine with nothing else on it would take.")
    missing = [doc_run_name(d) for d in own if runs[d["row"]["key"]].headline and "autoattack" not in d["seconds"]]
    if missing:
        runs_word = "run" if len(missing) == 1 else "runs"
        counted = (f"the quickest-run hours count it, except for {', '.join(uncounted)}, where no run has it" if uncounted
                   else "the quickest-run hours count it")
        text += f" AutoAttack has not run on {len(missing)} headline {runs_word} ({', '.join(missing)}); {counted}."
    return text


def write_report(results: Path, report: Path, plan: Plan, command: str | None = None) -> str:
    grouped = load_results(results)
    if not grouped:
        return ""
    png = report.with_suffix(".png")
    plot(grouped, png)
    first = next(iter(grouped.values()))[0]["config"]
    hours = sum(sum(d["seconds"].values()) for docs in grouped.values() for d in docs) / 3600
    folder = os.path.relpath(results, report.parent)
    runs = sum(len(d) for d in grouped.values())
    devices = sorted({d["config"].get("device", "cpu").split(":")[0] for docs in grouped.values() for d in docs})
    where = " and ".join({"cpu": "the CPU", "cuda": "a GPU"}.get(d, d) for d in devices)
    cost = study_cost(grouped, default_rows(plan))
    cost += "\n" if cost else ""
    text = f"""# Robustness against cost on {advmoe.get_dataset_info(first['dataset']).title}

Produced by `{command or 'python -m studies.frontier'}` (studies/frontier.py) from the result files in
[{folder}/]({folder}/) ({runs} run{'s' * (runs != 1)}, {hours:.1f} hours on {where} so far:
training epochs and evaluations, as each result file records them).
{cost}linf ε = {number_text(first['eps'])}; training: {first['epochs']} epochs, {first['train_examples'] or 'all'} training images, PGD-{first['attack_steps']}
for the training attack; checkpoints selected on validation PGD accuracy. Evaluation on the first
{plan.eval_examples} test images: PGD-10 and PGD-50 through the straight-through router, APGD-CE then APGD-T,
the route-fixed and the router attack; the **worst case** counts an image only if it survives every one of
them. Headline rows add AutoAttack (standard) on the first {plan.autoattack_examples}: its APGD-CE and APGD-T are the
main evaluation's, FAB-T and Square run on every clean-correct image of those, and an image survives
AutoAttack if none of the four fools it; in brackets, the worst case over AutoAttack and everything else
on those images. Route flips: the share of images whose route the router attack changes; busiest
expert: the share of clean test routes that go to the most used expert (100 % is a router collapsed
to one expert, a dense model of the expert's width in effect). Mean ± standard deviation over a row's
runs: its seeds, and any seed trained again (a repeat: training is not bitwise reproducible here,
so it is another draw of the row, not a copy).

![frontier]({png.name})

{table(grouped)}

{chr(10).join('- ' + line for line in verdicts(grouped))}
"""
    atomic_write_text(report, text)
    return text


def _pair(above: float, below: float) -> str:
    """Two accuracies as "a % against b %", with the decimals that tell them apart (a single run
    of 1,000 images against a row's mean can differ by a few hundredths)."""
    digits = 1 if round(100 * above, 1) != round(100 * below, 1) else 2
    return f"{100 * above:.{digits}f} % against {100 * below:.{digits}f} %"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print the rows and the estimated cost, start nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from the results there are")
    parser.add_argument("--preset", default=Plan.preset)
    parser.add_argument("--moe-width", type=float, default=Plan.moe_width)
    parser.add_argument("--epochs", type=int, default=Plan.epochs)
    parser.add_argument("--train-examples", type=int, help="default: the full training set")
    parser.add_argument("--eval-examples", type=int, default=Plan.eval_examples)
    parser.add_argument("--autoattack-examples", type=int, default=Plan.autoattack_examples)
    parser.add_argument("--select-examples", type=int, default=Plan.select_examples,
                        help="--ship: the validation images per seed its choice of seed is made on")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Plan.seeds))
    parser.add_argument("--headline-seeds", type=int, nargs="+", default=list(Plan.headline_seeds))
    parser.add_argument("--repeat", type=int, default=Plan.repeat, metavar="K",
                        help="train the runs again as ROW-seedS-repeatK, beside the first: training on a CPU is not "
                        "bitwise reproducible, so a repeat is another draw of its row, and the report pools it")
    parser.add_argument("--rows", nargs="+", help="only these rows (keys from --plan)")
    parser.add_argument("--data-dir", metavar="DIR", help="the data set's folder: CIFAR-10/100, SVHN and Tiny ImageNet "
                        "need it (nothing is downloaded); Fashion-MNIST defaults to Debian's files")
    parser.add_argument("--runs", help=f"the run folders (default: {Plan.runs}, {Plan.runs}_DATASET for another data set)")
    parser.add_argument("--results", help=f"the result files' folder (default: {RESULTS}, "
                        f"{RESULTS}_DATASET for another data set than Fashion-MNIST's)")
    parser.add_argument("--report", help=f"the report (default: {REPORT}, {RESULTS}_DATASET.md for another data set)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--eval-processes", type=int, default=Plan.eval_processes, metavar="P",
                        help="shard each evaluation over P CPU processes, --threads split between them (the same "
                        "results; on a 2-core CPU, 2 run APGD 1.18x faster than 1); CPU only")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="training settings for every run of this call (TOML values: attack_steps=3); give them a "
                        "--variant name to measure them beside the study's runs")
    parser.add_argument("--variant", metavar="NAME", help="run the rows as rows of their own, ROW-NAME, trained with "
                        "the --set settings and --epochs")
    parser.add_argument("--ship", metavar="DEST", help="copy the best MoE run to DEST (e.g. checkpoints/fmnist-moe) with "
                        "its study numbers in metrics.json; trains nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    where = {"data_dir": args.data_dir} if args.data_dir else {}  # where the data is: no setting of the runs
    plan = Plan(preset=args.preset, moe_width=args.moe_width, epochs=args.epochs, train_examples=args.train_examples,
                eval_examples=args.eval_examples, autoattack_examples=args.autoattack_examples,
                select_examples=args.select_examples, seeds=tuple(args.seeds), headline_seeds=tuple(args.headline_seeds),
                overrides={**settings, **where},
                repeat=args.repeat, eval_processes=args.eval_processes)
    try:
        rows = default_rows(plan)
        base = resolve(plan.preset, **plan.overrides)
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
    results, report = Path(args.results or results), Path(args.report or report)
    command = "python -m studies.frontier " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.ship:
        try:
            ship(results, Path(plan.runs), Path(args.ship), plan=plan)
        except (ValueError, FileExistsError, advmoe.DatasetNotFoundError) as e:
            parser.exit(2, f"python -m studies.frontier: error: {e}\n")
        return 0
    if args.report_only:
        try:
            print(write_report(results, report, plan, command.strip()) or f"no results in {results}")
        except ValueError as e:
            parser.exit(2, f"python -m studies.frontier: error: {e}\n")
        return 0
    done = {p.stem for p in results.glob("*.json")}
    try:  # every row's result files are checked here, before any run starts
        costs = estimate(plan, rows, results)
    except (ValueError, advmoe.DatasetNotFoundError) as e:
        parser.exit(2, f"python -m studies.frontier: error: {e}\n")
    print_estimate(costs, done, rows, repeat=plan.repeat)
    if args.plan:
        return 0
    run_study(plan, rows, results, report)
    write_report(results, report, plan, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
