"""The frontier study end to end on a tiny plan: a dense row and a MoE headline row train,
evaluate and leave one result file each; the report, its PNG and its verdicts come from those
files; a second call finds them and trains nothing."""
import json
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

import advmoe
import advmoe.checkpoint
from advmoe.checkpoint import read_metrics
from evaluation.robustness import file_sha256
from studies import frontier
from training.config import resolve

TINY = dict(preset="fmnist-tiny", moe_width=0.0625, epochs=1, train_examples=64, eval_examples=8,
            autoattack_examples=4, select_examples=6, seeds=(0,), headline_seeds=(0,),
            attack_settings={"pgd_steps": (2, 3), "route_steps": 2, "square_queries": 10, "apgd_iterations": 3,
                             "sweep_examples": 4,
                             "gradient_examples": 4})


@pytest.fixture(scope="module")
def study(tmp_path_factory, fashion_dir):
    root = tmp_path_factory.mktemp("frontier")
    plan = frontier.Plan(**TINY, runs=str(root / "runs"),
                         overrides={"data_dir": str(fashion_dir), "val_size": 50, "val_examples": 8, "batch_size": 32,
                                    "eval_steps": 2, "router_width": 4})
    base = resolve(plan.preset, **plan.overrides)
    rows = [frontier.Row("pgd-at-tiny", "dense PGD-AT, tiny", "pgd-at", "resnet18", 0.0625, (0,)),
            frontier.Row("advmoe-tiny", "AdvMoE, tiny", "advmoe", base.model, 0.0625, (0,), headline=True)]
    docs = frontier.run_study(plan, rows, root / "results", root / "frontier.md", log=lambda *a: None)
    return plan, rows, root, docs


