"""The frontier study's verdicts on planted results: each comparison weighed against the seed spread,
what width buys the dense line, the twin, the best MoE row, collapsed routers, the validation
curves and the masking check, checked by the typed findings' numbers."""
from dataclasses import replace

import pytest

from planted import curve_of, planted
from studies.record import best_row, router_collapsed
from studies.verdicts import Comparison, curve, falls, verdicts

SPREAD_OF_TWO = 0.01 / 2 ** 0.5  # the standard deviation of two runs 1 point apart


def _comparison(found, row: str, other: str) -> Comparison:
    [c] = [c for c in found.comparisons if (c.row, c.other) == (row, other)]
    return c


@pytest.mark.parametrize("moe_worst, difference, spread, beats", [
    ([0.75, 0.76], 0.04, SPREAD_OF_TWO, True),
    ([0.715, 0.74], 0.0125, 2.5 * SPREAD_OF_TWO, False),  # the MoE row's own spread is the larger
    ([0.65, 0.66], -0.06, SPREAD_OF_TWO, False),
])
def test_a_comparison_weighs_the_difference_against_the_seed_spread(moe_worst, difference, spread, beats):
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "moe": planted("moe", "advmoe", 10, moe_worst, moe_worst)}
    found = verdicts(grouped)
    c = found.comparisons[0]
    assert found.best == "moe" and (c.row, c.other, c.against) == ("moe", "dense", "dense, equal MACs")
    assert (c.mean, c.other_mean) == (pytest.approx(sum(moe_worst) / 2), pytest.approx(0.715))
    assert c.difference == pytest.approx(difference) and c.spread == pytest.approx(spread)
    assert (c.beats, c.verdict, c.one_run) == (beats, "beats" if beats else "does not beat", False)
    # a loss says where: the difference under each attack both rows ran (no PGD-50, no route attacks here)
    assert c.by_attack == ({} if beats else {"clean": pytest.approx(0), "pgd-10": pytest.approx(0),
                                             "apgd": pytest.approx(difference)})


def test_width_buys_the_dense_line_and_the_moe_row_keeps_a_share_of_its_twin():
    grouped = {"dense-wide": planted("dense-wide", "pgd-at", 28, [0.77, 0.79], [0.77, 0.79]),
               "dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72], width=0.15625),
               "moe": planted("moe", "advmoe", 10, [0.58, 0.60], [0.58, 0.60])}
    found = verdicts(grouped)
    c = found.comparisons[0]
    assert (c.row, c.other, c.verdict) == ("moe", "dense", "does not beat") and c.difference == pytest.approx(-0.125)
    w = found.width
    assert w["rows"] == [(11, pytest.approx(0.715)), (28, pytest.approx(0.78))]
    assert w["macs_ratio"] == pytest.approx(28 / 11) and w["rise"] == pytest.approx(0.065)
    assert w["spread"] == pytest.approx(2 * SPREAD_OF_TWO) and w["capacity_limits"] is True
    t = found.twin  # the dense model of the MoE model's own width, the one it was cut from
    assert (t["row"], t["twin"]) == ("moe", "dense-wide") and t["macs_ratio"] == pytest.approx(10 / 28)
    assert (t["worst"], t["twin_worst"]) == (pytest.approx(0.59), pytest.approx(0.78))
    assert t["kept"] == pytest.approx(0.59 / 0.78) and round(100 * t["kept"]) == 76
    # a flat dense line: width buys no more than the seed spread
    grouped["dense-wide"] = planted("dense-wide", "pgd-at", 28, [0.70, 0.71], [0.70, 0.71])
    w = verdicts(grouped).width
    assert w["rise"] == pytest.approx(-0.01) and w["spread"] == pytest.approx(SPREAD_OF_TWO)
    assert w["capacity_limits"] is False
    del grouped["dense-wide"]  # one dense row and no twin: neither finding
    found = verdicts(grouped)
    assert found.width is None and found.twin is None


