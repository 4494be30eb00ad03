"""The frontier study end to end on a tiny plan (tests/studies/conftest.py): a dense row and a MoE
headline row train, evaluate and leave one result file each; the report and its plot come from
those files; a second call finds them and trains nothing; the command line's flags and errors."""
import json
import shlex
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from studies import evaluations, frontier, run
from studies.design import default_rows, variant_rows
from studies.estimate import estimate
from studies.record import load_results, read
from studies.report import write_report


def quiet(*args, **kwargs):
    pass


def no_work(monkeypatch):
    monkeypatch.setattr(run, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(evaluations, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))


def test_each_run_leaves_a_result_file_with_its_worst_case(study):
    results = study.root / "results"
    assert sorted(p.name for p in results.glob("*.json")) == ["advmoe-tiny-seed0.json", "pgd-at-tiny-seed0.json"]
    moe = read(results / "advmoe-tiny-seed0.json")
    assert {"pgd-2", "pgd-3", "apgd", "route-fixed", "router"} <= set(moe.accuracy)
    assert moe.worst_case <= min(moe.accuracy.values())  # per image, so at most every attack's accuracy
    assert moe.apgd_components["apgd-t"] == moe.accuracy["apgd"] <= moe.apgd_components["apgd-ce"]
    assert moe.autoattack["examples"] == 4 and 0 <= moe.route_flip_rate <= 1
    # the cost is what the work took (epochs, evaluations), so a resumed run still counts it
    history = [json.loads(line) for line in (study.root / "runs" / "advmoe-tiny-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert moe.seconds["train"] == pytest.approx(sum(r["epoch_seconds"] + r["validation_seconds"] for r in history),
                                                 abs=0.1)
    assert moe.seconds["eval"] > 0 and moe.seconds["autoattack"] > 0
    rest = json.loads((study.root / "runs" / "advmoe-tiny-seed0" / "eval-autoattack" / "eval.json").read_text())
    assert rest["attacks_run"] == ["fab", "square"]  # APGD-CE and APGD-T are not run twice
    assert moe.autoattack["standard"] is False  # 3 iterations, 10 queries: said so
    assert moe.autoattack["worst_case_with_main"] <= moe.autoattack["accuracy"]
    dense = read(results / "pgd-at-tiny-seed0.json")
    assert "route-fixed" not in dense.accuracy and dense.autoattack is None and dense.route_flip_rate is None
    assert dense.macs_per_image > moe.macs_per_image  # the same width, dense: more MACs


def test_the_report_its_numbers_and_its_plot_come_from_the_result_files(study):
    text = (study.root / "frontier.md").read_text()
    assert "[results/](results/)" in text  # the result files, linked from where the report is
    moe_row = next(line for line in text.splitlines() if line.startswith("| AdvMoE, tiny |")).split(" | ")
    assert moe_row[-2] != "-" and moe_row[-3] != "-"  # route flips and the busiest expert's share: MoE rows have them
    numbers = json.loads((study.root / "frontier.json").read_text())
    for result in study.results:
        assert numbers["rows"][result.row.key]["worst_case"][0] == pytest.approx(result.worst_case)
        assert f"**{100 * result.worst_case:.1f}**" in text
    [comparison] = numbers["findings"]["comparisons"]
    assert (comparison["row"], comparison["other"]) == ("AdvMoE, tiny", "dense PGD-AT, tiny")
    assert (study.root / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_names_the_data_set_and_budget_of_its_results_and_never_mixes_two(study, tmp_path):
    assert "# Robustness against cost on Fashion-MNIST" in (study.root / "frontier.md").read_text()
    cifar = tmp_path / "cifar10"
    cifar.mkdir()
    for path in (study.root / "results").glob("*.json"):
        doc = json.loads(path.read_text())
        doc["config"].update(dataset="cifar10", eps=8 / 255)
        (cifar / path.name).write_text(json.dumps(doc))
    text = write_report(cifar, tmp_path / "cifar10.md", study.plan)
    assert text.startswith("# Robustness against cost on CIFAR-10\n") and "linf ε = 8/255." in text
    shutil.copy(study.root / "results" / "pgd-at-tiny-seed0.json", cifar / "pgd-at-tiny-seed1.json")
    with pytest.raises(ValueError, match=r"2 data sets or budgets \(cifar10 at ε 8/255, fashion_mnist at ε 0.1\); "
                       r"one table compares one: give each study its own --results"):
        write_report(cifar, tmp_path / "mixed.md", study.plan)
    assert not (tmp_path / "mixed.md").exists()


def test_a_study_of_another_data_set_reads_it_from_data_dir_and_keeps_its_own_folders(tmp_path, monkeypatch):
    """CIFAR-10 is never downloaded: the study reads it from --data-dir, and its runs, results and
    report go beside Fashion-MNIST's, not among them."""
    seen = {}

    def planned(plan, rows, results):
        seen.update(plan=plan, results=results)
        return []

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(frontier, "estimate", planned)
    monkeypatch.setattr(frontier, "estimate_table", lambda *a, **k: "")
    assert frontier.main(["--plan", "--preset", "cifar10-resnet18", "--data-dir", "/data/cifar", "--moe-width", "1.0"]) == 0
    plan = seen["plan"]
    assert plan.overrides == {"data_dir": "/data/cifar"} and plan.runs == "runs/frontier_cifar10"
    assert seen["results"] == Path("reports/robustness_frontier_cifar10")
    assert plan.config(default_rows(plan)[0], 0).dataset == "cifar10"
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
    no_work(monkeypatch)
    again = run.run_study(study.plan, study.rows, study.root / "results", log=quiet)
    assert [r.worst_case for r in again] == [r.worst_case for r in study.results]


def test_a_study_cut_off_after_an_evaluation_reuses_it(study, tmp_path, monkeypatch):
    """Cut off between an evaluation's eval.json and the run's result file: the next call writes the
    result from the eval.json instead of attacking again."""
    results = tmp_path / "results"
    shutil.copytree(study.root / "results", results)
    (results / "pgd-at-tiny-seed0.json").unlink()
    no_work(monkeypatch)
    again = run.run_study(study.plan, study.rows, results, log=quiet)
    assert read(results / "pgd-at-tiny-seed0.json").worst_case == study.results[0].worst_case
    assert [r.worst_case for r in again] == [r.worst_case for r in study.results]


def test_evaluations_are_sharded_over_the_plans_processes_with_the_threads_split(study, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(evaluations, "evaluate_in_processes", lambda *a, **k: calls.append((a, k)) or {"seconds": 1.0})
    monkeypatch.setattr(evaluations.torch, "get_num_threads", lambda: 2)
    cfg = study.plan.config(study.rows[0], 0)
    for processes, threads in ((2, 1), (1, 2)):
        run.evaluate(replace(study.plan, eval_processes=processes), study.root / "runs" / "pgd-at-tiny-seed0" / "best",
                     tmp_path / "eval", cfg, 8, ("pgd",))
        (passed_processes, _, passed_threads), kwargs = calls[-1]
        assert (passed_processes, passed_threads, kwargs["out"]) == (processes, threads, tmp_path / "eval")


def test_a_result_stands_wherever_its_data_was_read_from(study, tmp_path):
    """The same settings with the data in another folder (another machine's) are the same runs:
    their result files are taken as they are, not refused as other settings."""
    plan, rows = study.plan, study.rows
    moved = tmp_path / "data"
    shutil.copytree(plan.overrides["data_dir"], moved)
    elsewhere = replace(plan, overrides={**plan.overrides, "data_dir": str(moved), "workers": 1})
    kept = read(study.root / "results" / "pgd-at-tiny-seed0.json")
    assert run.finished(study.root / "results", rows[0], 0, elsewhere.config(rows[0], 0)) == kept
    assert [c["measured_runs"] for c in estimate(elsewhere, rows, study.root / "results")] == [1, 1]


def test_a_variant_lands_beside_the_study_and_other_settings_never_overwrite_it(study, tmp_path):
    """A lever (here a 1-step training attack) runs as rows of its own; the same rows with other
    settings but no variant name are refused before anything trains, and the results stay as they were."""
    rows, results = study.rows, tmp_path / "results"
    shutil.copytree(study.root / "results", results)
    kept = {p.name: p.read_bytes() for p in results.glob("*.json")}
    other = replace(study.plan, overrides={**study.plan.overrides, "attack_steps": 1}, runs=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=r"pgd-at-tiny-seed0.json is a result of other settings \(they differ in "
                                         r"attack_steps\): to measure these settings beside it, name them with --variant"):
        estimate(other, rows[:1], results)
    with pytest.raises(ValueError, match="is a result of other settings"):
        run.run_study(other, rows[:1], results, log=quiet)
    assert {p.name: p.read_bytes() for p in results.glob("*.json")} == kept
    variant = variant_rows(rows[:1], "steps1", {"attack_steps": 1})
    assert (variant[0].key, variant[0].label) == ("pgd-at-tiny-steps1", "dense PGD-AT, tiny (steps1: attack_steps=1)")
    [result] = run.run_study(other, variant, results, log=quiet)
    assert result.config["attack_steps"] == 1 and (tmp_path / "runs" / "pgd-at-tiny-steps1-seed0" / "best").is_dir()
    assert {p.name: p.read_bytes() for p in results.glob("*.json") if p.name in kept} == kept
    assert "| dense PGD-AT, tiny (steps1: attack_steps=1) |" in write_report(results, tmp_path / "f.md", other)


def test_a_repeat_trains_the_runs_again_beside_the_first_and_the_report_pools_them(study, tmp_path, monkeypatch):
    """CPU training is not bitwise reproducible: --repeat 1 trains a seed again under a name of its
    own, leaves the first run's result as it was, and the row's numbers are over both runs."""
    rows, results = study.rows, tmp_path / "results"
    shutil.copytree(study.root / "results", results)
    kept = {p.name: p.read_bytes() for p in results.glob("*.json")}
    again = replace(study.plan, repeat=1, runs=str(tmp_path / "runs"))
    # before it runs, a repeat is costed at what the first run took
    [cost] = estimate(again, rows[:1], results)
    assert cost["measured_runs"] == 1 and cost["train_hours"] == pytest.approx(study.results[0].seconds["train"] / 3600)
    [result] = run.run_study(again, rows[:1], results, log=quiet)
    assert (result.seed, result.repeat, result.name) == (0, 1, "pgd-at-tiny-seed0-repeat1")
    assert (tmp_path / "runs" / "pgd-at-tiny-seed0-repeat1" / "best").is_dir()
    assert read(results / "pgd-at-tiny-seed0-repeat1.json").repeat == 1
    assert {p.name: p.read_bytes() for p in results.glob("*.json") if p.name in kept} == kept
    assert [r.run_label for r in load_results(results)["pgd-at-tiny"]] == ["0", "0 (repeat 1)"]
    line = next(line for line in write_report(results, tmp_path / "f.md", again).splitlines()
                if line.startswith("| dense PGD-AT, tiny |"))
    assert "| 0, 0 (repeat 1) |" in line
    no_work(monkeypatch)  # a second call finds the repeat and trains nothing
    [kept_result] = run.run_study(again, rows[:1], results, log=quiet)
    assert (kept_result.repeat, kept_result.checkpoint_sha256) == (1, result.checkpoint_sha256)


def test_a_result_file_without_a_later_setting_still_counts_as_finished(study, tmp_path):
    """Result files written before a setting existed (every committed one before expert_loss) are
    of that setting's default: the study keeps them instead of refusing or retraining."""
    doc = json.loads((study.root / "results" / "pgd-at-tiny-seed0.json").read_text())
    del doc["config"]["expert_loss"]
    (tmp_path / "pgd-at-tiny-seed0.json").write_text(json.dumps(doc))
    rows = study.rows
    assert run.finished(tmp_path, rows[0], 0, study.plan.config(rows[0], 0)).worst_case == study.results[0].worst_case


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
    (["--rows", "nope"], "unknown rows ['nope']"),
    (["--curves", "--set", "num_experts=4"], "--set num_experts: the curves' rows set it; choose them with --experts"),
    (["--curves", "--experts", "1"], "--experts 2 or more"),
])
def test_bad_flags_get_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        frontier.main(["--plan", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_commands_prints_one_job_per_missing_run_and_each_job_runs_only_its_run(study, monkeypatch):
    """A cluster runs the study as independent jobs: one command per run without a result (and per
    headline run without AutoAttack), each repeating this call's study flags, and a job's own flags
    select exactly its run."""
    two = [replace(r, seeds=(0, 1)) for r in study.rows]
    jobs = run.commands(study.plan, two, study.root / "results", ["--set", "attack_steps=2"])
    assert jobs == [f"advmoe study frontier --set attack_steps=2 --rows {key} --seeds 1 --headline-seeds 1"
                    for key in ("advmoe-tiny", "pgd-at-tiny")]  # seed 0 of both landed; headline first
    argv = ["--commands", "--results", "r", "--set", "attack_steps=2", "--seeds", "0", "1", "--threads=1", "--rows", "x"]
    assert frontier.job_flags(argv) == ["--results", "r", "--set", "attack_steps=2", "--threads=1"]
    # a job's flags, parsed back: one row, one seed
    chosen = {}
    monkeypatch.setattr(frontier, "default_rows", lambda plan: [replace(r, seeds=plan.headline_seeds if r.headline
                                                                        else plan.seeds) for r in study.rows])
    monkeypatch.setattr(frontier, "estimate", lambda plan, rows, results: chosen.update(rows=rows) or [])
    monkeypatch.setattr(frontier, "estimate_table", lambda *a, **k: "")
    monkeypatch.setattr(frontier, "run_study", lambda plan, rows, results, **k: chosen.update(plan=plan))
    monkeypatch.setattr(frontier, "write_report", lambda *a, **k: "")
    assert frontier.main(shlex.split(jobs[0])[3:]) == 0
    [row] = chosen["rows"]
    assert (row.key, row.seeds) == ("advmoe-tiny", (1,)) and chosen["plan"].overrides == {"attack_steps": 2}


def test_the_report_merges_result_files_from_several_machines(study, tmp_path):
    """Jobs on other machines each leave result files; copied into one folder, the report pools them."""
    merged = tmp_path / "merged"
    shutil.copytree(study.root / "results", merged)
    second = json.loads((merged / "pgd-at-tiny-seed0.json").read_text()) | {"seed": 1, "worst_case": 0.5}
    (merged / "pgd-at-tiny-seed1.json").write_text(json.dumps(second))  # from another machine's job
    assert frontier.main(["--report-only", "--results", str(merged), "--report", str(tmp_path / "r.md")]) == 0
    numbers = json.loads((tmp_path / "r.json").read_text())
    mean, std = numbers["rows"]["pgd-at-tiny"]["worst_case"]
    assert numbers["rows"]["pgd-at-tiny"]["runs"] == ["pgd-at-tiny-seed0", "pgd-at-tiny-seed1"]
    assert mean == pytest.approx((study.results[0].worst_case + 0.5) / 2)


def test_a_method_variant_trains_the_rows_with_that_method_and_says_so(study):
    """`--set method=...` used to be overridden by the row's own method without a word."""
    [row] = variant_rows(study.rows[:1], "kl", {"method": "trades"})
    assert (row.key, row.label, row.method, row.variant) == ("pgd-at-tiny-kl", "dense TRADES, tiny (kl: method=trades)",
                                                             "trades", "kl")
    assert study.plan.config(row, 0).method == "trades"
    [moe] = variant_rows(study.rows[1:], "ce", {"method": "pgd-at"})  # the MoE model under PGD-AT stays a MoE row
    assert (moe.label, moe.method) == ("MoE PGD-AT, tiny (ce: method=pgd-at)", "pgd-at")


def test_a_moe_run_trained_along_another_gate_gradient_is_attacked_along_softmax(study):
    """Attacks along "chosen" leave 5 points more standing (reports/gate_grad.md): a row trained
    along it must meet the same attacks as the others, not its own weaker gradient."""
    plan = study.plan
    variant = replace(plan, overrides={**plan.overrides, "gate_grad": "chosen"})  # what --set gate_grad=... gives
    [chosen] = variant_rows(study.rows[1:], "chosen", {"gate_grad": "chosen"})
    assert variant.config(chosen, 0).gate_grad == "chosen"
    assert run.attack_settings(variant, variant.config(chosen, 0))["gate_grad"] == "softmax"
    for row in study.rows:  # a row attacked along its own gradient keeps the settings its evaluations were made with
        assert "gate_grad" not in run.attack_settings(plan, plan.config(row, 0))


def test_a_result_that_outlived_its_run_folder_gets_no_autoattack_and_says_so(study, tmp_path, monkeypatch):
    """A fresh machine keeps the committed result files but not the run folders: the study goes on
    (the row's AutoAttack comes from its other seeds) instead of failing on the missing checkpoint."""
    results = tmp_path / "results"
    results.mkdir()
    for path in (study.root / "results").glob("*.json"):
        doc = json.loads(path.read_text()) | {"autoattack": None}
        (results / path.name).write_text(json.dumps(doc))
    no_work(monkeypatch)
    logged = []
    gone = replace(study.plan, runs=str(tmp_path / "gone"))
    again = run.run_study(gone, study.rows, results, log=logged.append)
    assert all(r.autoattack is None for r in again)
    assert any(line.startswith("no AutoAttack on advmoe-tiny-seed0: its checkpoint or main evaluation is not in")
               for line in logged)


def test_headline_runs_of_every_seed_come_before_the_other_rows(study, tmp_path, monkeypatch):
    order = []

    def run_one(plan, row, seed, results, log):
        order.append(f"{row.key}-seed{seed}")
        return SimpleNamespace(worst_case=0.5, autoattack={"accuracy": 0.5}, name=order[-1])

    monkeypatch.setattr(run, "run_one", run_one)
    two = [replace(r, seeds=(0, 1)) for r in study.rows]
    run.run_study(study.plan, two, tmp_path / "results", log=quiet)
    assert order == ["advmoe-tiny-seed0", "advmoe-tiny-seed1", "pgd-at-tiny-seed0", "pgd-at-tiny-seed1"]


def test_the_estimate_costs_rows_with_finished_runs_at_what_they_took(study):
    measured = estimate(study.plan, study.rows, study.root / "results")
    assert [c["measured_runs"] for c in measured] == [1, 1]
    moe = next(r for r in study.results if r.row.headline)
    cost = next(c for c in measured if c["row"] == "advmoe-tiny")
    assert cost["train_hours"] == pytest.approx(moe.seconds["train"] / 3600)
    assert cost["eval_hours"] == pytest.approx((moe.seconds["eval"] + moe.seconds["autoattack"]) / 3600)
    counted = estimate(study.plan, study.rows)  # nothing landed: a timed step and counted attack passes
    assert [c["measured_runs"] for c in counted] == [0, 0] and all(c["train_hours"] > 0 < c["eval_hours"] for c in counted)


def test_a_curve_row_trains_with_its_own_experts_and_recipe(study, tmp_path):
    """A curve row's settings (4 experts, its recipe) reach its training, its result file and its
    checkpoint. (The report's curve is checked on planted results: test_curves.py.)"""
    import advmoe

    results = tmp_path / "results"
    shutil.copytree(study.root / "results", results)
    plan = replace(study.plan, runs=str(tmp_path / "runs"))
    moe = next(r for r in study.rows if r.is_moe)
    row = replace(moe, key="advmoe-tiny-x4-steps1", label="AdvMoE, tiny, 4 experts", headline=False, variant="steps1",
                  settings={"num_experts": 4, "attack_steps": 1})
    [result] = run.run_study(plan, [row], results, log=quiet)
    assert (result.config["num_experts"], result.config["attack_steps"]) == (4, 1) and len(result.expert_share) == 4
    assert advmoe.load_checkpoint(tmp_path / "runs" / "advmoe-tiny-x4-steps1-seed0" / "best").cfg.num_experts == 4
    assert read(results / "advmoe-tiny-x4-steps1-seed0.json").row.settings == {"num_experts": 4, "attack_steps": 1}