def test_each_run_leaves_a_result_file_with_its_worst_case(study):
    plan, rows, root, docs = study
    assert sorted(p.name for p in (root / "results").glob("*.json")) == ["advmoe-tiny-seed0.json", "pgd-at-tiny-seed0.json"]
    moe = json.loads((root / "results" / "advmoe-tiny-seed0.json").read_text())
    assert {"pgd-2", "pgd-3", "apgd", "route-fixed", "router"} <= set(moe["accuracy"])
    assert moe["worst_case"] <= min(moe["accuracy"].values())  # per image, so at most every attack's accuracy
    assert moe["apgd_components"]["apgd-t"] == moe["accuracy"]["apgd"] <= moe["apgd_components"]["apgd-ce"]
    assert moe["autoattack"]["examples"] == 4 and 0 <= moe["route_flip_rate"] <= 1
    # the cost is what the work took (epochs, evaluations), so a resumed run still counts it
    history = [json.loads(line) for line in (root / "runs" / "advmoe-tiny-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert moe["seconds"]["train"] == pytest.approx(sum(r["epoch_seconds"] for r in history), abs=0.1)
    assert moe["seconds"]["eval"] > 0 and moe["seconds"]["autoattack"] > 0
    rest = json.loads((root / "runs" / "advmoe-tiny-seed0" / "eval-autoattack" / "eval.json").read_text())
    assert rest["attacks_run"] == ["fab", "square"]  # APGD-CE and APGD-T are not run twice
    assert moe["autoattack"]["standard"] is False  # 3 iterations, 10 queries: said so
    assert moe["autoattack"]["worst_case_with_main"] <= moe["autoattack"]["accuracy"]
    dense = json.loads((root / "results" / "pgd-at-tiny-seed0.json").read_text())
    assert "route-fixed" not in dense["accuracy"] and "autoattack" not in dense
    assert dense["macs_per_image"] > moe["macs_per_image"]  # the same width, dense: more MACs


def test_the_report_and_its_plot_come_from_the_result_files(study):
    plan, rows, root, docs = study
    text = (root / "frontier.md").read_text()
    assert "| AdvMoE, tiny |" in text and "| dense PGD-AT, tiny |" in text
    assert "[results/](results/)" in text  # the result files, linked from where the report is
    moe_row = next(line for line in text.splitlines() if line.startswith("| AdvMoE, tiny |")).split(" | ")
    assert moe_row[-2] != "-" and moe_row[-3] != "-"  # route flips and the busiest expert's share: MoE rows have them
    assert "the dense model of the same MACs (dense PGD-AT, tiny)" in text and "PGD-2 minus worst case" in text
    assert (root / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_names_the_data_set_and_budget_of_its_results_and_never_mixes_two(study, tmp_path):
    plan, rows, root, docs = study
    assert "# Robustness against cost on Fashion-MNIST" in (root / "frontier.md").read_text()
    cifar = tmp_path / "cifar10"
    cifar.mkdir()
    for path in (root / "results").glob("*.json"):
        doc = json.loads(path.read_text())
        doc["config"].update(dataset="cifar10", eps=8 / 255)
        (cifar / path.name).write_text(json.dumps(doc))
    text = frontier.write_report(cifar, tmp_path / "cifar10.md", plan)
    assert text.startswith("# Robustness against cost on CIFAR-10\n") and "linf ε = 8/255;" in text
    shutil.copy(root / "results" / "pgd-at-tiny-seed0.json", cifar / "pgd-at-tiny-seed1.json")
    with pytest.raises(ValueError, match=r"2 data sets or budgets \(cifar10 at ε 8/255, fashion_mnist at ε 0.1\); "
                       r"one table compares one: give each study its own --results"):
        frontier.write_report(cifar, tmp_path / "mixed.md", plan)
    assert not (tmp_path / "mixed.md").exists()


def test_a_study_of_another_data_set_reads_it_from_data_dir_and_keeps_its_own_folders(tmp_path, monkeypatch):
    """CIFAR-10 is never downloaded: the study reads it from --data-dir, and its runs, results and
    report go beside Fashion-MNIST's, not among them."""
    seen = {}

    def estimate(plan, rows, results):
        seen.update(plan=plan, results=results)
        return []

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(frontier, "estimate", estimate)
    monkeypatch.setattr(frontier, "print_estimate", lambda *a, **k: None)
    assert frontier.main(["--plan", "--preset", "cifar10-resnet18", "--data-dir", "/data/cifar", "--moe-width", "1.0"]) == 0
    plan = seen["plan"]
    assert plan.overrides == {"data_dir": "/data/cifar"} and plan.runs == "runs/frontier_cifar10"
    assert seen["results"] == Path("reports/robustness_frontier_cifar10")
    assert plan.config(frontier.default_rows(plan)[0], 0).dataset == "cifar10"
    frontier.main(["--plan", "--preset", "cifar10-resnet18", "--data-dir", "/data/cifar", "--runs", "r", "--results", "x"])
    assert seen["plan"].runs == "r" and seen["results"] == Path("x")
    frontier.main(["--plan"])  # Fashion-MNIST's own folders
    assert seen["plan"].runs == "runs/frontier" and seen["results"] == Path("reports/robustness_frontier")


def test_a_study_without_its_data_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        frontier.main(["--plan", "--preset", "cifar10-resnet18", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cifar10:" in err and "cifar-10-batches-py" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_second_call_reuses_the_results(study, monkeypatch):
    plan, rows, root, docs = study
    monkeypatch.setattr(frontier, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(frontier, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))
    again = frontier.run_study(plan, rows, root / "results", root / "frontier.md", log=lambda *a: None)
    assert [d["worst_case"] for d in again] == [d["worst_case"] for d in docs]


def test_a_study_cut_off_after_an_evaluation_reuses_it(study, tmp_path, monkeypatch):
    """Cut off between an evaluation's eval.json and the run's result file: the next call writes the
    result from the eval.json instead of attacking again."""
    plan, rows, root, docs = study
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    (results / "pgd-at-tiny-seed0.json").unlink()
    monkeypatch.setattr(frontier, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(frontier, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))
    again = frontier.run_study(plan, rows, results, tmp_path / "frontier.md", log=lambda *a: None)
    assert json.loads((results / "pgd-at-tiny-seed0.json").read_text())["worst_case"] == docs[0]["worst_case"]
    assert [d["worst_case"] for d in again] == [d["worst_case"] for d in docs]


def test_evaluations_are_sharded_over_the_plans_processes_with_the_threads_split(study, tmp_path, monkeypatch):
    plan, rows, root, docs = study
    calls = []
    monkeypatch.setattr(frontier, "evaluate_in_processes", lambda *a, **k: calls.append((a, k)) or {"seconds": 1.0})
    monkeypatch.setattr(frontier.torch, "get_num_threads", lambda: 2)
    cfg = plan.config(rows[0], 0)
    for processes, threads in ((2, 1), (1, 2)):
        frontier._evaluate(replace(plan, eval_processes=processes), root / "runs" / "pgd-at-tiny-seed0" / "best",
                           tmp_path / "eval", cfg, 8, ("pgd",), {})
        (passed_processes, _, passed_threads), kwargs = calls[-1]
        assert (passed_processes, passed_threads, kwargs["out"]) == (processes, threads, tmp_path / "eval")


def test_a_result_stands_wherever_its_data_was_read_from(study, tmp_path):
    """The same settings with the data in another folder (another machine's) are the same runs:
    their result files are taken as they are, not refused as other settings."""
    plan, rows, root, docs = study
    moved = tmp_path / "data"
    shutil.copytree(plan.overrides["data_dir"], moved)
    elsewhere = frontier.Plan(**{**plan.__dict__, "overrides": {**plan.overrides, "data_dir": str(moved), "workers": 1}})
    kept = json.loads((root / "results" / "pgd-at-tiny-seed0.json").read_text())
    assert frontier.finished(root / "results", rows[0], 0, elsewhere.config(rows[0], 0)) == kept
    assert [c["measured_runs"] for c in frontier.estimate(elsewhere, rows, root / "results")] == [1, 1]


def test_a_variant_lands_beside_the_study_and_other_settings_never_overwrite_it(study, tmp_path):
    """A lever (here a 1-step training attack) runs as rows of its own; the same rows with other
    settings but no variant name are refused before anything trains, and the results stay as they were."""
    plan, rows, root, docs = study
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    kept = {p.name: p.read_bytes() for p in results.glob("*.json")}
    other = frontier.Plan(**{**plan.__dict__, "overrides": {**plan.overrides, "attack_steps": 1},
                             "runs": str(tmp_path / "runs")})
    with pytest.raises(ValueError, match=r"pgd-at-tiny-seed0.json is a result of other settings \(they differ in "
                                         r"attack_steps\): to measure these settings beside it, name them with --variant"):
        frontier.estimate(other, rows[:1], results)
    with pytest.raises(ValueError, match="is a result of other settings"):
        frontier.run_study(other, rows[:1], results, tmp_path / "frontier.md", log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in results.glob("*.json")} == kept
    variant = frontier.variant_rows(rows[:1], "steps1", {"attack_steps": 1})
    assert (variant[0].key, variant[0].label) == ("pgd-at-tiny-steps1", "dense PGD-AT, tiny (steps1: attack_steps=1)")
    [doc] = frontier.run_study(other, variant, results, tmp_path / "frontier.md", log=lambda *a: None)
    assert doc["config"]["attack_steps"] == 1 and (tmp_path / "runs" / "pgd-at-tiny-steps1-seed0" / "best").is_dir()
    assert {p.name: p.read_bytes() for p in results.glob("*.json") if p.name in kept} == kept
    assert "| dense PGD-AT, tiny (steps1: attack_steps=1) |" in (tmp_path / "frontier.md").read_text()


def test_a_repeat_trains_the_runs_again_beside_the_first_and_the_report_pools_them(study, tmp_path, monkeypatch):
    """CPU training is not bitwise reproducible: --repeat 1 trains a seed again under a name of its
    own, leaves the first run's result as it was, and the row's numbers are over both runs."""
    plan, rows, root, docs = study
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    kept = {p.name: p.read_bytes() for p in results.glob("*.json")}
    again = frontier.Plan(**{**plan.__dict__, "repeat": 1, "runs": str(tmp_path / "runs")})
    # before it runs, a repeat is costed at what the first run took
    [cost] = frontier.estimate(again, rows[:1], results)
    assert cost["measured_runs"] == 1 and cost["train_hours"] == pytest.approx(docs[0]["seconds"]["train"] / 3600)
    [doc] = frontier.run_study(again, rows[:1], results, tmp_path / "frontier.md", log=lambda *a: None)
    assert (doc["seed"], doc["repeat"]) == (0, 1) and frontier.doc_run_name(doc) == "pgd-at-tiny-seed0-repeat1"
    assert (tmp_path / "runs" / "pgd-at-tiny-seed0-repeat1" / "best").is_dir()
    assert json.loads((results / "pgd-at-tiny-seed0-repeat1.json").read_text())["repeat"] == 1
    assert {p.name: p.read_bytes() for p in results.glob("*.json") if p.name in kept} == kept
    [runs] = [d for key, d in frontier.load_results(results).items() if key == "pgd-at-tiny"]
    assert [frontier.run_label(d) for d in runs] == ["0", "0 (repeat 1)"]
    line = next(line for line in (tmp_path / "frontier.md").read_text().splitlines()
                if line.startswith("| dense PGD-AT, tiny |"))
    assert "| 0, 0 (repeat 1) |" in line
    # a second call finds the repeat and trains nothing
    monkeypatch.setattr(frontier, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(frontier, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))
    [kept_doc] = frontier.run_study(again, rows[:1], results, tmp_path / "frontier.md", log=lambda *a: None)
    assert (kept_doc["repeat"], kept_doc["checkpoint_sha256"]) == (1, doc["checkpoint_sha256"])


def test_a_result_file_of_an_older_version_still_counts_as_finished(study, tmp_path):
    """Result files written before a setting existed (every committed one before expert_loss) are
    of that setting's default: the study keeps them instead of refusing or retraining."""
    plan, rows, root, docs = study
    doc = json.loads((root / "results" / "pgd-at-tiny-seed0.json").read_text())
    del doc["config"]["expert_loss"]
    (tmp_path / "pgd-at-tiny-seed0.json").write_text(json.dumps(doc))
    assert frontier.finished(tmp_path, rows[0], 0, plan.config(rows[0], 0))["worst_case"] == docs[0]["worst_case"]


@pytest.mark.parametrize("argv, message", [
    (["--set", "attack_steps"], "--set 'attack_steps': write KEY=VALUE, e.g. attack_steps=3"),
    (["--set", "attack_steps=three"], "'three' is not a TOML value"),
    (["--set", "attak_steps=3"], "unknown setting(s) ['attak_steps']"),
    (["--set", "epochs=8"], "--set epochs: give it with --epochs"),
    (["--set", "width=0.5", "--variant", "wide"], "--set width: the rows set it (--moe-width, --rows)"),
    (["--set", "seed=3", "--variant", "s3"], "--set seed: give seeds with --seeds and --headline-seeds"),
    (["--set", 'method="trades"'], "--set method: another method makes rows of their own; name them with --variant"),
    (["--set", 'method="tradez"', "--variant", "kl"], "unknown method 'tradez'; choose one of: standard, pgd-at, trades"),
    (["--variant", "more"], "--variant runs the rows with other settings: give them with --set KEY=VALUE or --epochs"),
    (["--set", "attack_steps=3", "--variant", "../up"], "variant name '../up': use letters, digits"),
    (["--repeat", "-1"], "--repeat -1: give 1, 2, ... to train the runs again"),
    (["--eval-processes", "0"], "--eval-processes 0: give 1 or more"),
    (["--eval-processes", "2", "--set", 'device="cuda"', "--variant", "gpu"], "--eval-processes shards evaluations over CPU"),
])
def test_bad_variant_settings_get_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        frontier.main(["--plan", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_method_variant_trains_the_rows_with_that_method_and_says_so(study):
    """`--set method=...` used to be overridden by the row's own method without a word."""
    plan, rows, root, docs = study
    [row] = frontier.variant_rows(rows[:1], "kl", {"method": "trades"})
    assert (row.key, row.label, row.method, row.variant) == ("pgd-at-tiny-kl", "dense TRADES, tiny (kl: method=trades)",
                                                             "trades", "kl")
    assert plan.config(row, 0).method == "trades"
    [moe] = frontier.variant_rows(rows[1:], "ce", {"method": "pgd-at"})  # the MoE model under PGD-AT stays a MoE row
    assert (moe.label, moe.method) == ("MoE PGD-AT, tiny (ce: method=pgd-at)", "pgd-at")


def test_a_moe_run_trained_along_another_gate_gradient_is_attacked_along_softmax(study):
    """Attacks along "chosen" leave 5 points more standing (reports/gate_grad.md): a row trained
    along it must meet the same attacks as the others, not its own weaker gradient."""
    plan, rows, root, docs = study
    variant = replace(plan, overrides={**plan.overrides, "gate_grad": "chosen"})  # what --set gate_grad=... gives
    [chosen] = frontier.variant_rows(rows[1:], "chosen", {"gate_grad": "chosen"})
    assert variant.config(chosen, 0).gate_grad == "chosen"
    assert frontier._settings(variant, variant.config(chosen, 0))["gate_grad"] == "softmax"
    for row in rows:  # a row attacked along its own gradient keeps the settings its evaluations were made with
        assert "gate_grad" not in frontier._settings(plan, plan.config(row, 0))


def test_settings_are_read_as_toml_values():
    assert frontier.parse_settings(["attack_steps=3", "eps=0.1", "balance=true", 'router="shared"']) == {
        "attack_steps": 3, "eps": 0.1, "balance": True, "router": "shared"}


def test_a_result_that_outlived_its_run_folder_gets_no_autoattack_and_says_so(study, tmp_path, monkeypatch):
    """A fresh machine keeps the committed result files but not the run folders: the study goes on
    (the row's AutoAttack comes from its other seeds) instead of failing on the missing checkpoint."""
    plan, rows, root, docs = study
    results = tmp_path / "results"
    results.mkdir()
    for path in (root / "results").glob("*.json"):
        doc = json.loads(path.read_text())
        doc.pop("autoattack", None)
        (results / path.name).write_text(json.dumps(doc))
    monkeypatch.setattr(frontier, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(frontier, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))
    logged = []
    gone = frontier.Plan(**{**plan.__dict__, "runs": str(tmp_path / "gone")})
    again = frontier.run_study(gone, rows, results, tmp_path / "frontier.md", log=logged.append)
    assert all("autoattack" not in d for d in again)
    assert any(line.startswith("no AutoAttack on advmoe-tiny-seed0: its checkpoint or main evaluation is not in")
               for line in logged)


def test_headline_runs_of_every_seed_come_before_the_other_rows(study, tmp_path, monkeypatch):
    plan, rows, root, docs = study
    order = []

    def run_one(plan, row, seed, results, log):
        order.append(f"{row.key}-seed{seed}")
        return {"worst_case": 0.5, "autoattack": {}}

    monkeypatch.setattr(frontier, "run_one", run_one)
    monkeypatch.setattr(frontier, "write_report", lambda *a, **k: "")
    two = [frontier.Row(r.key, r.label, r.method, r.model, r.width, (0, 1), r.headline) for r in rows]
    frontier.run_study(plan, two, tmp_path / "results", tmp_path / "frontier.md", log=lambda *a: None)
    assert order == ["advmoe-tiny-seed0", "advmoe-tiny-seed1", "pgd-at-tiny-seed0", "pgd-at-tiny-seed1"]


def test_the_estimate_costs_rows_with_finished_runs_at_what_they_took(study):
    plan, rows, root, docs = study
    measured = frontier.estimate(plan, rows, root / "results")
    assert [c["measured_runs"] for c in measured] == [1, 1]
    moe = next(d for d in docs if d["row"]["headline"])
    cost = next(c for c in measured if c["row"] == "advmoe-tiny")
    assert cost["train_hours"] == pytest.approx(moe["seconds"]["train"] / 3600)
    assert cost["eval_hours"] == pytest.approx((moe["seconds"]["eval"] + moe["seconds"]["autoattack"]) / 3600)
    counted = frontier.estimate(plan, rows)  # nothing landed: a timed step and counted attack passes
    assert [c["measured_runs"] for c in counted] == [0, 0] and all(c["train_hours"] > 0 < c["eval_hours"] for c in counted)


def test_the_dense_row_of_equal_macs_costs_what_the_moe_model_costs():
    cfg = resolve("fmnist-tiny")
    target = frontier.macs_per_image(cfg.model, 0.5, cfg)
    width = frontier.width_for_macs(target, "resnet18", cfg)
    assert abs(frontier.macs_per_image("resnet18", width, cfg) / target - 1) < 0.15
    # the narrowest whole-channel width that costs at least the MoE model: never a cheaper dense model
    assert width / frontier.WIDTH_STEP == round(width / frontier.WIDTH_STEP)
    assert frontier.macs_per_image("resnet18", width, cfg) >= target > frontier.macs_per_image("resnet18", width - frontier.WIDTH_STEP, cfg)


@pytest.mark.parametrize("moe_width", [0.25, 0.125])
def test_the_study_has_three_dense_widths_including_the_equal_macs_one_and_the_twin(moe_width):
    """At 0.125 the width of the MoE model's MACs (7/64) and the twin's (8/64) have no whole-channel
    width between them; the third dense row is then twice the twin's width, not a second copy of it."""
    plan = frontier.Plan(moe_width=moe_width)
    dense = [r for r in frontier.default_rows(plan) if r.method == "pgd-at"]
    widths = [r.width for r in dense]
    assert len(set(widths)) == len({r.key for r in dense}) == 3
    base = resolve(plan.preset)
    moe_macs = frontier.macs_per_image(base.model, moe_width, base)
    assert frontier.macs_per_image(dense[0].model, widths[0], base) >= moe_macs and moe_width in widths


def test_ship_copies_the_best_moe_run_with_its_study_numbers(study, tmp_path, monkeypatch):
    plan, rows, root, docs = study
    monkeypatch.setattr(frontier, "SHIP_MAX_MACS", 1.0)  # at width 0.0625 the shared router costs as much as the experts
    monkeypatch.setattr(frontier, "COLLAPSE_SHARE", 1.0)  # a router trained on 64 images may well send all to one expert
    moe = next(d for d in docs if d["row"]["method"] != "pgd-at")
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs" / "advmoe-tiny-seed0", runs / "advmoe-tiny-seed0")
    trained = runs / "advmoe-tiny-seed0" / "best" / "model.safetensors"
    os.utime(trained, (trained.stat().st_atime, time.time() - 86400))  # trained yesterday, exported since
    values = frontier.ship(root / "results", runs, tmp_path / "shipped", log=lambda *a: None, plan=plan)
    # dated now, so that `make run`'s export (newer than yesterday's weights) is made again
    assert (tmp_path / "shipped" / "model.safetensors").stat().st_mtime > time.time() - 3600
    card = advmoe.checkpoint.read_card(tmp_path / "shipped")
    assert values["study_run"] == "advmoe-tiny-seed0"
    assert card.robust_accuracy == moe["worst_case"] and card.autoattack_accuracy == moe["autoattack"]["accuracy"]
    assert card.clean_accuracy == moe["accuracy"]["clean"] and card.route_flip_rate == moe["route_flip_rate"]
    assert advmoe.load_checkpoint(tmp_path / "shipped").cfg.is_moe
    # the numbers are of these weights: the digest the evaluation took of them
    shipped = file_sha256(tmp_path / "shipped" / "model.safetensors")
    metrics = read_metrics(tmp_path / "shipped")
    assert metrics["study_checkpoint_sha256"] == moe["checkpoint_sha256"] == shipped
    # the seed was chosen on the study's attacks over images its training held out, not on test images
    chosen = json.loads((runs / "advmoe-tiny-seed0" / "eval-select" / "eval.json").read_text())
    assert (chosen["split"], chosen["examples"], chosen["attacks_run"]) == ("val", 6, list(frontier.MAIN_ATTACKS))
    assert metrics["selected_on"] == "validation worst case"
    assert metrics["validation_robust_accuracy"] == chosen["robust_accuracy"] and metrics["validation_examples"] == 6


@pytest.mark.parametrize("other", [dict(seed=1), dict(seed=0, repeat=1)], ids=["seed", "repeat"])
@pytest.mark.parametrize("worst, shipped", [((0.3, 0.2), 0), ((0.2, 0.3), 1)])
def test_ship_chooses_the_run_by_its_validation_worst_case_not_its_validation_pgd(study, tmp_path, monkeypatch,
                                                                                worst, shipped, other):
    """A second run (another seed, or the first seed trained again) leads on validation PGD in
    every epoch; the run shipped is the one the study's attacks leave more of on held-out images,
    whichever that is."""
    plan, rows, root, docs = study
    monkeypatch.setattr(frontier, "SHIP_MAX_MACS", 1.0)
    monkeypatch.setattr(frontier, "COLLAPSE_SHARE", 1.0)
    results, runs = tmp_path / "results", tmp_path / "runs"
    shutil.copytree(root / "results", results)
    names = ["advmoe-tiny-seed0", frontier.run_name("advmoe-tiny", other["seed"], other.get("repeat", 0))]
    for name in names:
        shutil.copytree(root / "runs" / "advmoe-tiny-seed0" / "best", runs / name / "best")
    second = json.loads((results / "advmoe-tiny-seed0.json").read_text()) | other
    second["curve"] = [{**r, "val_pgd_accuracy": 1.0} for r in second["curve"]]
    (results / f"{names[1]}.json").write_text(json.dumps(second))
    asked = []

    def planted(plan, best, out, cfg, n, attacks, settings, split="test"):
        asked.append((best.parent.name, out.name, n, split))
        return {"robust_accuracy": worst[names.index(best.parent.name)], "examples": n}

    monkeypatch.setattr(frontier, "_evaluate", planted)
    logged = []
    values = frontier.ship(results, runs, tmp_path / "shipped", log=logged.append, plan=plan)
    assert values["study_run"] == names[shipped]
    assert values["validation_robust_accuracy_by_run"] == dict(zip(names, worst))
    assert sorted(asked) == sorted((name, "eval-select", 6, "val") for name in names)
    label = f"{other['seed']}" + (" (repeat 1)" if "repeat" in other else "")
    assert any(line.startswith(f"advmoe-tiny seed {label}: validation worst case") and "validation PGD by epoch: 100.0" in line
               for line in logged)


def test_ship_refuses_weights_that_changed_since_their_evaluation(study, tmp_path, tmp_path_factory, monkeypatch):
    plan, rows, root, docs = study
    monkeypatch.setattr(frontier, "SHIP_MAX_MACS", 1.0)
    monkeypatch.setattr(frontier, "COLLAPSE_SHARE", 1.0)
    runs = tmp_path_factory.mktemp("retrained")
    shutil.copytree(root / "runs" / "advmoe-tiny-seed0", runs / "advmoe-tiny-seed0")
    weights = runs / "advmoe-tiny-seed0" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # e.g. trained again after the evaluation
    with pytest.raises(ValueError, match=r"is not the checkpoint the study evaluated .* --rows advmoe-tiny"):
        frontier.ship(root / "results", runs, tmp_path / "shipped", log=lambda *a: None, plan=plan)
    assert list(tmp_path.iterdir()) == []


def test_ship_refuses_an_older_result_file_whose_evaluation_is_gone(study, tmp_path, tmp_path_factory, monkeypatch):
    """A result file from before the digest was kept in it needs the run's eval.json to tell."""
    plan, rows, root, docs = study
    monkeypatch.setattr(frontier, "SHIP_MAX_MACS", 1.0)
    monkeypatch.setattr(frontier, "COLLAPSE_SHARE", 1.0)
    copy = tmp_path_factory.mktemp("older")
    shutil.copytree(root / "runs" / "advmoe-tiny-seed0", copy / "runs" / "advmoe-tiny-seed0")
    shutil.rmtree(copy / "runs" / "advmoe-tiny-seed0" / "eval-main")
    shutil.copytree(root / "results", copy / "results")
    older = json.loads((copy / "results" / "advmoe-tiny-seed0.json").read_text())
    del older["checkpoint_sha256"]
    (copy / "results" / "advmoe-tiny-seed0.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"eval-main/eval.json is gone, and with it the digest"):
        frontier.ship(copy / "results", copy / "runs", tmp_path / "shipped", log=lambda *a: None, plan=plan)
    assert list(tmp_path.iterdir()) == []


def test_ship_passes_over_a_seed_whose_checkpoint_is_gone(study, tmp_path, monkeypatch):
    """A second seed that trained on another machine (its result file committed, its run folder
    not here) is not the one copied, and the log says so."""
    plan, rows, root, docs = study
    monkeypatch.setattr(frontier, "SHIP_MAX_MACS", 1.0)
    monkeypatch.setattr(frontier, "COLLAPSE_SHARE", 1.0)
    results = tmp_path / "results"
    results.mkdir()
    for path in (root / "results").glob("*.json"):
        (results / path.name).write_text(path.read_text())
    other = json.loads((results / "advmoe-tiny-seed0.json").read_text())
    other["seed"] = 1
    other["curve"] = [{**r, "val_pgd_accuracy": 1.0} for r in other["curve"]]
    (results / "advmoe-tiny-seed1.json").write_text(json.dumps(other))
    logged = []
    values = frontier.ship(results, root / "runs", tmp_path / "shipped", log=logged.append, plan=plan)
    assert values["study_run"] == "advmoe-tiny-seed0"
    assert any(line.startswith("not shipping advmoe-tiny seed 1: its checkpoint is not in") for line in logged)


def _fail_to_write(*args, **kwargs):
    raise OSError("disk full")


@pytest.mark.parametrize("max_macs,collapse,runs,broken,error,match", [
    (0.01, 0.9, "runs", False, ValueError, "at most 0.01x its dense twin"),  # no MoE run sparse enough
    (1.0, 0.0, "runs", False, ValueError, r"keeps its experts in use"),  # every router counts as collapsed
    (1.0, 1.0, "elsewhere", False, ValueError, r"advmoe-tiny is the row to ship, but no run of it \(advmoe-tiny-seed0\) holds"),
    (1.0, 1.0, "runs", True, OSError, "disk full"),  # the numbers cannot be written
], ids=["not-sparse-enough", "collapsed", "run-gone", "write-fails"])
def test_ship_fails_with_what_to_fix_and_leaves_nothing(study, tmp_path, monkeypatch, max_macs, collapse, runs, broken,
                                                         error, match):
    plan, rows, root, docs = study
    monkeypatch.setattr(frontier, "SHIP_MAX_MACS", max_macs)
    monkeypatch.setattr(frontier, "COLLAPSE_SHARE", collapse)
    if broken:
        monkeypatch.setattr(frontier, "update_metrics", _fail_to_write)
    with pytest.raises(error, match=match):
        frontier.ship(root / "results", root / runs, tmp_path / "shipped", log=lambda *a: None, plan=plan)
    assert list(tmp_path.iterdir()) == []  # no half-shipped copy, no temporary folder left behind


def _planted(key: str, method: str, macs: int, worst: list[float], apgd: list[float], busiest: float = 0.55,
             curve: tuple[float, ...] = (0.6, 0.7, 0.705), width: float = 0.25, variant: str | None = None,
             epochs: int = 5) -> list[dict]:
    dense = method in ("pgd-at", "trades")
    moe = {} if dense else {"route_flip_rate": 0.04, "expert_share": [busiest, 1 - busiest]}
    row = {"key": key, "method": method, "label": key, "width": width, "variant": variant,
           "model": "resnet18" if dense else "moe_resnet18"}
    return [{"row": row, "seed": seed, "macs_per_image": macs, "config": {"epochs": epochs, "seed": seed},
             "accuracy": {"clean": 0.83, "pgd-10": 0.73, "apgd": a}, "worst_case": w, "pgd": "pgd-10",
             "pgd_minus_worst": 0.73 - w, "curve": [{"epoch": e + 1, "val_pgd_accuracy": v} for e, v in enumerate(curve)],
             **moe}
            for seed, (w, a) in enumerate(zip(worst, apgd))]


@pytest.mark.parametrize("moe_worst, beats", [([0.75, 0.76], True), ([0.715, 0.74], False), ([0.65, 0.66], False)])
def test_the_verdicts_weigh_the_difference_against_the_seed_spread(moe_worst, beats):
    grouped = {"dense": _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "moe": _planted("moe", "advmoe", 10, moe_worst, moe_worst)}
    first = frontier.verdicts(grouped)[0]
    assert first.startswith("moe (the best MoE row) " + ("beats" if beats else "does not beat") + " the dense model")
    # a loss says where: the difference under each attack both rows ran
    assert ("Difference by attack, in points: clean +0.0, PGD-10 +0.0, APGD-CE+T" in first) == (not beats)


def test_the_verdicts_say_what_width_buys_a_dense_model_and_what_the_moe_keeps_of_its_twin():
    grouped = {"dense-wide": _planted("dense-wide", "pgd-at", 28, [0.77, 0.79], [0.77, 0.79]),
               "dense": _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72], width=0.15625),
               "moe": _planted("moe", "advmoe", 10, [0.58, 0.60], [0.58, 0.60])}
    lines = frontier.verdicts(grouped)
    assert lines[0].startswith("moe (the best MoE row) does not beat the dense model of the same MACs (dense)")
    assert lines[1] == ("Dense PGD-AT's worst case by cost: 0.0 M MACs 71.5 %, 0.0 M MACs 78.0 %: 2.5x the MACs add "
                        "6.5 points.")
    assert lines[2] == ("moe costs 0.36x the MACs of its full-width twin (dense-wide) and keeps 76 % of its worst-case "
                        "accuracy (59.0 % vs 78.0 %).")
    grouped["dense-wide"] = _planted("dense-wide", "pgd-at", 28, [0.70, 0.71], [0.70, 0.71])  # flat: said so
    assert frontier.verdicts(grouped)[1].endswith("2.5x the MACs add no more than the seed spread (-1.0 points, spread "
                                                  "0.7): capacity is not what limits a dense model's robustness at these "
                                                  "widths, so the MoE rows' gap to the dense row of their MACs is unlikely "
                                                  "to come from their width.")
    del grouped["dense-wide"]  # no twin, one dense row: neither sentence
    assert not any(line.startswith(("Dense PGD-AT's worst case by cost", "moe costs")) for line in frontier.verdicts(grouped))


def test_the_moe_row_is_weighed_against_every_dense_method_of_its_macs_but_only_pgd_at_draws_the_line():
    """A dense TRADES variant at the MoE model's MACs is a second bar to beat, the more robust of
    the two first; the verdict on width and the twin stay with the study's dense PGD-AT rows."""
    grouped = {"dense-wide": _planted("dense-wide", "pgd-at", 28, [0.70, 0.71], [0.70, 0.71]),
               "dense": _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72], width=0.15625),
               "dense-kl": _planted("dense-kl", "trades", 11, [0.60, 0.62], [0.60, 0.62], width=0.15625, variant="kl"),
               "dense-wide-kl": _planted("dense-wide-kl", "trades", 28, [0.9, 0.9], [0.9, 0.9], variant="kl"),
               "moe": _planted("moe", "advmoe", 10, [0.61, 0.63], [0.61, 0.63])}
    lines = frontier.verdicts(grouped)
    assert lines[0].startswith("moe (the best MoE row) does not beat the dense model of the same MACs (dense) ")
    assert lines[1].startswith("moe (the best MoE row) does not beat the dense model of the same MACs (dense-kl) on "
                               "worst-case robust accuracy by more than the seed spread: 62.0 % vs 61.0 %, difference +1.0")
    assert lines[2].startswith("Dense PGD-AT's worst case by cost: 0.0 M MACs 71.5 %, 0.0 M MACs 70.5 %")
    assert lines[3].startswith("moe costs 0.36x the MACs of its full-width twin (dense-wide)")
    grouped["dense-kl"] = _planted("dense-kl", "trades", 11, [0.55, 0.56], [0.55, 0.56], width=0.15625, variant="kl")
    assert frontier.verdicts(grouped)[1].startswith("moe (the best MoE row) beats the dense model of the same MACs "
                                                    "(dense-kl)")
    # each variant against the row it varies
    assert "dense-kl: worst case 55.5 % against 71.5 % for dense, -16.0 points, more than the seed spread (0.7 points)." \
        in frontier.verdicts(grouped)
    grouped["moe-ce"] = _planted("moe-ce", "advmoe", 10, [0.63, 0.63], [0.63, 0.63], variant="ce")
    assert ("moe-ce: worst case 63.0 % against 62.0 % for moe, +1.0 points, no more than the seed spread (1.4 points)."
            in frontier.verdicts(grouped))
    # MoE-AT under either loss is a bar for the best MoE row
    grouped["moe-at"] = _planted("moe-at", "moe-at", 10, [0.60, 0.61], [0.60, 0.61])
    grouped["moe-at-ce"] = _planted("moe-at-ce", "pgd-at", 10, [0.62, 0.63], [0.62, 0.63], variant="ce")
    grouped["moe-at-ce"][0]["row"]["model"] = "moe_resnet18"
    lines = frontier.verdicts(grouped)
    assert any(line.startswith("moe-ce (the best MoE row) beats MoE-AT (moe-at)") for line in lines)
    assert any(line.startswith("moe-ce (the best MoE row) does not beat MoE-AT (moe-at-ce)") for line in lines)
    del grouped["moe-at"], grouped["moe-at-ce"]
    del grouped["moe"]  # a variant of a row without results: nothing to say about it
    assert not any(line.startswith("moe-ce: worst case") for line in frontier.verdicts(grouped))


def test_a_longer_schedule_is_weighed_against_dense_rows_of_the_same_schedule():
    """Ten epochs help a dense model too: the best MoE row meets the dense row of its own epochs, and a
    MoE row trained longer meets the dense row trained as long, not the other way round."""
    grouped = {"dense": _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "dense-e10": _planted("dense-e10", "pgd-at", 11, [0.74], [0.74], variant="e10", epochs=10),
               "moe": _planted("moe", "advmoe", 10, [0.68, 0.69], [0.68, 0.69]),
               "moe-ce": _planted("moe-ce", "advmoe", 10, [0.60, 0.62], [0.60, 0.62], variant="ce"),
               "moe-ce_e10": _planted("moe-ce_e10", "advmoe", 10, [0.75], [0.75], variant="ce_e10", epochs=10)}
    lines = frontier.verdicts(grouped)
    same_macs = [line for line in lines if "the dense model of the same MACs" in line]
    assert len(same_macs) == 2
    assert same_macs[0].startswith("moe (the best MoE row) does not beat the dense model of the same MACs (dense) on")
    assert same_macs[1] == ("moe-ce_e10 is ahead of the dense model of the same MACs and 10 epochs (dense-e10) on "
                            "worst-case robust accuracy by 1.0 points (75.0 % vs 74.0 %), one run of moe-ce_e10 and of "
                            "dense-e10, so no seed spread to weigh it against yet. Difference by attack, in points: "
                            "clean +0.0, PGD-10 +0.0, APGD-CE+T +1.0.")
    # a variant of a variant is weighed against the variant it extends, not the plain row
    assert ("moe-ce_e10: worst case 75.0 % against 61.0 % for moe-ce, +14.0 points, one run of moe-ce_e10, so no seed "
            "spread to weigh it against yet.") in lines
    assert "dense-e10: worst case 74.0 % against 71.5 % for dense, +2.5 points" in " ".join(lines)
    # a longer MoE row without a dense row of its schedule meets none; the best row falls back to the nearest in MACs
    lines = frontier.verdicts({k: d for k, d in grouped.items() if k != "dense-e10"})
    assert not any("the dense model of the same MACs and" in line for line in lines)
    lines = frontier.verdicts({k: d for k, d in grouped.items() if k != "dense"})
    assert any(line.startswith("moe (the best MoE row) does not beat the dense model of the same MACs (dense-e10)")
               for line in lines)


def test_a_longer_best_row_leaves_the_twin_and_moe_at_to_the_best_row_of_their_schedule():
    """When a row trained longer becomes the best MoE row, the study's own rows (the twin, MoE-AT,
    the dense row of the MoE model's MACs) are still weighed against the best mixture of theirs."""
    grouped = {"dense": _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72], width=0.15625),
               "dense-wide": _planted("dense-wide", "pgd-at", 28, [0.70, 0.71], [0.70, 0.71]),
               "dense-e10": _planted("dense-e10", "pgd-at", 11, [0.74, 0.75], [0.74, 0.75], width=0.15625,
                                     variant="e10", epochs=10),
               "moe": _planted("moe", "advmoe", 10, [0.68, 0.69], [0.68, 0.69]),
               "moe-at": _planted("moe-at", "moe-at", 10, [0.60, 0.61], [0.60, 0.61]),
               "moe-e10": _planted("moe-e10", "advmoe", 10, [0.72, 0.73], [0.72, 0.73], variant="e10", epochs=10)}
    grouped["moe-e10"][1]["pgd_minus_worst"] = 0.15  # its PGD gap misses the target; the 5-epoch row's meets it
    lines = frontier.verdicts(grouped)
    assert lines[0].startswith("moe-e10 (the best MoE row) does not beat the dense model of the same MACs (dense-e10) "
                               "on worst-case robust accuracy by more than the seed spread: 72.5 % vs 74.5 %")
    assert lines[1].startswith("moe does not beat the dense model of the same MACs and 5 epochs (dense) on worst-case "
                               "robust accuracy by more than the seed spread: 68.5 % vs 71.5 %")
    assert "moe costs 0.36x the MACs of its full-width twin (dense-wide) and keeps 97 % of its worst-case accuracy " \
           "(68.5 % vs 70.5 %)." in lines
    assert any(line.startswith("moe beats MoE-AT (moe-at) on worst-case robust accuracy by more than the seed spread: "
                               "68.5 % vs 60.5 %") for line in lines)
    assert not any("moe-e10" in line and "MoE-AT" in line for line in lines)  # no MoE-AT of ten epochs to weigh
    assert lines[-2].startswith("moe-e10: PGD-10 minus worst case 8.0 points (target at most 5: missed)")
    assert lines[-1].startswith("moe: PGD-10 minus worst case 4.5 points (target at most 5: met)")


def test_a_row_of_one_run_is_never_weighed_against_another_rows_spread():
    """One run has no spread, and the other row's does not stand in for it: the MoE rows' runs
    differ far more than the dense rows' (10 points against 1.3 on this CPU)."""
    grouped = {"dense": _planted("dense", "pgd-at", 11, [0.71], [0.71]),
               "moe": _planted("moe", "advmoe", 10, [0.56], [0.56])}
    assert frontier.verdicts(grouped)[0].endswith(
        "difference -15.0 points, one run of moe and of dense, so no seed spread to weigh it against yet. "
        "Difference by attack, in points: clean +0.0, PGD-10 +0.0, APGD-CE+T -15.0.")
    grouped["moe"] = _planted("moe", "advmoe", 10, [0.56, 0.60], [0.56, 0.60])
    assert "difference -13.0 points, one run of dense, so no seed spread to weigh it against yet." \
        in frontier.verdicts(grouped)[0]
    # ahead on one run of the other row: neither "beats" nor "does not beat", whatever the difference
    grouped["moe"] = _planted("moe", "advmoe", 10, [0.80, 0.81], [0.80, 0.81])
    assert frontier.verdicts(grouped)[0] == (
        "moe (the best MoE row) is ahead of the dense model of the same MACs (dense) on worst-case robust accuracy by "
        "9.5 points (80.5 % vs 71.0 %), one run of dense, so no seed spread to weigh it against yet. Difference by "
        "attack, in points: clean +0.0, PGD-10 +0.0, APGD-CE+T +9.5.")
    grouped["dense"] = _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72])
    assert frontier.verdicts(grouped)[0].startswith("moe (the best MoE row) beats the dense model of the same MACs")
    # a variant of one run against the row it varies: the difference, and no verdict on it
    grouped["moe-ce"] = _planted("moe-ce", "advmoe", 10, [0.50], [0.50], variant="ce")
    assert ("moe-ce: worst case 50.0 % against 80.5 % for moe, -30.5 points, one run of moe-ce, so no seed spread to "
            "weigh it against yet.") in frontier.verdicts(grouped)


