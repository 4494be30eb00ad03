"""The robustness report: its numbers come from the evaluations (per seed, paired), a matching
eval.json next to a checkpoint is reused, and the report renders again from its .json alone."""
import json
import shutil
import statistics
from dataclasses import asdict
from pathlib import Path

import pytest

from advmoe.checkpoint import WEIGHTS
from evaluation.cache import file_sha256
from evaluation.robustness import EvalSettings
from helpers import fmnist_moe_checkpoint
from studies import evaluations, robustness
from studies.cost import PASSES, gradient_passes
from studies.robustness_tables import accuracy_table, collapsed_seeds, drop_table, drops

COMMITTED = Path(__file__).parents[2] / "reports" / "fmnist_robustness.json"


def run(seed: int, clean: float, pgd10: float, autoattack: float, moe: bool = True, share=(0.5, 0.5)) -> dict:
    """One run as the report's .json holds it."""
    accuracy = {"clean": clean, "pgd-10": pgd10, "pgd-50": pgd10, "autoattack": autoattack, "square": autoattack,
                "robust": autoattack} | ({"route-fixed": autoattack, "router": pgd10} if moe else {})
    return {"seed": seed, "checkpoint": f"runs/{seed}/best", "moe": moe, "accuracy": accuracy,
            "robust_accuracy": autoattack, "pgd_2000": pgd10,
            "sanity": {"passed": True, "failed": [], "checks": [{"name": "a check", "passed": True, "detail": ""}]},
            "experts": {"clean_share": list(share)} if moe else None,
            "router": {"route_flip_rate": 0.25, "prediction_flip_given_route_flip": 0.5} if moe else None,
            "autoattack_flags": [], "throughput": {"clean": 1000.0, "pgd-10": 40.0, "autoattack": 0.2},
            "seconds": 60.0, "cpu_seconds": 60.0}


def report_document() -> dict:
    estimate = {"cifar_pass_seconds": {"forward_backward": 0.025, "forward": 0.006},
                "scenario": robustness.CIFAR, "cpu_hours": 120.0, "suite_extra_cpu_hours": 15.0,
                "suite_gradient_passes": 210.0,
                "components": {"apgd-ce": {"gradient_passes": 100, "forward_passes": 0, "attacked": 8500.0,
                                           "cpu_hours": 6.0, "fmnist_measured_over_counted": 1.1}}}
    return {"command": "python -m studies.robustness", "eps": 0.1, "examples": 25, "seeds": [0, 1],
            "runs_dir": "runs/report", "threads": 1, "seconds": 0.0,
            "versions": {"pyautoattack": "0.2.0", "torch": "2"},
            "runs": {"dense PGD-AT": [run(0, 0.6, 0.5, 0.45, moe=False), run(1, 0.8, 0.5, 0.5, moe=False)],
                     "AdvMoE": [run(0, 0.7, 0.6, 0.4, share=(0.95, 0.05)), run(1, 0.7, 0.5, 0.4)]},
            "also": [], "cifar10_estimate": estimate}


def row(table: str, label: str) -> list[str]:
    return next(line for line in table.splitlines() if line.startswith(f"| {label} |")).strip("| ").split(" | ")[1:]


def test_drops_are_paired_per_seed():
    docs = [{"accuracy": {"pgd-10": 0.6, "autoattack": 0.5, "robust": 0.4}},
            {"accuracy": {"pgd-10": 0.4, "autoattack": 0.35, "robust": 0.3}}]
    d = drops(docs)
    assert d["autoattack"] == pytest.approx((7.5, statistics.stdev([10, 5])))
    assert d["robust"][0] == pytest.approx(15.0)


def test_the_tables_are_means_over_seeds_and_dense_models_have_no_route_columns():
    runs = report_document()["runs"]
    assert row(accuracy_table(runs), "dense PGD-AT")[:4] == ["70.0 ± 14.1", "50.0 ± 0.0", "50.0 ± 0.0", "47.5 ± 3.5"]
    assert row(accuracy_table(runs), "dense PGD-AT")[4:6] == ["n/a", "n/a"]
    assert row(drop_table(runs), "dense PGD-AT") == ["2.5 ± 3.5", "2.5 ± 3.5", "dense", "2.5 ± 3.5", "dense", "dense",
                                                     "2 of 2"]
    assert row(drop_table(runs), "AdvMoE")[:2] == ["15.0 ± 7.1", "15.0 ± 7.1"]
    assert row(drop_table(runs), "AdvMoE")[4:6] == ["25.0 ± 0.0", "50.0 ± 0.0"]
    assert collapsed_seeds(runs["AdvMoE"]) == 1


def test_the_report_renders_again_from_its_json_alone(tmp_path):
    doc = report_document()
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert robustness.main(["--report-only", "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert row(text, "AdvMoE")[:4] == ["70.0 ± 0.0", "55.0 ± 7.1", "55.0 ± 7.1", "40.0 ± 0.0"]
    assert json.loads((tmp_path / "r.json").read_text()) == doc


def test_report_only_refuses_a_json_that_lacks_what_the_report_shows(tmp_path):
    shutil.copy(COMMITTED, tmp_path / "r.json")  # written before the .json held every number of the report
    with pytest.raises(SystemExit):
        robustness.main(["--report-only", "--out", str(tmp_path / "r.md")])
    assert not (tmp_path / "r.md").exists()


def test_the_cost_model_counts_the_passes_of_the_committed_estimate():
    estimate = json.loads(COMMITTED.read_text())["cifar10_estimate"]
    for name, c in estimate["components"].items():
        assert PASSES[name] == (c["gradient_passes"], c["forward_passes"])
    suite = estimate["suite_extra_cpu_hours"] * 3600 / (estimate["scenario"]["images"]
                                                        * estimate["cifar_pass_seconds"]["forward_backward"])
    assert gradient_passes(robustness.SUITE) == pytest.approx(suite)


def test_runs_are_labelled_from_the_methods_table_and_their_architecture():
    assert robustness.run_label({"architecture": "resnet18", "training": {"method": "pgd-at"}}) == "dense PGD-AT"
    assert robustness.run_label({"architecture": "moe_resnet18", "training": {"method": "moe-at"}}) == "MoE-AT"
    assert robustness.run_label({"architecture": "moe_resnet18", "training": {"method": "advmoe", "router_loss": "model"}}
                                ) == "AdvMoE, router loss model"


def test_an_eval_json_of_the_same_checkpoint_and_settings_is_reused(tmp_path, monkeypatch):
    best = fmnist_moe_checkpoint(tmp_path)
    kept = {"checkpoint_sha256": file_sha256(best / WEIGHTS), "split": "test", "first_examples": 25,
            "settings": json.loads(json.dumps(asdict(EvalSettings(eps=0.1)))), "accuracy": {"clean": 0.5}}
    (best / "eval.json").write_text(json.dumps(kept))
    evaluated = []
    monkeypatch.setattr(evaluations, "evaluate_in_processes", lambda *a, **k: evaluated.append(k) or {})
    assert robustness.evaluate(best, 25, 0.1, log=lambda *a: None)["accuracy"] == {"clean": 0.5}
    assert evaluated == []
    for n, eps in ((25, 0.05), (20, 0.1)):  # another budget, other images: evaluated again, next to the checkpoint
        robustness.evaluate(best, n, eps, log=lambda *a: None)
        assert (evaluated[-1]["n_examples"], evaluated[-1]["eps"], Path(evaluated[-1]["out"])) == (n, eps, best)
