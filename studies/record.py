"""One run's result, as the study keeps it: a typed record, read and written here only, one JSON
file per run (reports/robustness_frontier/ROW-seedS.json), committed as it lands."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from advmoe.io import atomic_write_text
from advmoe.settings import number_text
from advmoe.stats import mean_std
from training.trainer import COLLAPSE_SHARE

from .design import Row, run_name

CURVE_KEYS = ("epoch", "val_clean_accuracy", "val_pgd_accuracy", "val_route_fixed_accuracy", "val_apgd_accuracy",
              "val_worst_accuracy", "val_train_attack_accuracy", "val_route_flip_rate", "epoch_seconds",
              "validation_seconds", "collapse_guard")


@dataclass
class RunResult:
    row: Row
    seed: int
    repeat: int  # 0: the seed's first run; K: trained again (training on a CPU is not bitwise reproducible)
    config: dict  # TrainConfig.to_dict() of the run
    macs_per_image: int
    checkpoint_sha256: str | None  # the weights these numbers are of (None: recorded before digests were)
    examples: int  # test images of the main evaluation
    accuracy: dict[str, float]  # by attack, as eval.json's "accuracy"
    worst_case: float  # per image over every attack
    pgd: str  # the PGD the gap is measured from ("pgd-10")
    pgd_minus_worst: float
    sanity_passed: bool
    sanity_failed: list[str]
    curve: list[dict]  # per epoch: CURVE_KEYS
    seconds: dict[str, float]  # "train", "eval" and, once it ran, "autoattack"
    apgd_components: dict[str, float] | None = None  # accuracy after APGD-CE, after APGD-T
    route_flip_rate: float | None = None  # MoE rows: the router attack's
    prediction_flip_given_route_flip: float | None = None
    expert_share: list[float] | None = None  # MoE rows: clean test routes per expert
    autoattack: dict | None = None  # headline rows, once it ran (run.compose_autoattack)

    @property
    def name(self) -> str:
        return run_name(self.row.key, self.seed, self.repeat)

    @property
    def run_label(self) -> str:
        """How the report names a run among its row's: its seed, and its repeat when it is one."""
        return f"{self.seed}" + (f" (repeat {self.repeat})" if self.repeat else "")

    @property
    def epochs(self) -> int:
        return self.config["epochs"]

    @classmethod
    def from_json(cls, doc: dict) -> "RunResult":
        unknown = set(doc) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys in a result file: {sorted(unknown)}")
        row = doc["row"]
        return cls(**{**doc, "row": Row(**{**row, "seeds": tuple(row["seeds"])})})

    def to_json(self) -> dict:
        doc = asdict(self)
        if not doc["row"]["settings"]:  # a row of the plan's settings: files as they were before rows had their own
            del doc["row"]["settings"]
        return doc


def read(path: Path) -> RunResult:
    try:
        return RunResult.from_json(json.loads(Path(path).read_text()))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a study result file: {e}") from None


def write(path: Path, result: RunResult) -> None:
    """One result file, written whole."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result.to_json(), indent=1) + "\n")


def load_results(results: Path) -> dict[str, list[RunResult]]:
    """{row key: its runs, by seed and repeat}, the rows by MACs per image."""
    grouped: dict[str, list[RunResult]] = {}
    for path in sorted(Path(results).glob("*.json")):
        result = read(path)
        grouped.setdefault(result.row.key, []).append(result)
    kinds = sorted({(r.config["dataset"], r.config["eps"]) for runs in grouped.values() for r in runs})
    if len(kinds) > 1:
        raise ValueError(f"{results} holds results of {len(kinds)} data sets or budgets "
                         f"({', '.join(f'{name} at ε {number_text(eps)}' for name, eps in kinds)}); one table compares one: "
                         "give each study its own --results and --report")
    for runs in grouped.values():
        runs.sort(key=lambda r: (r.seed, r.repeat))
    return dict(sorted(grouped.items(), key=lambda kv: kv[1][0].macs_per_image))


def worst(runs: list[RunResult]) -> tuple[float, float]:
    """Mean and standard deviation of a row's worst case over its runs."""
    return mean_std([r.worst_case for r in runs])


def best_row(candidates: dict[str, list[RunResult]]) -> str:
    """The row of the best mean worst case, among the rows of two runs or more where there are any: one
    lucky run of a row must not outrank a row measured several times."""
    weighable = {k: runs for k, runs in candidates.items() if len(runs) > 1} or candidates
    return max(weighable, key=lambda k: worst(weighable[k])[0])


def router_collapsed(runs: list[RunResult]) -> float | None:
    """The busiest expert's mean share of the clean test routes when it is over COLLAPSE_SHARE (a
    router that sends nearly every image to one expert: a dense model of the expert's width
    carrying dead experts), else None; None for a dense row."""
    if runs[0].expert_share is None:
        return None
    busiest = statistics.mean(max(r.expert_share) for r in runs)
    return busiest if busiest > COLLAPSE_SHARE else None
