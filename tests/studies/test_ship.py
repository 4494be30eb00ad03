"""Shipping the study's best MoE run (`advmoe study frontier --ship DEST`), on the tiny study of
conftest.py, and the model `make run` serves: its card's numbers are its result file's."""
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import advmoe
import advmoe.checkpoint
from advmoe.checkpoint import read_metrics
from evaluation.cache import file_sha256
from studies import card as study_card
from studies import record, ship
from studies.curves import dense_at
from studies.design import RESULTS, macs_per_image, run_name
from studies.record import read
from studies.run import MAIN_ATTACKS
from training.config import resolve

ROOT = Path(__file__).resolve().parents[2]


def quiet(*args, **kwargs):
    pass


@pytest.fixture
def shippable(monkeypatch):
    """At width 0.0625 the shared router costs as much as the experts, and a router trained on 64
    images may well send every image to one expert: let the tiny MoE row ship all the same."""
    monkeypatch.setattr(ship, "SHIP_MAX_MACS", 1.0)
    monkeypatch.setattr(record, "COLLAPSE_SHARE", 1.0)


def test_ship_copies_the_best_moe_run_with_its_study_numbers(study, tmp_path, shippable):
    moe = next(r for r in study.results if r.row.is_moe)
    runs = tmp_path / "runs"
    shutil.copytree(study.root / "runs" / "advmoe-tiny-seed0", runs / "advmoe-tiny-seed0")
    trained = runs / "advmoe-tiny-seed0" / "best" / "model.safetensors"
    os.utime(trained, (trained.stat().st_atime, time.time() - 86400))  # trained yesterday, exported since
    values = ship.ship(study.root / "results", runs, tmp_path / "shipped", log=quiet, plan=study.plan)
    # dated now, so that `make run`'s export (newer than yesterday's weights) is made again
    assert (tmp_path / "shipped" / "model.safetensors").stat().st_mtime > time.time() - 3600
    card = advmoe.checkpoint.read_card(tmp_path / "shipped")
    assert values["study_run"] == "advmoe-tiny-seed0"
    assert card.robust_accuracy == moe.worst_case and card.autoattack_accuracy == moe.autoattack["accuracy"]
    assert card.clean_accuracy == moe.accuracy["clean"] and card.route_flip_rate == moe.route_flip_rate
    assert advmoe.load_checkpoint(tmp_path / "shipped").cfg.is_moe
    # the numbers are of these weights: the digest the evaluation took of them
    metrics = read_metrics(tmp_path / "shipped")
    assert metrics["study_checkpoint_sha256"] == moe.checkpoint_sha256 == file_sha256(tmp_path / "shipped" / "model.safetensors")
    # the seed was chosen on the study's attacks over images its training held out, not on test images
    chosen = json.loads((runs / "advmoe-tiny-seed0" / "eval-select" / "eval.json").read_text())
    assert (chosen["split"], chosen["examples"], chosen["attacks_run"]) == ("val", 6, list(MAIN_ATTACKS))
    assert metrics["selected_on"] == "validation worst case"
    assert metrics["validation_robust_accuracy"] == chosen["robust_accuracy"] and metrics["validation_examples"] == 6
    # what a dense model of its cost reached, from the same results
    assert card.dense_robust_accuracy == dense_at(record.load_results(study.root / "results"), "advmoe-tiny")