def test_the_best_moe_row_is_one_of_two_runs_or_more_and_a_better_single_run_is_named():
    grouped = {"dense": _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "moe": _planted("moe", "advmoe", 10, [0.60, 0.62], [0.60, 0.62]),
               "moe-lucky": _planted("moe-lucky", "advmoe", 10, [0.68], [0.68], variant="lucky"),
               "moe-poor": _planted("moe-poor", "advmoe", 10, [0.50], [0.50], variant="poor")}
    assert frontier.best_row({k: grouped[k] for k in ("moe", "moe-lucky", "moe-poor")}) == "moe"
    lines = frontier.verdicts(grouped)
    assert lines[0] == ("moe-lucky is above the best MoE row (moe) on one run (68.0 % against 61.0 %): a second seed "
                        "would say whether it is the better row.")
    assert lines[1].startswith("moe (the best MoE row) does not beat the dense model of the same MACs (dense)")
    assert not any(line.startswith("moe-poor is above") for line in lines)
    # a run a few hundredths over the row's mean: the decimals that tell the two apart
    grouped["moe-close"] = _planted("moe-close", "advmoe", 10, [0.6103], [0.6103], variant="close")
    assert ("moe-close is above the best MoE row (moe) on one run (61.03 % against 61.00 %): a second seed would say "
            "whether it is the better row.") in frontier.verdicts(grouped)
    grouped["moe-lucky"].append({**grouped["moe-lucky"][0], "seed": 1})  # a second run: now it is the best row
    assert frontier.best_row({k: grouped[k] for k in ("moe", "moe-lucky", "moe-poor")}) == "moe-lucky"
    assert frontier.verdicts(grouped)[0].startswith("moe-lucky (the best MoE row) does not beat the dense model")
    # where no row has two runs yet, the best single run is the best row
    assert frontier.best_row({k: grouped[k][:1] for k in ("moe", "moe-poor")}) == "moe"


