"""studies.per_class: two checkpoints on the same test images, class by class; the MoE model's
expert shares per class; evaluations reused when they match, bad input refused before any runs."""
import json

import pytest
import torch

import advmoe
from advmoe.calibrate import balance_routing, calibrate_batchnorm
from helpers import small_model
from studies import evaluations, per_class

FAST = ["--examples", "20", "--pgd-steps", "2", "--apgd-iterations", "3", "--threads", "1"]
CONFIG = {"dataset": "fashion_mnist", "training": {"eps": 0.1}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A Fashion-MNIST-shaped MoE checkpoint with both experts in use, and a dense one (untrained)."""
    root = tmp_path_factory.mktemp("per_class")
    torch.manual_seed(0)
    moe = small_model("moe_resnet18", "shared", in_channels=1, image_size=28, width=0.0625, router_blocks=1,
                      router_width=4)
    dense = small_model("resnet18", in_channels=1, image_size=28, width=0.0625)
    x = torch.rand(32, 1, 28, 28)
    for model in (moe, dense):
        calibrate_batchnorm(model, x)
    balance_routing(moe, x)
    return (advmoe.save_checkpoint(moe, root / "moe" / "best", config=CONFIG),
            advmoe.save_checkpoint(dense, root / "dense", config=CONFIG))


@pytest.fixture(scope="module")
def study(checkpoints, fashion_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    args = [*map(str, checkpoints), "--data-dir", str(fashion_dir), "--runs", str(root / "runs"),
            "--report", str(root / "per_class.md"), *FAST]
    assert per_class.main(args) == 0
    return root, args


def test_the_classes_add_up_to_each_model_and_to_the_difference(study):
    root, _ = study
    result = json.loads((root / "per_class.json").read_text())
    table, n = result["per_class"], result["examples"]
    assert list(table) == ["moe", "dense"]  # a checkpoint's name: its folder, or the run's when it is best/
    for name, rows in table.items():
        assert sum(rows["count"]) == n
        for key in ("clean", "robust"):
            assert sum(rows[key]) / n == pytest.approx(result["accuracy"][name][key])
            assert all(hits <= count for hits, count in zip(rows[key], rows["count"]))
        assert all(r <= c for r, c in zip(rows["robust"], rows["clean"]))  # worst case: never above clean
    shares = result["expert_shares"]
    assert shares["dense"] is None
    for count, class_shares in zip(table["moe"]["count"], shares["moe"]):
        if count:
            assert sum(class_shares) == pytest.approx(1.0)
    text = (root / "per_class.md").read_text()
    difference = 100 * (result["accuracy"]["moe"]["robust"] - result["accuracy"]["dense"]["robust"])
    adds = [float(line.split(" | ")[6]) for line in text.splitlines() if line.startswith("| ") and "images" not in line
            and not line.startswith("|---")]
    assert len(adds) == 10 and sum(adds) == pytest.approx(difference, abs=0.06)  # rounded to 0.1 each
    assert f"moe minus dense, worst case: {difference:+.1f} points" in text
    assert "python -m studies.per_class " in text  # the command that made it


def test_a_second_call_reuses_both_evaluations(study, monkeypatch):
    _, args = study
    monkeypatch.setattr(evaluations, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))
    assert per_class.main(args) == 0


def test_classes_tied_to_experts_are_named_by_expert():
    classes = [f"c{c}" for c in range(4)]
    rows = {"count": [5] * 4, "clean": [5, 4, 3, 5], "robust": [4, 2, 1, 5]}
    result = {"examples": 20, "classes": classes, "per_class": {"moe": rows, "dense": {**rows, "robust": [5, 2, 4, 5]}},
              "expert_shares": {"moe": [[1.0, 0.0], [0.0, 1.0], [0.95, 0.05], [0.5, 0.5]], "dense": None},
              "accuracy": {"moe": {"clean": 0.85, "robust": 0.6}, "dense": {"clean": 0.85, "robust": 0.8}}}
    text = per_class.report(result, {"moe": "a", "dense": "b"}, "python -m studies.per_class a b")
    assert "- moe: 3 of 4 classes send at least 90 % of their clean images to one expert: expert 0: c0, c2; " \
           "expert 1: c1." in text
    # c2 adds -15 points (3 images of 20), c0 -5: the classes that carry the loss come first
    assert "moe minus dense, worst case: -20.0 points; the classes that add most to it: c2 (-15.0), c0 (-5.0)." in text
    assert "| c2 | 5 | 60.0 | 20.0 | 60.0 | 80.0 | -15.0 | 95 % | 5 % |" in text


@pytest.mark.parametrize("extra, message", [
    (["--reuse", "nonsense=x.json"], "write NAME=PATH"),
    (["--reuse", "dense=missing.json"], "--reuse dense=missing.json: no such file"),
    (["--reuse", "dense={here}/broken.json"], "broken.json is not an evaluation of"),
    (["--examples", "0"], "--examples must be at least 1"),
    (["--names", "same", "same"], "both checkpoints are called 'same'"),
])
def test_bad_input_is_refused_with_what_to_fix(checkpoints, extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluations, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated before refusing"))
    (tmp_path / "broken.json").write_text("{not json")
    extra = [a.format(here=tmp_path) for a in extra]
    with pytest.raises(SystemExit) as exit:
        per_class.main([*map(str, checkpoints), "--runs", str(tmp_path), "--report", str(tmp_path / "r.md"), *extra])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_checkpoints_of_other_datasets_are_refused(checkpoints, tmp_path, capsys):
    other = advmoe.save_checkpoint(small_model("resnet18", in_channels=1, image_size=28), tmp_path / "other",
                                   config={"dataset": "mnist_like_but_not"})
    with pytest.raises(SystemExit) as exit:
        per_class.main([str(checkpoints[0]), str(other), "--runs", str(tmp_path / "runs")])
    assert exit.value.code == 2 and "must name the same dataset" in capsys.readouterr().err