@pytest.mark.parametrize("other", [dict(seed=1), dict(seed=0, repeat=1)], ids=["seed", "repeat"])
@pytest.mark.parametrize("worst, shipped", [((0.3, 0.2), 0), ((0.2, 0.3), 1)])
def test_ship_chooses_the_run_by_its_validation_worst_case_not_its_validation_pgd(study, tmp_path, monkeypatch, shippable,
                                                                                worst, shipped, other):
    """A second run (another seed, or the first seed trained again) leads on validation PGD in
    every epoch; the run shipped is the one the study's attacks leave more of on held-out images,
    whichever that is."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    shutil.copytree(study.root / "results", results)
    names = ["advmoe-tiny-seed0", run_name("advmoe-tiny", other["seed"], other.get("repeat", 0))]
    for name in names:
        shutil.copytree(study.root / "runs" / "advmoe-tiny-seed0" / "best", runs / name / "best")
    second = json.loads((results / "advmoe-tiny-seed0.json").read_text()) | other
    second["curve"] = [{**r, "val_pgd_accuracy": 1.0} for r in second["curve"]]
    (results / f"{names[1]}.json").write_text(json.dumps(second))
    asked = []

    def planted(plan, best, out, cfg, n, attacks, split="test"):
        asked.append((best.parent.name, out.name, n, split))
        return {"robust_accuracy": worst[names.index(best.parent.name)], "examples": n}

    monkeypatch.setattr(ship, "evaluate", planted)
    logged = []
    values = ship.ship(results, runs, tmp_path / "shipped", log=logged.append, plan=study.plan)
    assert values["study_run"] == names[shipped]
    assert values["validation_robust_accuracy_by_run"] == dict(zip(names, worst))
    assert sorted(asked) == sorted((name, "eval-select", 6, "val") for name in names)
    label = f"{other['seed']}" + (" (repeat 1)" if "repeat" in other else "")
    assert any(line.startswith(f"advmoe-tiny seed {label}: validation worst case") for line in logged)


def test_ship_refuses_weights_that_changed_since_their_evaluation(study, tmp_path, tmp_path_factory, shippable):
    runs = tmp_path_factory.mktemp("retrained")
    shutil.copytree(study.root / "runs" / "advmoe-tiny-seed0", runs / "advmoe-tiny-seed0")
    weights = runs / "advmoe-tiny-seed0" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # e.g. trained again after the evaluation
    with pytest.raises(ValueError, match=r"is not the checkpoint the study evaluated .* --rows advmoe-tiny"):
        ship.ship(study.root / "results", runs, tmp_path / "shipped", log=quiet, plan=study.plan)
    assert list(tmp_path.iterdir()) == []


def test_ship_refuses_a_result_without_a_digest_whose_evaluation_is_gone(study, tmp_path, tmp_path_factory, shippable):
    """A result recorded before digests were kept needs the run's eval.json to tell which weights it is of."""
    copy = tmp_path_factory.mktemp("older")
    shutil.copytree(study.root / "runs" / "advmoe-tiny-seed0", copy / "runs" / "advmoe-tiny-seed0")
    shutil.rmtree(copy / "runs" / "advmoe-tiny-seed0" / "eval-main")
    shutil.copytree(study.root / "results", copy / "results")
    older = json.loads((copy / "results" / "advmoe-tiny-seed0.json").read_text()) | {"checkpoint_sha256": None}
    (copy / "results" / "advmoe-tiny-seed0.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"eval-main/eval.json is gone, and with it the digest"):
        ship.ship(copy / "results", copy / "runs", tmp_path / "shipped", log=quiet, plan=study.plan)
    assert list(tmp_path.iterdir()) == []


def test_ship_passes_over_a_seed_whose_checkpoint_is_gone(study, tmp_path, shippable):
    """A second seed that trained on another machine (its result file committed, its run folder
    not here) is not the one copied, and the log says so."""
    results = tmp_path / "results"
    shutil.copytree(study.root / "results", results)
    other = json.loads((results / "advmoe-tiny-seed0.json").read_text()) | {"seed": 1}
    other["curve"] = [{**r, "val_pgd_accuracy": 1.0} for r in other["curve"]]
    (results / "advmoe-tiny-seed1.json").write_text(json.dumps(other))
    logged = []
    values = ship.ship(results, study.root / "runs", tmp_path / "shipped", log=logged.append, plan=study.plan)
    assert values["study_run"] == "advmoe-tiny-seed0"
    assert any(line.startswith("not shipping advmoe-tiny seed 1: its checkpoint is not in") for line in logged)


def _fail_to_write(*args, **kwargs):
    raise OSError("disk full")


@pytest.mark.parametrize("max_macs,collapse,runs,broken,error,match", [
    (0.01, 0.9, "runs", False, ValueError, "at most 0.01x its dense twin"),  # no MoE run sparse enough
    (1.0, 0.0, "runs", False, ValueError, r"keeps its experts in use"),  # every router counts as collapsed
    (1.0, 1.0, "elsewhere", False, ValueError, r"advmoe-tiny is the row to ship, but no run of it \(advmoe-tiny-seed0\) holds.*--repeat 1"),
    (1.0, 1.0, "runs", True, OSError, "disk full"),  # the numbers cannot be written
], ids=["not-sparse-enough", "collapsed", "run-gone", "write-fails"])
def test_ship_fails_with_what_to_fix_and_leaves_nothing(study, tmp_path, monkeypatch, max_macs, collapse, runs, broken,
                                                         error, match):
    monkeypatch.setattr(ship, "SHIP_MAX_MACS", max_macs)
    monkeypatch.setattr(record, "COLLAPSE_SHARE", collapse)
    monkeypatch.setattr(ship, "COLLAPSE_SHARE", collapse)
    if broken:
        monkeypatch.setattr(ship, "update_metrics", _fail_to_write)
    with pytest.raises(error, match=match):
        ship.ship(study.root / "results", study.root / runs, tmp_path / "shipped", log=quiet, plan=study.plan)
    assert list(tmp_path.iterdir()) == []  # no half-shipped copy, no temporary folder left behind


def test_make_run_serves_the_shipped_study_model_with_the_numbers_of_its_result_file_or_its_card():
    """The shipped model's numbers are its study result's, or, once `advmoe study card` has run on it,
    the card's: its committed parts (reports/card/DIGEST/) merged, over the whole test set."""
    served = re.search(r"^CHECKPOINT \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    metrics = read_metrics(ROOT / served)
    result = read(ROOT / RESULTS / f"{metrics['study_run']}.json")
    digest = file_sha256(ROOT / served / "model.safetensors")
    assert metrics["study_checkpoint_sha256"] == digest
    if result.checkpoint_sha256 is not None:  # results recorded before digests were kept lack it
        assert result.checkpoint_sha256 == metrics["study_checkpoint_sha256"]
    if "autoattack_images" in metrics:  # the card's figures (studies/card.py card_values)
        parts = ROOT / "reports" / "card" / digest[:12]
        found = {name: study_card.merged([json.loads(p.read_text()) for p in sorted((parts / name).glob("*/eval.json"))])
                 for name in ("main", "autoattack")}
        expected = study_card.card_values(found["main"], found["autoattack"], draw_seed=0)
        assert {k: metrics[k] for k in expected} == expected
        assert metrics["robust_examples"] == 10_000 and metrics["autoattack_examples"] >= 2000  # as the issue asks
    else:
        assert (metrics["clean_accuracy"], metrics["robust_accuracy"], metrics["robust_examples"]) == (
            result.accuracy["clean"], result.worst_case, result.examples)
        assert metrics["route_flip_rate"] == result.route_flip_rate
        assert metrics["robust_attacks"] == sorted(set(result.accuracy) - {"clean", "robust"})
        assert metrics["autoattack_accuracy"] == result.autoattack["accuracy"]
    card = advmoe.checkpoint.read_card(ROOT / served)
    assert card.num_experts > 1 and card.robust_accuracy == metrics["robust_accuracy"]
    twin = macs_per_image(advmoe.dense_twin(result.row.model), result.row.width, resolve(None, **result.config))
    assert result.macs_per_image <= ship.SHIP_MAX_MACS * twin
