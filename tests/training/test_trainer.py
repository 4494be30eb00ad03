"""The run directory a user can trust: logs, plots, checkpoints, resume, and clear refusals."""
import dataclasses
from dataclasses import replace
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Subset

import advmoe
from cli.main import main as cli
from helpers import make_fashion_like
from training import trainer, validate
from training.config import ConfigError, resolve

SMALL = dict(dataset="fashion_mnist", model="moe_resnet18", width=0.125, router_blocks=1, router_width=8,
             eps=0.1, attack_step=0.05, eval_step=0.05, eval_steps=2, val_size=100, train_examples=192,
             val_examples=48, batch_size=32, epochs=2, lr=0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fashion_like(tmp_path_factory.mktemp("fashion"))


def config(data, **changes):
    return resolve(data_dir=str(data), **{**SMALL, **changes})


def run(cfg, out, **kwargs):
    return trainer.train(cfg, out, log=lambda *a: None, test_examples=32, **kwargs)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "advmoe"
    return run(config(data), out)


def test_run_directory_holds_checkpoints_logs_and_plots(finished):
    out = finished.out
    assert {p.name for p in out.iterdir()} >= {"config.json", "last", "best", "metrics.jsonl", "metrics.csv", "plots"}
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "accuracy.png", "experts.png"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_router_loss", "val_clean_accuracy", "val_pgd_accuracy", "val_route_fixed_accuracy",
            "val_worst_accuracy", "val_expert_share", "epoch_seconds", "attack_steps_per_batch",
            "val_train_attack_accuracy", "training_attack_steps", "training_attack_step"} <= set(rows[0])
    assert all(0 <= r["val_train_attack_accuracy"] <= 1 and r["training_attack_steps"] == 2 for r in rows)
    assert all(r["validation_seconds"] > 0 for r in rows)  # the validation attacks, timed apart from the epoch
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert {"clean_accuracy", "pgd_accuracy", "macs_per_image", "test_expert_share"} <= set(metrics)
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["training"]["method"] == "advmoe" and config["dataset"] == "fashion_mnist"
    assert config["training"]["augment"] == "crop-flip" and config["training"]["attack_start"] == "normal"
    assert advmoe.load_checkpoint(out / "best").cfg.in_channels == 1


def test_settings_default_to_the_reference_and_the_config_records_the_resolved_augmentation():
    assert resolve(dataset="svhn").augment == "crop" and resolve(dataset="cifar100").augment == "crop-flip"
    assert resolve("fmnist-tiny", augment="none").augment == "none"
    cifar = resolve("cifar10-resnet18")
    assert (cifar.amp, cifar.augment, cifar.attack_start) == ("none", "crop-flip", "normal")
    info = advmoe.get_dataset_info("fashion_mnist")
    assert resolve("fmnist-tiny", gate_grad="chosen").model_kwargs(info)["gate_grad"] == "chosen"
    with pytest.raises(ConfigError, match="unknown attack-start 'zero'"):
        resolve("fmnist-tiny", attack_start="zero")
    # no gradient through the gate: only a router step on the router's own logits trains the router
    assert resolve("fmnist-tiny", gate_grad="none").router_loss == "reference"
    for method, router_loss in (("moe-at", "reference"), ("advmoe", "model"), ("router-only", "reference")):
        with pytest.raises(ConfigError, match="gate_grad=none gives the router no gradient through the gate"):
            resolve("fmnist-tiny", gate_grad="none", method=method, router_loss=router_loss)


def test_best_is_selected_on_validation(finished):
    rows = finished.history
    best_epoch = json.loads((finished.best / "metrics.json").read_text())["epoch"]
    assert rows[best_epoch - 1]["val_pgd_accuracy"] == max(r["val_pgd_accuracy"] for r in rows)


@pytest.fixture(scope="module")
def learned(data, tmp_path_factory):
    """A MoE and a dense model trained without attack until they classify the toy data (the
    adversarially trained `finished` run is too short to): attacks then have something to take."""
    runs = tmp_path_factory.mktemp("learned")
    return {model: run(config(data, model=model, method="standard", train_examples=500, epochs=3, lr=0.02,
                              augment="none"), runs / model).model for model in ("moe_resnet18", "resnet18")}


