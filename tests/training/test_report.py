"""The comparison script: trains every contender per seed and writes a table with verdicts."""
import json

import pytest

from helpers import make_fashion_like
from training import report
from training.config import resolve

TINY = dict(model="moe_resnet18", width=0.125, router_blocks=1, router_width=8, val_size=100,
            train_examples=64, val_examples=16, batch_size=32, epochs=1, eval_steps=1, eval_step=0.05)


def test_report_trains_each_contender_per_seed_and_states_a_verdict(tmp_path):
    (tmp_path / "data").mkdir()
    data = make_fashion_like(tmp_path / "data")
    results = report.run_all("fmnist-tiny", [0, 1], tmp_path / "runs", {**TINY, "data_dir": str(data)}, log=lambda *a: None)
    assert {k: [r["seed"] for r in v] for k, v in results.items()} == {
        "dense PGD-AT": [0, 1], "MoE-AT": [0, 1], "AdvMoE": [0, 1], "AdvMoE, router loss model": [0, 1]}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "advmoe-model-seed0", "advmoe-model-seed1", "advmoe-seed0", "advmoe-seed1",
        "moe-at-seed0", "moe-at-seed1", "pgd-at-seed0", "pgd-at-seed1"]
    dense, moe = results["dense PGD-AT"][0]["macs"], results["MoE-AT"][0]["macs"]
    assert moe < dense
    text = report.table(results)
    assert text.count("\n") == 5 and "| dense PGD-AT | dense twin | 2 |" in text
    assert report.verdict(results).startswith("AdvMoE ")
    # A second call reuses the finished runs instead of training again.
    assert report.run_all("fmnist-tiny", [0, 1], tmp_path / "runs", {**TINY, "data_dir": str(data)},
                          log=lambda *a: (_ for _ in ()).throw(AssertionError("retrained"))) == results


def test_report_refuses_runs_of_another_config(tmp_path):
    (tmp_path / "data").mkdir()
    data = make_fashion_like(tmp_path / "data")
    settings = {**TINY, "data_dir": str(data), "train_examples": 32}
    first = tmp_path / "runs" / "pgd-at-seed0"  # the first contender's run, left by another config
    first.mkdir(parents=True)
    (first / "config.json").write_text(json.dumps({**resolve("fmnist-tiny", **settings).to_dict(), "lr": 0.01}))
    with pytest.raises(ValueError, match="holds a run of another config"):
        report.run_all("fmnist-tiny", [0], tmp_path / "runs", settings,
                       log=lambda *a: pytest.fail("trained over another config's run"))