def test_the_moe_row_meets_every_dense_method_of_its_macs_but_only_pgd_at_draws_the_line():
    """A dense TRADES variant at the MoE model's MACs is a second bar to beat, the more robust of
    the two first; width and the twin stay with the study's dense PGD-AT rows."""
    grouped = {"dense-wide": planted("dense-wide", "pgd-at", 28, [0.70, 0.71], [0.70, 0.71]),
               "dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72], width=0.15625),
               "dense-kl": planted("dense-kl", "trades", 11, [0.60, 0.62], [0.60, 0.62], width=0.15625, variant="kl"),
               "dense-wide-kl": planted("dense-wide-kl", "trades", 28, [0.9, 0.9], [0.9, 0.9], variant="kl"),
               "moe": planted("moe", "advmoe", 10, [0.61, 0.63], [0.61, 0.63])}
    found = verdicts(grouped)
    equal = [c for c in found.comparisons if c.against == "dense, equal MACs"]
    assert [(c.row, c.other, c.verdict) for c in equal] == [("moe", "dense", "does not beat"),
                                                            ("moe", "dense-kl", "does not beat")]
    assert (equal[1].mean, equal[1].other_mean) == (pytest.approx(0.62), pytest.approx(0.61))
    assert equal[1].difference == pytest.approx(0.01) and equal[1].spread == pytest.approx(2 * SPREAD_OF_TWO)
    assert found.width["rows"] == [(11, pytest.approx(0.715)), (28, pytest.approx(0.705))]  # no TRADES row in it
    assert found.twin["twin"] == "dense-wide" and found.twin["macs_ratio"] == pytest.approx(10 / 28)
    grouped["dense-kl"] = planted("dense-kl", "trades", 11, [0.55, 0.56], [0.55, 0.56], width=0.15625, variant="kl")
    found = verdicts(grouped)
    assert _comparison(found, "moe", "dense-kl").verdict == "beats"
    # each variant against the row it varies
    kl = _comparison(found, "dense-kl", "dense")
    assert kl.against == "its base row" and (kl.mean, kl.other_mean) == (pytest.approx(0.555), pytest.approx(0.715))
    assert kl.difference == pytest.approx(-0.16) and kl.spread == pytest.approx(SPREAD_OF_TWO)
    assert abs(kl.difference) > kl.spread and not kl.beats  # worse by more than the spread
    assert _comparison(found, "dense-wide-kl", "dense-wide").against == "its base row"
    grouped["moe-ce"] = planted("moe-ce", "advmoe", 10, [0.63, 0.63], [0.63, 0.63], variant="ce")
    found = verdicts(grouped)
    ce = _comparison(found, "moe-ce", "moe")
    assert ce.difference == pytest.approx(0.01) and ce.spread == pytest.approx(2 * SPREAD_OF_TWO)
    assert ce.verdict == "does not beat" and found.best == "moe-ce"
    # MoE-AT under either loss is a bar for the best MoE row
    grouped["moe-at"] = planted("moe-at", "moe-at", 10, [0.60, 0.61], [0.60, 0.61])
    grouped["moe-at-ce"] = planted("moe-at-ce", "pgd-at", 10, [0.62, 0.63], [0.62, 0.63], variant="ce",
                                   model="moe_resnet18")
    found = verdicts(grouped)
    joint = [c for c in found.comparisons if c.against == "MoE-AT"]
    assert [(c.row, c.other, c.verdict) for c in joint] == [("moe-ce", "moe-at", "beats"),
                                                            ("moe-ce", "moe-at-ce", "does not beat")]
    assert [c.difference for c in joint] == [pytest.approx(0.025), pytest.approx(0.005)]
    del grouped["moe-at"], grouped["moe-at-ce"], grouped["moe"]
    # a variant of a row without results: nothing to weigh it against
    assert not [c for c in verdicts(grouped).comparisons if c.row == "moe-ce" and c.against == "its base row"]