def test_a_collapsed_moe_row_is_not_the_best_moe_row_whatever_its_accuracy():
    grouped = {"dense": _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72], width=0.15625),
               "moe-at": _planted("moe-at", "moe-at", 10, [0.62, 0.62], [0.62, 0.62], busiest=1.0),
               "advmoe": _planted("advmoe", "advmoe", 10, [0.56, 0.57], [0.58, 0.59])}
    lines = frontier.verdicts(grouped)
    assert lines[0].startswith("moe-at: its router collapsed (busiest expert 100 %")
    assert lines[1].startswith("advmoe (the best MoE row) does not beat the dense model")
    assert lines[2].startswith("advmoe (the best MoE row) does not beat MoE-AT (moe-at)")
    # every row collapsed: the best of them is still judged, and said to be collapsed
    only = {k: grouped[k] for k in ("dense", "moe-at")}
    assert any(line.startswith("moe-at (the best MoE row)") for line in frontier.verdicts(only))


@pytest.mark.parametrize("curve, verdict", [
    ((0.55, 0.63, 0.657), "still rising (+2.7 points in the last epoch)"),
    ((0.55, 0.63, 0.635), "levelled off."),
    ((0.53, 0.629, 0.32), "it peaked at epoch 2 and fell after it"),
])
def test_the_report_says_whether_validation_robustness_levelled_off(curve, verdict):
    line = frontier.curve_verdict(_planted("advmoe", "advmoe", 10, [0.56], [0.58], curve=curve))
    assert verdict in line and line.startswith("advmoe: validation PGD accuracy by epoch")
    assert "route-fixed" not in line  # runs from before validation ran it


