"""The methods comparison: trains every contender per seed (resuming, never over another config's
run) and compares them on numbers computed from the runs."""
import json
import statistics

import pytest

from helpers import make_fashion_like
from studies import methods
from training.config import resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny training steps: a second thread only waits
TINY = dict(model="moe_resnet18", width=0.125, router_blocks=1, router_width=8, val_size=100,
            train_examples=64, val_examples=16, batch_size=32, epochs=1, eval_steps=1, eval_step=0.05,
            val_apgd_iterations=0)  # the study's plumbing is under test, not the preset's validation


def test_each_contender_trains_per_seed_once_and_is_compared(tmp_path):
    (tmp_path / "data").mkdir()
    data = make_fashion_like(tmp_path / "data")
    results = methods.run_all("fmnist-tiny", [0, 1], tmp_path / "runs", {**TINY, "data_dir": str(data)}, log=lambda *a: None)
    assert {k: [r["seed"] for r in v] for k, v in results.items()} == {
        "dense PGD-AT": [0, 1], "MoE-AT": [0, 1], "AdvMoE": [0, 1], "AdvMoE, router loss model": [0, 1]}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "advmoe-model-seed0", "advmoe-model-seed1", "advmoe-seed0", "advmoe-seed1",
        "moe-at-seed0", "moe-at-seed1", "pgd-at-seed0", "pgd-at-seed1"]
    assert results["MoE-AT"][0]["macs"] < results["dense PGD-AT"][0]["macs"]
    rows = methods.table(results).splitlines()[2:]
    assert [row.split(" | ")[:3] for row in rows] == [["| dense PGD-AT", "dense twin", "2"], ["| MoE-AT", "MoE", "2"],
                                                     ["| AdvMoE", "MoE", "2"], ["| AdvMoE, router loss model", "MoE", "2"]]
    mean_pgd = {k: 100 * statistics.mean(r["pgd"] for r in v) for k, v in results.items()}
    assert methods.compare(results, "AdvMoE", "MoE-AT")["difference"] == pytest.approx(mean_pgd["AdvMoE"] - mean_pgd["MoE-AT"])
    # A second call reuses the finished runs instead of training again.
    assert methods.run_all("fmnist-tiny", [0, 1], tmp_path / "runs", {**TINY, "data_dir": str(data)},
                           log=lambda *a: pytest.fail("retrained a finished run")) == results


def test_compare_gives_the_difference_and_the_larger_spread_in_points():
    results = {"A": [{"pgd": 0.5}, {"pgd": 0.6}], "B": [{"pgd": 0.4}, {"pgd": 0.4}]}
    assert methods.compare(results, "A", "B") == pytest.approx(
        {"first": 55.0, "second": 40.0, "difference": 15.0, "spread": 100 * statistics.stdev([0.5, 0.6])})
    assert methods.compare(results, "B", "A")["difference"] == pytest.approx(-15.0)


def test_labels_come_from_the_methods_table():
    assert [c.label for c in methods.CONTENDERS] == ["dense PGD-AT", "MoE-AT", "AdvMoE", "AdvMoE, router loss model"]


def test_a_run_of_another_config_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    data = make_fashion_like(tmp_path / "data")
    settings = {**TINY, "data_dir": str(data), "train_examples": 32}
    first = tmp_path / "runs" / "pgd-at-seed0"  # the first contender's run, left by another config
    first.mkdir(parents=True)
    (first / "config.json").write_text(json.dumps({**resolve("fmnist-tiny", **settings).to_dict(), "lr": 0.01}))
    with pytest.raises(ValueError, match="holds a run of other settings"):
        methods.run_all("fmnist-tiny", [0], tmp_path / "runs", settings,
                        log=lambda *a: pytest.fail("trained over another config's run"))
