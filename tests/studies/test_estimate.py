"""What the frontier study has cost: the hours its own runs record against the budget, and those
hours again at each row's quickest run, stage by stage."""
import pytest

from planted import planted
from studies.design import Row
from studies.estimate import BUDGET_HOURS, CURVES_BUDGET_HOURS, study_cost

ROWS = [Row("dense", "dense", "pgd-at", "resnet18", 0.25, (0, 1), headline=True),
        Row("moe", "MoE", "advmoe", "moe_resnet18", 0.25, (0, 1))]


def _timed(key: str, seed: int, repeat: int = 0, **seconds: float):
    [run] = planted(key, "pgd-at" if key.startswith("dense") else "advmoe", 10, [0.5], [0.5])
    run.seed, run.repeat, run.seconds = seed, repeat, seconds
    return run


def _grouped():
    return {"dense": [_timed("dense", 0, train=3600, eval=1800),
                      _timed("dense", 1, train=1800, eval=1800, autoattack=1800),
                      _timed("dense", 2, train=9000),  # an extra seed
                      _timed("dense", 1, repeat=1, train=9000, eval=900)],  # the seed trained again
            "moe": [_timed("moe", 0, train=7200, eval=3600)],
            "moe-e10": [_timed("moe-e10", 0, train=900, eval=900)]}  # a variant: other work, never the quickest


def test_the_study_cost_counts_its_own_runs_against_the_budget_and_at_each_rows_quickest_run():
    cost = study_cost(_grouped(), ROWS)
    # recorded: the rows' own seeds only, 1.5 + 1.5 + 3 hours
    assert (cost["runs_finished"], cost["runs_planned"], cost["rows_started"], cost["rows"]) == (3, 4, 2, 2)
    assert cost["hours_recorded"] == pytest.approx(6.0) and cost["budget_hours"] == BUDGET_HOURS == 12
    # quickest: dense 2 x (0.5 training of seed 1 + 0.25 evaluation of the repeat + 0.5 AutoAttack);
    # MoE 2 x (2 + 1), no AutoAttack off the headline
    assert cost["hours_at_quickest"] == pytest.approx(2 * (0.5 + 0.25 + 0.5) + 2 * (2 + 1))
    assert cost["autoattack_missing"] == ["dense-seed0"]
    assert study_cost(_grouped(), ROWS, CURVES_BUDGET_HOURS)["budget_hours"] == 14


def test_the_study_cost_of_rows_not_all_started_and_of_a_headline_row_without_autoattack():
    dense_only = {"dense": [r for r in _grouped()["dense"] if "autoattack" not in r.seconds]}
    cost = study_cost(dense_only, ROWS)
    assert (cost["runs_finished"], cost["runs_planned"], cost["rows_started"], cost["rows"]) == (1, 4, 1, 2)
    assert cost["hours_recorded"] == pytest.approx(1.5) and cost["autoattack_missing"] == ["dense-seed0"]
    # no run of the row has AutoAttack: its quickest-run hours are training and evaluation alone
    assert cost["hours_at_quickest"] == pytest.approx(2 * (1 + 0.25))


def test_the_budget_is_the_cpus_and_a_study_without_its_own_runs_has_no_cost():
    grouped = _grouped()
    grouped["dense"][0].config["device"] = "cuda:0"
    assert study_cost(grouped, ROWS)["budget_hours"] is None
    assert study_cost({"moe-e10": grouped["moe-e10"]}, ROWS) is None
