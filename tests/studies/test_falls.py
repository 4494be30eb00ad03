"""The census of one-epoch falls: which epochs count as a fall, and which kind each is, from planted
validation curves."""
import pytest

from planted import curve_of, planted
from studies.falls import census


def _run(pgd, **by_key):
    """One planted run whose epochs have validation PGD `pgd` and the other accuracies in `by_key`."""
    [run] = planted("advmoe", "advmoe", 10, [0.7], [0.7])
    run.curve = curve_of(pgd)
    for key, values in by_key.items():
        for epoch, value in zip(run.curve, values, strict=True):
            epoch[key] = value
    return run


@pytest.mark.parametrize("pgd, by_key, kind", [
    # the training attack still fails on 60 % where PGD-10 gets through on 42 %: catastrophic overfitting
    ((0.60, 0.42, 0.64), {"val_train_attack_accuracy": (0.63, 0.60, 0.66)}, "overfit"),
    # every attack fell, the training attack with them
    ((0.67, 0.49, 0.71), {"val_train_attack_accuracy": (0.68, 0.52, 0.72)}, "every attack"),
    # PGD-10 held, APGD fell: fixed-step PGD is steered off
    ((0.70, 0.73, 0.72), {"val_apgd_accuracy": (0.68, 0.48, 0.70)}, "masking"),
    # PGD-10 flipped 24 points more of the routes: the routes moved, whatever the training attack did
    ((0.70, 0.56, 0.73), {"val_train_attack_accuracy": (0.72, 0.70, 0.74), "val_route_flip_rate": (0.04, 0.28, 0.2)},
     "routes"),
    ((0.70, 0.52, 0.73), {}, "not recorded"),
])
def test_each_fall_is_named_by_what_fell_with_it(pgd, by_key, kind):
    [fall] = census({"advmoe": [_run(pgd, **by_key)]})
    assert (fall.run, fall.epoch, fall.epochs, fall.kind) == ("0", 2, 5, kind)
    assert (fall.before["pgd"], fall.after["pgd"], fall.next_pgd, fall.recovered) == (pgd[0], pgd[1], pgd[2], True)


def test_a_swing_under_ten_points_is_no_fall_and_a_last_epoch_fall_has_no_recovery():
    assert census({"advmoe": [_run((0.70, 0.61, 0.70))]}) == []
    [fall] = census({"advmoe": [_run((0.50, 0.68, 0.706, 0.70, 0.55))]})
    assert (fall.epoch, fall.next_pgd, fall.recovered) == (5, None, None)
    [fall] = census({"advmoe": [_run((0.50, 0.70, 0.45, 0.55, 0.70))]})
    assert (fall.epoch, fall.next_pgd, fall.recovered) == (3, 0.55, False)  # 15 under the epoch before: still down


def test_a_masking_fall_is_back_only_when_apgd_is_back():
    """PGD-10 held through the fall, so the next epoch's PGD-10 says nothing of a recovery: APGD's does."""
    [fall] = census({"advmoe": [_run((0.70, 0.73, 0.74), val_apgd_accuracy=(0.68, 0.48, 0.52))]})
    assert (fall.kind, fall.next_pgd, fall.recovered) == ("masking", 0.74, False)
    [fall] = census({"advmoe": [_run((0.70, 0.73, 0.74), val_apgd_accuracy=(0.68, 0.48, 0.66))]})
    assert fall.recovered is True