def test_the_study_cost_counts_its_own_runs_against_the_budget_and_at_each_rows_quickest_run():
    rows = [frontier.Row("dense", "dense", "pgd-at", "resnet18", 0.25, (0, 1), headline=True),
            frontier.Row("moe", "MoE", "advmoe", "moe_resnet18", 0.25, (0, 1))]

    def doc(key, seed, repeat=0, **seconds):
        return {"row": {"key": key}, "seed": seed, "repeat": repeat, "config": {"device": "cpu"}, "seconds": seconds}

    grouped = {"dense": [doc("dense", 0, train=3600, eval=1800), doc("dense", 1, train=1800, eval=1800, autoattack=1800),
                         doc("dense", 2, train=9000), doc("dense", 1, repeat=1, train=9000, eval=900)],  # an extra seed, a repeat
               "moe": [doc("moe", 0, train=7200, eval=3600)],
               "moe-e10": [doc("moe-e10", 0, train=900, eval=900)]}  # a variant: other work, so never the quickest
    text = frontier.study_cost(grouped, rows)
    # recorded: the row's own seeds, 1.5 + 1.5 + 3 hours; quickest: dense 2 x (0.5 + 0.25 + 0.5), the repeat's
    # evaluation the quickest of the row's settings, MoE 2 x (2 + 1), no AutoAttack off the headline
    assert "3 of 4 runs finished, 6.0 hours recorded against a budget of 12 hours of a 2-core CPU; 8.5 hours at" in text
    assert text.endswith("AutoAttack has not run on 1 headline run (dense-seed0); the quickest-run hours count it.")
    # one row's runs only, and no AutoAttack on any of them: both said
    dense_only = {"dense": [d for d in grouped["dense"] if "autoattack" not in d["seconds"]]}
    text = frontier.study_cost(dense_only, rows)
    assert "1 of 4 runs finished" in text and "hours (the 1 of its 2 rows with a finished run) at" in text
    assert text.endswith("the quickest-run hours count it, except for dense, where no run has it.")
    grouped["dense"][0]["config"]["device"] = "cuda:0"
    assert "budget" not in frontier.study_cost(grouped, rows)  # the budget is the CPU's
    assert frontier.study_cost({"moe-e10": grouped["moe-e10"]}, rows) == ""


