"""Every one-epoch fall of a run's validation robustness across the study, and which kind it is: the
evidence for what makes a run collapse (docs/training.md, "When a run collapses")."""
from __future__ import annotations

from dataclasses import dataclass

from .record import RunResult

DROP = 0.10  # validation accuracy falling this much in one epoch is a fall
OVERFIT_GAP = 0.10  # the training attack this far above PGD-10 after a fall: the model learnt to beat its own attack
SHOWN = {"clean": "val_clean_accuracy", "pgd": "val_pgd_accuracy", "apgd": "val_apgd_accuracy",
         "train_attack": "val_train_attack_accuracy", "route_flips": "val_route_flip_rate"}


@dataclass
class Fall:
    row: str
    run: str
    epoch: int
    epochs: int
    before: dict[str, float | None]  # SHOWN's accuracies at the epoch before
    after: dict[str, float | None]  # and at the fall
    next: dict[str, float | None] | None  # SHOWN's accuracies the epoch after (None: the fall was the last epoch)

    @property
    def kind(self) -> str:
        """'routes': PGD-10 flipped DROP more of the routes than the epoch before (the gate is what moved);
        'masking': PGD-10 held while APGD fell (the gate steers fixed-step PGD off); 'overfit': the
        training attack still fails where PGD-10 succeeds (catastrophic overfitting); 'every attack': the
        training attack fell with the rest; 'not recorded': the run predates the training-attack record."""
        before, after = self.before["route_flips"], self.after["route_flips"]
        if before is not None and after is not None and after - before >= DROP:
            return "routes"
        if self.before["pgd"] - self.after["pgd"] < DROP:
            return "masking"
        if self.after["train_attack"] is None:
            return "not recorded"
        return "overfit" if self.after["train_attack"] - self.after["pgd"] >= OVERFIT_GAP else "every attack"

    @property
    def next_pgd(self) -> float | None:
        return None if self.next is None else self.next["pgd"]

    @property
    def recovered(self) -> bool | None:
        """Each accuracy that fell back within DROP of the epoch before, the next epoch (None: no next epoch)."""
        if self.next is None:
            return None
        return all(self.next[k] is not None and self.next[k] >= self.before[k] - DROP for k in _fallen(self.before, self.after))


def _fallen(before: dict, after: dict) -> list[str]:
    """Which of PGD-10 and APGD fell by DROP or more."""
    return [k for k in ("pgd", "apgd") if before[k] is not None and after[k] is not None and before[k] - after[k] >= DROP]


def run_falls(r: RunResult) -> list[Fall]:
    """Each epoch where the run's validation PGD-10 or APGD fell by DROP or more."""
    shown = [{k: e.get(key) for k, key in SHOWN.items()} for e in r.curve]
    return [Fall(r.row.label, r.run_label, r.curve[e]["epoch"], r.epochs, shown[e - 1], shown[e],
                 shown[e + 1] if e + 1 < len(shown) else None)
            for e in range(1, len(shown)) if _fallen(shown[e - 1], shown[e])]


def census(grouped: dict[str, list[RunResult]]) -> list[Fall]:
    """Every run's falls, in every row."""
    return [f for runs in grouped.values() for r in runs for f in run_falls(r)]