def test_a_longer_schedule_is_weighed_against_dense_rows_of_the_same_schedule():
    """Ten epochs help a dense model too: the best MoE row meets the dense row of its own epochs, and
    a MoE row trained longer meets the dense row trained as long, not the other way round."""
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "dense-e10": planted("dense-e10", "pgd-at", 11, [0.74], [0.74], variant="e10", epochs=10),
               "moe": planted("moe", "advmoe", 10, [0.68, 0.69], [0.68, 0.69]),
               "moe-ce": planted("moe-ce", "advmoe", 10, [0.60, 0.62], [0.60, 0.62], variant="ce"),
               "moe-ce_e10": planted("moe-ce_e10", "advmoe", 10, [0.75], [0.75], variant="ce_e10", epochs=10)}
    found = verdicts(grouped)
    same_macs = [c for c in found.comparisons if c.against.startswith("dense, equal MACs")]
    assert [(c.row, c.other, c.against) for c in same_macs] == [
        ("moe", "dense", "dense, equal MACs"), ("moe-ce_e10", "dense-e10", "dense, equal MACs, 10 epochs")]
    assert same_macs[0].verdict == "does not beat" and same_macs[0].difference == pytest.approx(-0.03)
    longer = same_macs[1]  # ahead, but one run on each side: no verdict either way
    assert (longer.one_run, longer.beats, longer.verdict) == (True, False, "one run: no spread yet")
    assert (longer.mean, longer.other_mean, longer.difference) == (0.75, 0.74, pytest.approx(0.01))
    assert longer.by_attack == {"clean": 0, "pgd-10": 0, "apgd": pytest.approx(0.01)}
    # a variant of a variant is weighed against the variant it extends, not the plain row
    nested = _comparison(found, "moe-ce_e10", "moe-ce")
    assert nested.against == "its base row" and nested.one_run and nested.difference == pytest.approx(0.14)
    assert _comparison(found, "dense-e10", "dense").difference == pytest.approx(0.025)
    # a longer MoE row without a dense row of its schedule meets none; the best row falls back to the nearest in MACs
    found = verdicts({k: runs for k, runs in grouped.items() if k != "dense-e10"})
    assert not [c for c in found.comparisons if c.against.startswith("dense, equal MACs, ")]
    found = verdicts({k: runs for k, runs in grouped.items() if k != "dense"})
    assert (found.comparisons[0].row, found.comparisons[0].other, found.comparisons[0].against) == (
        "moe", "dense-e10", "dense, equal MACs")
    assert found.comparisons[0].difference == pytest.approx(0.685 - 0.74)


def test_a_longer_best_row_leaves_the_twin_and_moe_at_to_the_best_row_of_their_schedule():
    """When a row trained longer becomes the best MoE row, the study's own rows (the twin, MoE-AT,
    the dense row of the MoE model's MACs) are still weighed against the best mixture of theirs."""
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72], width=0.15625),
               "dense-wide": planted("dense-wide", "pgd-at", 28, [0.70, 0.71], [0.70, 0.71]),
               "dense-e10": planted("dense-e10", "pgd-at", 11, [0.74, 0.75], [0.74, 0.75], width=0.15625,
                                    variant="e10", epochs=10),
               "moe": planted("moe", "advmoe", 10, [0.68, 0.69], [0.68, 0.69]),
               "moe-at": planted("moe-at", "moe-at", 10, [0.60, 0.61], [0.60, 0.61]),
               "moe-e10": planted("moe-e10", "advmoe", 10, [0.72, 0.73], [0.72, 0.73], variant="e10", epochs=10)}
    grouped["moe-e10"][1].pgd_minus_worst = 0.15  # its PGD gap misses the target; the 5-epoch row's meets it
    found = verdicts(grouped)
    assert found.best == "moe-e10"
    first, second = found.comparisons[:2]
    assert (first.row, first.other, first.against, first.verdict) == ("moe-e10", "dense-e10", "dense, equal MACs",
                                                                      "does not beat")
    assert (first.mean, first.other_mean) == (pytest.approx(0.725), pytest.approx(0.745))
    assert (second.row, second.other, second.against, second.verdict) == ("moe", "dense", "dense, equal MACs, 5 epochs",
                                                                          "does not beat")
    assert (second.mean, second.other_mean) == (pytest.approx(0.685), pytest.approx(0.715))
    t = found.twin
    assert (t["row"], t["twin"]) == ("moe", "dense-wide") and t["kept"] == pytest.approx(0.685 / 0.705)
    assert round(100 * t["kept"]) == 97 and t["macs_ratio"] == pytest.approx(10 / 28)
    joint = [c for c in found.comparisons if c.against == "MoE-AT"]  # no MoE-AT of ten epochs to weigh moe-e10 against
    assert [(c.row, c.other, c.verdict) for c in joint] == [("moe", "moe-at", "beats")]
    assert (joint[0].mean, joint[0].other_mean) == (pytest.approx(0.685), pytest.approx(0.605))
    # the targets, for the best row of each schedule
    assert [t.row for t in found.targets] == ["moe-e10", "moe"]
    assert found.targets[0].pgd_minus_worst == pytest.approx(0.08) and found.targets[0].met["pgd_gap"] is False
    assert found.targets[1].pgd_minus_worst == pytest.approx(0.045) and found.targets[1].met["pgd_gap"] is True
    assert found.targets[1].route_flips == pytest.approx(0.04) and found.targets[1].met["route_flips"] is True