def test_the_curve_line_names_a_seed_whose_validation_robustness_collapsed_for_an_epoch():
    """The row's mean of 0.72 and 0.21 would read as a dip to 46.5 %; the line says which seed fell, and how far."""
    runs = _planted("dense", "pgd-at", 11, [0.72, 0.73], [0.72, 0.73])
    runs[0]["curve"] = [{"epoch": e + 1, "val_pgd_accuracy": v} for e, v in enumerate((0.69, 0.744, 0.217, 0.744, 0.759))]
    runs[1]["curve"] = [{"epoch": e + 1, "val_pgd_accuracy": v} for e, v in enumerate((0.70, 0.72, 0.713, 0.74, 0.735))]
    line = frontier.curve_verdict(runs)
    assert line.endswith("levelled off. Behind the mean: seed 0 fell from 74.4 to 21.7 % at epoch 3, 74.4 % the next.")
    assert "Behind the mean" not in frontier.curve_verdict(runs[:1])  # one run: its curve is the fall itself
    runs[0]["curve"][2]["val_pgd_accuracy"] = 0.6  # 14 points: a swing, not a collapse
    assert "Behind the mean" not in frontier.curve_verdict(runs)


def test_the_curve_line_adds_validation_route_fixed_accuracy_where_every_run_has_it():
    runs = _planted("advmoe", "advmoe", 10, [0.56, 0.6], [0.58, 0.6])
    for run, fixed in zip(runs, ((0.5, 0.55, 0.6), (0.4, 0.45, 0.5))):
        run["curve"] = [{**r, "val_route_fixed_accuracy": f} for r, f in zip(run["curve"], fixed)]
    assert "% (route-fixed: 45.0, 50.0, 55.0 %)" in frontier.curve_verdict(runs)
    runs[1]["curve"][0]["val_route_fixed_accuracy"] = None  # a run resumed across the change
    assert "route-fixed" not in frontier.curve_verdict(runs)