@pytest.mark.parametrize("model", ["moe_resnet18", "resnet18"])
def test_validation_adds_the_route_fixed_attack_and_leaves_pgd_as_it_was(data, learned, model, monkeypatch):
    """A MoE model's validation also runs the route-fixed attack, and the trainer's the training
    attack; an image counts in the worst case only if it survives PGD and the route-fixed attack.
    The PGD numbers are those a validation without them gives, random starts included: old and
    new curves compare."""
    # one short step from a random start: where the attack ends depends on the start
    cfg = config(data, model=model, method="pgd-at", eps=0.1, eval_step=0.03, eval_steps=1)
    val_set = advmoe.load_dataset("fashion_mnist", "val", str(data), cfg.val_size, cfg.seed)
    got = validate.validate(learned[model], val_set, cfg, torch.device("cpu"), batch_size=16,  # several batches
                            train_attack=True)
    monkeypatch.setattr(validate, "_route_fixed_survivors", lambda model, x, y, cfg: torch.ones_like(y, dtype=torch.bool))
    without = validate.validate(learned[model], val_set, cfg, torch.device("cpu"), batch_size=16)
    assert got["pgd_accuracy"] == without["pgd_accuracy"] and got["clean_accuracy"] == without["clean_accuracy"]
    assert 0 < got["pgd_accuracy"] < got["clean_accuracy"]  # the attack attacks, and leaves something
    assert 0 <= got["train_attack_accuracy"] < got["clean_accuracy"] and "train_attack_accuracy" not in without
    if model.startswith("moe"):
        assert got["worst_accuracy"] <= min(got["pgd_accuracy"], got["route_fixed_accuracy"])
        assert got["route_fixed_accuracy"] < got["clean_accuracy"]
        assert without["route_fixed_accuracy"] == 1.0 and without["worst_accuracy"] == without["pgd_accuracy"]
    else:  # no route to fix
        assert "route_fixed_accuracy" not in got and got["worst_accuracy"] == got["pgd_accuracy"]


class ScaledLogits(torch.nn.Module):
    """A model whose logits are multiplied by a large factor: its softmax saturates, the
    cross-entropy's gradient is zero in float32, and PGD on it stands still (masked gradients)."""

    def __init__(self, model: torch.nn.Module, scale: float = 1e4):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(x) * self.scale


def test_validation_apgd_sees_what_masked_gradients_hide_from_pgd(data, learned):
    """With val_apgd_iterations, APGD-CE and APGD-DLR join the worst case. On a model whose
    cross-entropy gradient vanishes, PGD finds almost nothing while the scale-free DLR loss does;
    the PGD numbers stay those of a validation without APGD."""
    cfg = config(data, model="resnet18", method="pgd-at", eps=0.1, eval_step=0.025, eval_steps=5)
    val_set = Subset(advmoe.load_dataset("fashion_mnist", "val", str(data), cfg.val_size, cfg.seed), range(64))
    masked = ScaledLogits(learned["resnet18"]).eval()
    without = validate.validate(masked, val_set, cfg, torch.device("cpu"))
    got = validate.validate(masked, val_set, replace(cfg, val_apgd_iterations=10), torch.device("cpu"))
    assert "apgd_accuracy" not in without and got["pgd_accuracy"] == without["pgd_accuracy"]
    assert got["apgd_accuracy"] < got["pgd_accuracy"] - 0.2
    assert got["worst_accuracy"] <= min(got["pgd_accuracy"], got["apgd_accuracy"])


def test_validation_apgd_iterations_cannot_be_negative(data):
    with pytest.raises(ConfigError, match="val_apgd_iterations"):
        config(data, val_apgd_iterations=-1)


@pytest.mark.parametrize("select_on, best_epoch", [("pgd", 2), ("worst", 1)])
def test_the_best_checkpoint_is_chosen_on_the_accuracy_select_on_names(data, tmp_path, monkeypatch, select_on, best_epoch):
    """Epoch 2 gains PGD accuracy and loses more on the route-fixed attack: selection on the worst
    case keeps epoch 1."""
    scores = iter([(0.50, 0.50), (0.60, 0.30), (0.60, 0.30)])  # (PGD, worst): two epochs, then the final test

    def scripted(model, dataset, cfg, device, **kwargs):
        pgd, worst = next(scores)
        return {"clean_accuracy": 0.8, "pgd_accuracy": pgd, "worst_accuracy": worst, "route_fixed_accuracy": worst,
                "examples": 1}

    monkeypatch.setattr(trainer, "validate", scripted)
    lines = []
    trainer.train(config(data, method="standard", epochs=2, select_on=select_on, collapse_guard="off"), tmp_path / "run",
                  log=lines.append, test_examples=8)
    assert json.loads((tmp_path / "run/best/metrics.json").read_text())["epoch"] == best_epoch
    assert "route-fixed 0.3000" in lines[-2]  # the epoch's log line shows it
    overfit = [line for line in lines if "overfit catastrophically" in line]
    assert (overfit == []) if select_on == "pgd" else f"{trainer.SELECTED_ON[select_on]} accuracy fell" in overfit[0]


