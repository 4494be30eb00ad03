"""studies.gate_grad: one checkpoint attacked under each straight-through gradient, compared per
image; evaluations reused when they match, refused when they do not."""
import json

import pytest

import advmoe
from helpers import fmnist_moe_checkpoint, small_model
from studies import evaluations, gate_grad

FAST = ["--examples", "12", "--pgd-steps", "3", "--apgd-iterations", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fmnist_moe_checkpoint(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="module")
def study(checkpoint, fashion_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate_grad")
    args = [str(checkpoint), "--data-dir", str(fashion_dir), "--runs", str(root / "runs"),
            "--report", str(root / "gate_grad.md"), *FAST]
    assert gate_grad.main(args) == 0
    return root, args


def test_every_gradient_attacks_the_same_model_and_images(study):
    root, _ = study
    grads = ("softmax", "chosen", "none")
    docs = {g: json.loads((root / "runs" / g / "eval.json").read_text()) for g in grads}
    for grad in grads:
        assert docs[grad]["settings"]["gate_grad"] == grad
        assert docs[grad]["per_example"]["clean"] == docs["softmax"]["per_example"]["clean"]
    # with no gradient through the gate, the sanity check sees what it is: the router passes none
    assert any("router passes gradient" in failed for failed in docs["none"]["sanity"]["failed"])
    result = json.loads((root / "gate_grad.json").read_text())
    for attack, acc in result["accuracy"].items():  # all: an image must survive under each gradient
        assert acc["all"] <= min(acc[g] for g in grads), attack
    for grad in grads:  # per image, so at most every attack's accuracy
        assert result["accuracy"]["worst"][grad] <= min(result["accuracy"][k][grad] for k in ("pgd-3", "apgd"))
    text = (root / "gate_grad.md").read_text()
    assert "| `softmax` | `chosen` | `none` | all |" in text and "Images that only the" in text
    assert "python -m studies.gate_grad " in text  # the command that made it


def test_grads_chooses_the_gradients_compared(study, tmp_path, monkeypatch):
    root, args = study
    monkeypatch.setattr(evaluations, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))
    report = tmp_path / "two.md"
    assert gate_grad.main([*args[:-len(FAST)], *FAST, "--grads", "softmax", "chosen", "--report", str(report)]) == 0
    assert "| `softmax` | `chosen` | all |" in report.read_text()
    with pytest.raises(SystemExit) as exit:
        gate_grad.main([*args, "--grads", "softmax"])
    assert exit.value.code == 2


def test_a_second_call_reuses_every_evaluation(study, monkeypatch):
    root, args = study
    monkeypatch.setattr(evaluations, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))
    assert gate_grad.main(args) == 0


def test_a_reused_evaluation_must_match(study, checkpoint, capsys):
    root, args = study
    # more PGD steps than the evaluation given: it cannot stand in for this one
    other = [a if a != "3" else "5" for a in args]
    with pytest.raises(SystemExit) as exit:
        gate_grad.main([*other, "--reuse", f"chosen={root / 'runs' / 'chosen' / 'eval.json'}"])
    assert exit.value.code == 2 and "is not an evaluation of" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--reuse", "nonsense=x.json"], "write GRAD=PATH"),
    (["--reuse", "chosen=missing.json"], "--reuse chosen=missing.json: no such file"),
    (["--reuse", "chosen={here}/broken.json"], "broken.json is not an evaluation of"),
    (["--examples", "0"], "--examples must be at least 1"),
])
def test_bad_input_is_refused_with_what_to_fix(checkpoint, extra, message, capsys, tmp_path, monkeypatch):
    # refused before any evaluation runs, not after the other gradient's
    monkeypatch.setattr(evaluations, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated before refusing"))
    (tmp_path / "broken.json").write_text("{not json")
    extra = [a.format(here=tmp_path) for a in extra]
    with pytest.raises(SystemExit) as exit:
        gate_grad.main([str(checkpoint), "--runs", str(tmp_path), "--report", str(tmp_path / "r.md"), *extra])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_a_dense_model_has_no_gate(tmp_path, capsys):
    dense = advmoe.save_checkpoint(small_model("resnet18", in_channels=1, image_size=28), tmp_path / "dense",
                                   config={"dataset": "fashion_mnist"})
    with pytest.raises(SystemExit) as exit:
        gate_grad.main([str(dense), "--runs", str(tmp_path / "runs")])
    assert exit.value.code == 2 and "is a dense model: it has no gate" in capsys.readouterr().err
