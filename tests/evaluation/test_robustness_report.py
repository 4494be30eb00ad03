"""The robustness report's comparisons are computed from the evaluations, per seed and paired."""
import pytest

from evaluation.robustness_report import ADVMOE, DENSE, aa_verdict, drops


def doc(pgd10: float, autoattack: float, robust: float) -> dict:
    return {"accuracy": {"pgd-10": pgd10, "autoattack": autoattack, "robust": robust}}


def test_drops_are_paired_per_seed():
    d = drops([doc(0.6, 0.5, 0.4), doc(0.4, 0.35, 0.3)])
    assert d["autoattack"][0] == pytest.approx(7.5) and d["robust"][0] == pytest.approx(15.0)


@pytest.mark.parametrize("moe_aa, word", [(0.40, "more than"), (0.58, "less than")])
def test_the_verdict_says_which_model_autoattack_hurts_more(moe_aa, word):
    results = {ADVMOE: [doc(0.6, moe_aa, moe_aa)], DENSE: [doc(0.6, 0.55, 0.55)]}
    assert aa_verdict(results).startswith(f"AutoAttack lowers AdvMoE's robust accuracy {word} the dense baseline's")