def test_a_row_of_one_run_is_never_weighed_against_another_rows_spread():
    """One run has no spread, and the other row's does not stand in for it: the MoE rows' runs
    differ far more than the dense rows' (10 points against 1.3 on this CPU)."""
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71], [0.71]),
               "moe": planted("moe", "advmoe", 10, [0.56], [0.56])}
    c = verdicts(grouped).comparisons[0]
    assert (c.one_run, c.beats, c.verdict) == (True, False, "one run: no spread yet")
    assert c.difference == pytest.approx(-0.15)
    assert c.by_attack == {"clean": 0, "pgd-10": 0, "apgd": pytest.approx(-0.15)}
    grouped["moe"] = planted("moe", "advmoe", 10, [0.56, 0.60], [0.56, 0.60])  # one run on the dense side only
    c = verdicts(grouped).comparisons[0]
    assert c.one_run and c.difference == pytest.approx(-0.13)
    # ahead of one run of the other row: neither "beats" nor "does not beat", whatever the difference
    grouped["moe"] = planted("moe", "advmoe", 10, [0.80, 0.81], [0.80, 0.81])
    c = verdicts(grouped).comparisons[0]
    assert (c.one_run, c.beats, c.verdict) == (True, False, "one run: no spread yet")
    assert (c.mean, c.other_mean, c.difference) == (pytest.approx(0.805), 0.71, pytest.approx(0.095))
    assert c.by_attack == {"clean": 0, "pgd-10": 0, "apgd": pytest.approx(0.095)}
    grouped["dense"] = planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72])
    c = verdicts(grouped).comparisons[0]
    assert (c.one_run, c.verdict, c.by_attack) == (False, "beats", {})
    # a variant of one run against the row it varies: the difference, and no verdict on it
    grouped["moe-ce"] = planted("moe-ce", "advmoe", 10, [0.50], [0.50], variant="ce")
    ce = _comparison(verdicts(grouped), "moe-ce", "moe")
    assert (ce.one_run, ce.verdict) == (True, "one run: no spread yet") and ce.difference == pytest.approx(-0.305)


def test_the_best_moe_row_is_one_of_two_runs_or_more_and_a_better_single_run_is_named():
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "moe": planted("moe", "advmoe", 10, [0.60, 0.62], [0.60, 0.62]),
               "moe-lucky": planted("moe-lucky", "advmoe", 10, [0.68], [0.68], variant="lucky"),
               "moe-poor": planted("moe-poor", "advmoe", 10, [0.50], [0.50], variant="poor")}
    moe_rows = ("moe", "moe-lucky", "moe-poor")
    assert best_row({k: grouped[k] for k in moe_rows}) == "moe"
    found = verdicts(grouped)
    assert found.best == "moe" and found.ahead_on_one_run == ["moe-lucky"]  # not moe-poor, below it
    assert (found.comparisons[0].row, found.comparisons[0].other) == ("moe", "dense")
    # a run a few hundredths over the row's mean of 61 % is above it
    grouped["moe-close"] = planted("moe-close", "advmoe", 10, [0.6103], [0.6103], variant="close")
    assert verdicts(grouped).ahead_on_one_run == ["moe-lucky", "moe-close"]
    grouped["moe-lucky"].append(replace(grouped["moe-lucky"][0], seed=1))  # a second run: now it is the best row
    assert best_row({k: grouped[k] for k in moe_rows}) == "moe-lucky"
    found = verdicts(grouped)
    assert found.best == "moe-lucky" and (found.comparisons[0].row, found.comparisons[0].verdict) == (
        "moe-lucky", "does not beat")
    assert found.ahead_on_one_run == []  # moe-close is above moe, not above the best row
    # where no row has two runs yet, the best single run is the best row
    assert best_row({k: grouped[k][:1] for k in ("moe", "moe-poor")}) == "moe"


def test_a_collapsed_moe_row_is_not_the_best_moe_row_whatever_its_accuracy():
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72], width=0.15625),
               "moe-at": planted("moe-at", "moe-at", 10, [0.62, 0.62], [0.62, 0.62], busiest=1.0),
               "advmoe": planted("advmoe", "advmoe", 10, [0.56, 0.57], [0.58, 0.59])}
    assert router_collapsed(grouped["moe-at"]) == 1.0
    assert router_collapsed(grouped["advmoe"]) is None and router_collapsed(grouped["dense"]) is None
    found = verdicts(grouped)
    assert found.collapsed == {"moe-at": 1.0} and found.best == "advmoe"
    assert [(c.row, c.other, c.against, c.verdict) for c in found.comparisons] == [
        ("advmoe", "dense", "dense, equal MACs", "does not beat"), ("advmoe", "moe-at", "MoE-AT", "does not beat")]
    # every row collapsed: the best of them is still judged, and named collapsed
    found = verdicts({k: grouped[k] for k in ("dense", "moe-at")})
    assert found.best == "moe-at" and found.collapsed == {"moe-at": 1.0}
    assert [(c.row, c.other) for c in found.comparisons] == [("moe-at", "dense")]