def test_resume_after_an_interruption_equals_the_uninterrupted_run(data, finished, tmp_path, monkeypatch):
    calls = {"n": 0}
    validate = trainer.validate

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after epoch 2's steps, before its checkpoint
        return validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "validate", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run(config(data), tmp_path / "run")
    monkeypatch.setattr(trainer, "validate", validate)
    assert json.loads((tmp_path / "run/last/metrics.json").read_text())["epoch"] == 1
    resumed = run(config(data), tmp_path / "run", resume=True)
    expected = load_file(finished.out / "last" / "model.safetensors")
    got = load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    timing = {"epoch_seconds", "validation_seconds", "samples_per_second"}
    def untimed(history):
        return [{k: v for k, v in row.items() if k not in timing} for row in history]
    assert untimed(resumed.history) == untimed(finished.history)


def test_resume_refuses_another_config_and_touches_nothing(data, finished, capsys):
    before = {p: p.read_bytes() for p in finished.out.rglob("*") if p.is_file()}
    code = cli(["train", "--preset", "fmnist-tiny", "--data-dir", str(data), "--out", str(finished.out), "--resume"])
    assert code == 2
    assert "belongs to another config" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in finished.out.rglob("*") if p.is_file()} == before


def test_a_run_of_an_older_version_resumes_where_a_setting_was_added_since(data, tmp_path):
    """A config.json written before a setting existed ran that setting's default: it is the same
    config, and the run resumes; a setting it did record still has to match."""
    cfg = config(data)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "expert_loss"}))
    trainer._check_run_dir(cfg, tmp_path, resume=True)
    with pytest.raises(ConfigError, match="expert_loss: 'trades' in the run, 'ce' now"):
        trainer._check_run_dir(dataclasses.replace(cfg, expert_loss="ce"), tmp_path, resume=True)


@pytest.mark.parametrize("args,message", [
    (["--method", "fgsm-at"], "unknown method 'fgsm-at'"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--eps", "8"], r"eps=8 must be in \(0, 1\].*8/255"),
    (["--method", "advmoe", "--model", "resnet18"], "use a moe_\\* model"),
    (["--method", "moe-at", "--expert-loss", "ce"], "expert_loss=ce is a setting of advmoe and route-aware; moe-at"),
])
def test_bad_settings_are_one_line_errors_with_exit_code_2(tmp_path, capsys, args, message):
    assert cli(["train", "--preset", "fmnist-tiny", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_missing_data_and_a_used_run_directory_are_refused(tmp_path, finished, capsys):
    assert cli(["train", "--preset", "fmnist-tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "fashion_mnist: expected" in capsys.readouterr().err
    assert cli(["train", "--preset", "fmnist-tiny", "--out", str(finished.out)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    steps = []

    def standard_then_nan(s, x, y):  # 6 steps per epoch: the 7th is the first of epoch 2
        steps.append(1)
        loss = s.clean_loss(x, y)
        return {"loss": s.update("all", loss * float("nan") if len(steps) > 6 else loss)}

    monkeypatch.setitem(trainer.METHODS, "standard", dataclasses.replace(trainer.METHODS["standard"], step=standard_then_nan))
    with pytest.raises(trainer.TrainingDiverged, match=r"loss is nan at epoch 2.*last good checkpoint is .*last \(epoch 1\)"):
        run(config(data, method="standard"), tmp_path / "run")
    assert json.loads((tmp_path / "run/last/metrics.json").read_text())["epoch"] == 1


def test_the_fashion_mnist_preset_starts_its_attack_uniform_and_the_cifar_preset_as_the_reference():
    # Fashion-MNIST at eps 0.1 overfits catastrophically from the normal start (reports/attack_start.md).
    assert resolve("fmnist-tiny").attack_start == "uniform"
    assert resolve("cifar10-resnet18").attack_start == resolve().attack_start == "normal"


def test_a_collapse_of_validation_robustness_is_warned_and_the_best_checkpoint_kept(data, tmp_path, monkeypatch):
    """Catastrophic overfitting: validation PGD accuracy falls far under its best while training
    goes on. The log says so, with what to try, and `best/` stays the better epoch (the collapse
    guard, off here, is tested in test_collapse_guard.py)."""
    scores = iter([0.6, 0.3, 0.3])  # two epochs, then the final test

    def falling(model, dataset, cfg, device, **kwargs):
        return {"clean_accuracy": 0.8, "pgd_accuracy": next(scores), "examples": 1}

    monkeypatch.setattr(trainer, "validate", falling)
    lines = []
    trainer.train(config(data, method="standard", epochs=2, collapse_guard="off"), tmp_path / "run", log=lines.append,
                  test_examples=8)
    warnings = [line for line in lines if "overfit catastrophically" in line]
    assert len(warnings) == 1 and "from its best 60.0% to 30.0%" in warnings[0] and "--attack-steps" in warnings[0]
    assert json.loads((tmp_path / "run/best/metrics.json").read_text())["epoch"] == 1
    assert trainer.overfitting_warning(0.6, 0.55) is None  # a dip of a few points is noise, not a collapse