def _eval_doc(sha: str = "w", **bits) -> dict:
    return {"examples": len(next(iter(bits.values()))), "checkpoint_sha256": sha, "autoattack_flags": [],
            "settings": {"apgd_iterations": 100, "square_queries": 5000},
            "per_example": {"label": [0] * len(next(iter(bits.values()))), **bits}}


def test_autoattack_is_composed_per_image_from_its_four_attacks():
    main = _eval_doc(clean="11110", apgd="11100", robust="10100")
    rest = _eval_doc(clean="1111", fab="1011", square="1110")
    rest["examples"] = 4
    aa = frontier.compose_autoattack(main, rest)
    # images 0 and 2 survive all four attacks; 1 falls to FAB-T; 3 to APGD and Square
    assert (aa["accuracy"], aa["worst_case_with_main"], aa["standard"]) == (0.5, 0.5, True)
    assert aa["square_check"]["passed"]  # Square fooled nothing that every white-box attack missed
    masked = frontier.compose_autoattack(main, {**rest, "per_example": {**rest["per_example"], "square": "0000"}})
    assert not masked["square_check"]["passed"] and "2 of 4 examples fooled by Square only" in masked["square_check"]["detail"]
    with pytest.raises(ValueError, match="different weights"):
        frontier.compose_autoattack(main, {**rest, "checkpoint_sha256": "other"})