@pytest.mark.parametrize("pgd, state, last_epoch", [
    ((0.55, 0.63, 0.657), "still rising", 0.027),
    ((0.55, 0.63, 0.635), "levelled off", 0.005),
    ((0.53, 0.629, 0.32), "peaked at epoch 2, fell after", -0.309),
])
def test_the_curve_says_whether_validation_robustness_levelled_off(pgd, state, last_epoch):
    found = curve(planted("advmoe", "advmoe", 10, [0.56], [0.58], curve=pgd))
    assert (found.row, found.state, found.pgd) == ("advmoe", state, list(pgd))
    assert found.pgd[-1] - found.pgd[-2] == pytest.approx(last_epoch)
    assert found.route_fixed is None and found.falls == []  # a run from before validation ran route-fixed


def test_the_curve_names_a_seed_whose_validation_robustness_fell_for_an_epoch():
    """The row's mean of 0.744 and 0.217 would read as a dip to 46.5 %; the fall names the seed, and how far."""
    runs = planted("dense", "pgd-at", 11, [0.72, 0.73], [0.72, 0.73])
    runs[0].curve = curve_of((0.69, 0.744, 0.217, 0.744, 0.759))
    runs[1].curve = curve_of((0.70, 0.72, 0.713, 0.74, 0.735))
    found = curve(runs)
    assert found.falls == [("0", 3, 0.744, 0.217, 0.744)] and found.state == "levelled off"
    assert found.pgd == pytest.approx([0.695, 0.732, 0.465, 0.742, 0.747])
    assert curve(runs[:1]).falls == [] and falls(runs[:1]) == [("0", 3, 0.744, 0.217, 0.744)]  # one run: its curve shows it
    runs[0].repeat = 1
    assert falls(runs) == [("0 (repeat 1)", 3, 0.744, 0.217, 0.744)]
    runs[0].curve[2]["val_pgd_accuracy"] = 0.6  # 14 points: a swing, not a fall
    assert curve(runs).falls == []


def test_the_curve_adds_validation_route_fixed_accuracy_where_every_run_has_it():
    runs = planted("advmoe", "advmoe", 10, [0.56, 0.6], [0.58, 0.6])
    runs[0].curve = curve_of((0.6, 0.7, 0.705), route_fixed=(0.5, 0.55, 0.6))
    runs[1].curve = curve_of((0.6, 0.7, 0.705), route_fixed=(0.4, 0.45, 0.5))
    assert curve(runs).route_fixed == pytest.approx([0.45, 0.5, 0.55])
    runs[1].curve[0]["val_route_fixed_accuracy"] = None  # a run resumed across the change
    assert curve(runs).route_fixed is None


def test_a_failed_masking_check_of_autoattack_is_a_finding():
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "moe": planted("moe", "advmoe", 10, [0.56, 0.57], [0.58, 0.59])}
    passed = {"passed": True, "detail": "0 of 500 examples fooled by Square only"}
    grouped["moe"][0].autoattack = {"accuracy": 0.55, "worst_case_with_main": 0.54, "square_check": passed}
    assert verdicts(grouped).masking == []
    failed = {"passed": False, "detail": "12 of 500 examples fooled by Square only"}
    grouped["moe"][1].autoattack = {"accuracy": 0.55, "worst_case_with_main": 0.54, "square_check": failed}
    assert verdicts(grouped).masking == [("moe", 1, "12 of 500 examples fooled by Square only")]


@pytest.mark.parametrize("moe_worst, met", [
    ([0.72, 0.73], None),  # two runs: not yet weighable
    ([0.72, 0.73, 0.725], True),
    ([0.74, 0.745, 0.70], False),  # std 2.5 points, the low run 3.2 under the mean
    ([0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.715], False),  # std 1.1 points, but one run 3.2 under
])
def test_the_seeds_target_weighs_the_spread_and_the_lowest_run_over_three_runs_or_more(moe_worst, met):
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "moe": planted("moe", "advmoe", 10, moe_worst, moe_worst)}
    [t] = verdicts(grouped).targets
    mean = sum(moe_worst) / len(moe_worst)
    assert (t.runs, t.lowest_under_mean) == (len(moe_worst), pytest.approx(mean - min(moe_worst)))
    assert t.met["seeds"] is met
