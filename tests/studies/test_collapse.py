"""advmoe study collapse: each run's validation accuracies by epoch, the training attack's beside
PGD's, and the collapse guard's events, from the runs' own metrics.jsonl."""
import json

import pytest

from studies import collapse


def planted_run(folder, guard, rows):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": "moe-at", "seed": 1, "collapse_guard": guard}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_the_report_has_every_trained_epoch_with_its_three_accuracies_and_the_guards_action(tmp_path):
    event = {"action": "rolled back to epoch 1; training attack now 3 steps of 0.04167"}
    run = planted_run(tmp_path / "guarded", "rollback", [
        {"epoch": 1, "val_clean_accuracy": 0.8, "val_pgd_accuracy": 0.6, "val_train_attack_accuracy": 0.65,
         "training_attack_steps": 2},
        {"epoch": 2, "val_clean_accuracy": 0.81, "val_pgd_accuracy": 0.2, "val_train_attack_accuracy": 0.79,
         "training_attack_steps": 2, "collapse_guard": event},
        {"epoch": 2, "val_clean_accuracy": 0.8, "val_pgd_accuracy": 0.62, "val_train_attack_accuracy": 0.66,
         "val_apgd_accuracy": 0.55, "val_worst_accuracy": 0.54, "val_route_flip_rate": 0.28, "training_attack_steps": 3}])
    assert collapse.main([str(run), "--report", str(tmp_path / "c.md")]) == 0
    lines = [line for line in (tmp_path / "c.md").read_text().splitlines() if line.startswith("| guarded |")]
    assert [line.split(" | ")[2:10] for line in lines] == [
        ["1", "80.0", "60.0", "65.0", "-", "-", "-", "2"], ["2", "81.0", "20.0", "79.0", "-", "-", "-", "2"],
        ["2", "80.0", "62.0", "66.0", "55.0", "54.0", "28.0", "3"]]  # APGD where the run validated with it
    assert lines[1].endswith(f"| {event['action']} |")
    numbers = json.loads((tmp_path / "c.json").read_text())
    assert [r["val_pgd_accuracy"] for r in numbers["runs"][0]["rows"]] == [0.6, 0.2, 0.62]


def test_a_folder_without_a_run_is_one_line_and_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        collapse.main([str(tmp_path), "--report", str(tmp_path / "c.md")])
    assert e.value.code == 2 and "no metrics.jsonl in" in capsys.readouterr().err and not (tmp_path / "c.md").exists()
