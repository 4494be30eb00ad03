"""The frontier study's design: its rows (a method, a model and a width, run at some seeds), what
every run is trained with (the Plan), and where its folders go."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import advmoe
from advmoe.settings import parse_pairs
from training.config import TrainConfig, resolve
from training.methods import METHODS

RESULTS = Path("reports/robustness_frontier")
REPORT = Path("reports/robustness_frontier.md")
# the dense rows' widths go in steps of 1/64: every stage of ResNet-18 (64 to 512 channels) keeps whole channels
WIDTH_STEP = 1 / 64
# settings a row or a flag of its own sets: --set would be overridden by them without a word
ROW_SETTINGS = {"model": "the rows set it (--rows)", "width": "the rows set it (--moe-width, --rows)",
                "seed": "give seeds with --seeds and --headline-seeds", "epochs": "give it with --epochs"}
MOE_METHODS = ("moe-at", "advmoe", "route-aware")  # the MoE rows, at the MoE width
# A preset's settings as they were when the study's committed runs were trained with it: since then
# fmnist-tiny selects its checkpoint on the worst case with validation APGD (docs/training.md). The
# study keeps the old ones, so its runs stay its runs and compare; --set and a row's recipe change them.
PRESET_THEN = {"fmnist-tiny": {"val_apgd_iterations": 0, "select_on": "pgd"}}


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
    settings: dict = field(default_factory=dict)  # a curve row's own settings: its recipe, experts and router

    @property
    def is_moe(self) -> bool:
        return advmoe.is_moe_model(self.model)

    @property
    def is_dense_pgd_at(self) -> bool:
        """A dense PGD-AT row, of the study's own schedule or of a variant's: what the dense curves are
        made of (studies/curves.py groups them by how they were trained)."""
        return not self.is_moe and self.method == "pgd-at"

    @property
    def is_dense_line(self) -> bool:
        """The study's own dense PGD-AT rows: the verdict on width. Dense rows of another method or
        variant are weighed against the MoE rows but not into it."""
        return self.is_dense_pgd_at and not self.variant


@dataclass
class Plan:
    """What the study trains and evaluates; the training settings start from --preset."""

    preset: str = "fmnist-tiny"
    # 0.25: experts of 8 to 64 channels (0.125 gave 4 in the first stage); the dense rows at and
    # above the experts' own width say whether that is enough. 0.5 would cost 55 hours on 2 cores.
    moe_width: float = 0.25
    epochs: int = 5
    train_examples: int | None = None  # None: the full training set (55,000 after validation)
    eval_examples: int = 1000
    autoattack_examples: int = 500
    select_examples: int = 500  # validation images per seed for --ship's choice between seeds
    seeds: tuple[int, ...] = (0, 1)
    # Two: a third for the headline rows would take the study from about 14 to 19 hours of this
    # machine (--plan); --headline-seeds 0 1 2 adds it, resuming.
    headline_seeds: tuple[int, ...] = (0, 1)
    overrides: dict = field(default_factory=dict)  # more TrainConfig settings for every run
    attack_settings: dict = field(default_factory=dict)  # EvalSettings changes (tests: fewer steps)
    runs: str = "runs/frontier"
    repeat: int = 0  # K > 0: the runs trained again, beside the first (run_name)
    # Evaluations sharded over this many CPU processes, the threads split between them: on a 2-core
    # CPU two one-thread processes run APGD 1.18x faster than one two-thread process
    # (docs/evaluation.md), with the same per-image results. Training stays in one process.
    eval_processes: int = 1
    # The curves (--curves): dense PGD-AT at every dense width, and the MoE method at every MoE width
    # with each number of experts; at the narrowest MoE width, where the router is the largest share
    # of the MACs (58 % at 1/8), each router too. The widths go from one where the dense worst case
    # clearly falls with width (1/32: 0.46 M MACs) to the twin of the widest MoE row.
    curves: bool = False
    dense_widths: tuple[float, ...] = (1 / 32, 3 / 64, 1 / 16, 3 / 32, 1 / 8, 5 / 32, 13 / 64, 1 / 4)
    moe_widths: tuple[float, ...] = (1 / 8, 3 / 16, 1 / 4)
    experts: tuple[int, ...] = (2, 4)  # 4: the same MACs per image, twice the expert parameters
    routers: tuple[tuple[int, int], ...] = ((1, 8), (2, 8))  # (blocks per stage, first-stage channels)
    # the MoE rows' training: the best MoE row of the 5-epoch study, whose runs are reused
    curve_method: str = "advmoe"
    curve_recipe: tuple[str, tuple[tuple[str, object], ...]] = ("ce_steps3", (("expert_loss", "ce"), ("attack_steps", 3)))

    def base(self, below: dict | None = None, **settings) -> TrainConfig:
        """The preset as the study trains it (PRESET_THEN), then `below`, --set and `settings`, each
        over the ones before."""
        return resolve(self.preset, **{**PRESET_THEN.get(self.preset, {}), **(below or {}), **self.overrides, **settings})

    def config(self, row: Row, seed: int) -> TrainConfig:
        # --set wins over a row's recipe (and may not change its experts or router: frontier.plan_from)
        cfg = self.base(row.settings, method=row.method, model=row.model, width=row.width, seed=seed, epochs=self.epochs)
        return replace(cfg, train_examples=self.train_examples).validate()  # None: every training image


def run_name(key: str, seed: int, repeat: int = 0) -> str:
    """The run folder and result file name of a row's seed; a repeat (the seed trained again) gets
    its own, beside the first."""
    return f"{key}-seed{seed}" + (f"-repeat{repeat}" if repeat else "")


def parse_settings(pairs: list[str]) -> dict:
    """--set's KEY=VALUE pairs as TrainConfig overrides, each value read as TOML (3, 0.1, true, "name")."""
    settings = parse_pairs(pairs, "--set", example="attack_steps=3")
    for key in settings.keys() & ROW_SETTINGS.keys():
        raise ValueError(f"--set {key}: {ROW_SETTINGS[key]}")
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
        named = METHODS[method].label if method in METHODS else method
        if row.is_moe and "MoE" not in named:  # PGD-AT of the MoE model is no dense row
            named = f"MoE {named}"
        return row.label.replace(METHODS[row.method].label, named, 1)
    return [replace(row, key=f"{row.key}-{name}", label=f"{label(row)} ({name}: {changed})",
                    method=method or row.method, variant=name) for row in rows]


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
    there are still three); MoE-AT, AdvMoE and route-aware training at the MoE width. With
    plan.curves, the curves' rows after them (curve_rows)."""
    base = plan.base()
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
    rows += [Row(f"{method}-w{plan.moe_width:g}", f"{METHODS[method].label}, width {plan.moe_width:g}", method, moe,
                 plan.moe_width, plan.headline_seeds, headline=True) for method in MOE_METHODS if method in METHODS]
    if plan.curves:
        rows += [row for row in curve_rows(plan) if row.key not in {r.key for r in rows}]
    return rows