def test_the_table_says_which_seeds_autoattack_covers_when_not_all():
    grouped = {"moe": _planted("moe", "advmoe", 10, [0.56, 0.57], [0.58, 0.59])}
    grouped["moe"][1]["autoattack"] = {"accuracy": 0.55, "worst_case_with_main": 0.54}
    row = frontier.table(grouped).splitlines()[-1]
    assert row.endswith("| 55.0 (54.0), seed 1 |")
    grouped["moe"][0]["autoattack"] = {"accuracy": 0.55, "worst_case_with_main": 0.54}
    assert frontier.table(grouped).splitlines()[-1].endswith("| 55.0 ± 0.0 (54.0 ± 0.0) |")


def test_a_failed_masking_check_of_autoattack_is_a_verdict():
    grouped = {"dense": _planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "moe": _planted("moe", "advmoe", 10, [0.56, 0.57], [0.58, 0.59])}
    grouped["moe"][1]["autoattack"] = {"square_check": {"passed": False, "detail": "12 of 500 examples fooled by Square only"}}
    lines = frontier.verdicts(grouped)
    assert [line for line in lines if "gradient masking" in line] == [
        "moe, seed 1: Square found what every white-box attack missed, a sign of gradient masking "
        "(12 of 500 examples fooled by Square only)."]


# -- the model `make run` serves ----------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def test_make_run_serves_the_shipped_study_model_with_the_numbers_of_its_result_file():
    served = re.search(r"^CHECKPOINT \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    metrics = read_metrics(ROOT / served)
    doc = json.loads((ROOT / frontier.RESULTS / f"{metrics['study_run']}.json").read_text())
    assert metrics["study_checkpoint_sha256"] == file_sha256(ROOT / served / "model.safetensors")
    if "checkpoint_sha256" in doc:  # result files written before the digest was kept lack it
        assert doc["checkpoint_sha256"] == metrics["study_checkpoint_sha256"]
    assert (metrics["clean_accuracy"], metrics["robust_accuracy"], metrics["robust_examples"]) == (
        doc["accuracy"]["clean"], doc["worst_case"], doc["examples"])
    assert metrics["route_flip_rate"] == doc["route_flip_rate"]
    assert metrics["robust_attacks"] == sorted(set(doc["accuracy"]) - {"clean", "robust"})
    assert metrics["autoattack_accuracy"] == doc["autoattack"]["accuracy"]
    card = advmoe.checkpoint.read_card(ROOT / served)
    assert card.num_experts > 1 and card.robust_accuracy == doc["worst_case"]
    twin = frontier.macs_per_image(advmoe.dense_twin(doc["row"]["model"]), doc["row"]["width"], resolve(None, **doc["config"]))
    assert doc["macs_per_image"] <= frontier.SHIP_MAX_MACS * twin