MOE_SETTINGS = ("num_experts", "router_blocks", "router_width")  # what a curve row sets on its own


def curve_rows(plan: Plan) -> list[Row]:
    """The curves' rows: dense PGD-AT at plan.dense_widths (the keys of the study's own dense rows,
    so theirs are reused), and plan.curve_method with plan.curve_recipe at plan.moe_widths, with each
    of plan.experts and the preset's router; at the narrowest MoE width, each of plan.routers too."""
    base = plan.base()
    dense, moe = advmoe.dense_twin(base.model), base.model
    rows = [Row(f"pgd-at-w{w:g}", f"dense PGD-AT, width {w:g}", "pgd-at", dense, w, plan.seeds) for w in plan.dense_widths]
    name, recipe = plan.curve_recipe[0], dict(plan.curve_recipe[1])
    changed = ", ".join(f"{k}={v}" for k, v in recipe.items())
    label = METHODS[plan.curve_method].label
    points = [(w, n, (base.router_blocks, base.router_width)) for w in plan.moe_widths for n in plan.experts]
    points += [(min(plan.moe_widths), plan.experts[0], r) for r in plan.routers]
    for width, experts, (blocks, channels) in dict.fromkeys(points):  # in order, once each
        own = {"num_experts": experts} if experts != base.num_experts else {}
        if (blocks, channels) != (base.router_blocks, base.router_width):
            own |= {"router_blocks": blocks, "router_width": channels}
        key = f"{plan.curve_method}-w{width:g}" + (f"-x{experts}" if "num_experts" in own else "")
        key += f"-router{blocks}x{channels}" if "router_blocks" in own else ""
        words = [f"width {width:g}"] + ([f"{experts} experts"] if "num_experts" in own else [])
        words += [f"router {blocks} block(s) of {channels}"] if "router_blocks" in own else []
        rows.append(Row(f"{key}-{name}", f"{label}, {', '.join(words)} ({name}: {changed})", plan.curve_method, moe,
                        width, plan.seeds, variant=name, settings={**recipe, **own}))
    return rows


def default_paths(dataset: str) -> tuple[Path, Path, Path]:
    """Where a study of `dataset` keeps its run folders, result files and report: Fashion-MNIST's
    the project's own, any other data set's beside them, so no run or table mixes data sets."""
    runs = Path(Plan.runs)
    if dataset == "fashion_mnist":
        return runs, RESULTS, REPORT
    return (runs.with_name(f"{runs.name}_{dataset}"), RESULTS.with_name(f"{RESULTS.name}_{dataset}"),
            REPORT.with_name(f"{RESULTS.name}_{dataset}.md"))
